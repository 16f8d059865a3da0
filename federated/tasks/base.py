"""The interface every task answers: *what* is learned (a strategy says how it is federated).

A task is one subclass in its own file plus one line in `federated/tasks/__init__.py`. It says

- how a site's slices become the task's sample (`transform`, called by `data.mri_data.SliceDataset`);
- which model it builds, with which optimiser, schedule and loss by default;
- how a collated batch of samples becomes model inputs and a training target on the device
  (`to_device`), and the model's prediction (`forward`);
- what evaluation compares: the prediction, the reference and the baseline (zero-filled for
  reconstruction), per slice on the original intensity scale (`volume_parts`).

Strategies see `Batch.inputs` only as something to hand back to `forward`/`encode`, and `Batch` only
through `loss`: they never read a sample's fields.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from utils.errors import UserError

if TYPE_CHECKING:
    from data.sites import Site
    from data.subsample import MaskFunc


@dataclass
class Batch:
    """One batch on the device: the model's inputs and what the loss compares the output with.

    `samples` is the collated sample batch it came from (on the host), for losses that need more
    than the target (e.g. VarNet's SSIM uses each slice's maximum).
    """
    inputs: tuple[torch.Tensor, ...]
    target: torch.Tensor
    samples: Any


@dataclass
class VolumeParts:
    """Per-slice arrays (B, H, W) float32 on the original intensity scale; `target` None for files
    without a reference (challenge and test files)."""
    reconstruction: np.ndarray
    target: np.ndarray | None
    baseline: np.ndarray


class Task:
    name = "task"
    summary = ""
    baseline_name = "zero_filled"  # the model-free reference evaluation compares with
    has_latent = False  # encode/forward_with_latent exist (FL-MRCM's alignment, the domain gap)
    # Options that define the trained model: a checkpoint's values override the command's in --phase test.
    model_options: tuple[str, ...] = ()
    # Why sample-level DP-SGD (--dpsgd_noise, federated/dpsgd.py) cannot train this task (None: it can).
    dpsgd_refusal: str | None = None

    def __init__(self, opts: argparse.Namespace):
        self.opts = opts

    # ---- flags -------------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """Add this task's own flags to the shared parser."""

    def check_options(self) -> None:
        """Flag values this task cannot use; raise UserError naming the flag."""

    def check_site(self, site: Site) -> None:
        """Refuse (UserError) a site whose data this task cannot learn from."""

    # ---- data --------------------------------------------------------------------------------
    def transform(self, site: Site, mask_func: MaskFunc, train: bool) -> Callable:
        """The per-slice transform `SliceDataset` calls (see its docstring for the arguments).
        Training draws a fresh mask per slice and epoch; evaluation seeds it from the file name."""
        raise NotImplementedError

    def dataset(self, site: Site, files: list[Path], train: bool, mask_func: MaskFunc) -> torch.utils.data.Dataset:
        """The slices of ``files`` (one site's volumes of the run's --sequence) as this task's samples;
        the dataset has ``set_epoch(seed)``. Reconstruction: `SliceDataset` through `transform`
        (wrapped by MRAugment when training asks for it)."""
        from data.augment import with_augmentation
        from data.mri_data import SliceDataset
        transform = with_augmentation(self.transform(site, mask_func, train), self.opts, train)
        return SliceDataset(files, transform, fmt=site.format,
                            challenge=site.challenge, resolution=self.opts.resolution,
                            slice_range=site.slice_range)

    def to_device(self, samples: Any, device: torch.device) -> Batch:
        raise NotImplementedError

    # ---- model and optimisation --------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_personalized_model(self, code_size: int) -> nn.Module:
        """The model with a site-coded personalisation block after every stage (`pfl`): its forward
        takes the inputs and a (code_size,) one-hot code; `stages()` lists its stages' key prefixes
        and `always_shared_prefixes` the keys averaged whatever --pfl_shared says (the mapper's)."""
        raise UserError(f"--strategy pfl: the {self.name} task has no personalised model yet; "
                        "choose another --strategy (fedbn, fedmri keep parts of the model local too)")

    def load_pretrained(self, model: nn.Module, path: Path) -> None:
        raise UserError(f"--pretrained: the {self.name} task cannot load pretrained weights")

    @classmethod
    def pretrained_options(cls, path: Path) -> dict[str, object]:
        """The model flags (option name -> value) that the weights in `path` were built with, as far
        as the file tells them ({}: none known); --phase test --pretrained builds its model with them.
        A file that cannot be read gives {} here and its error in `load_pretrained`."""
        return {}

    # The model's own flags (and the optimiser's) left unset on the command line take these values:
    # `paper_defaults` at paper scale, updated by `demo_defaults` at demo scale (options.py).
    paper_defaults: dict[str, object] = {}
    demo_defaults: dict[str, object] = {}

    def make_optimizer(self, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
        """--optimizer at --lr (the parser fills both from the task's defaults when not given)."""
        if self.opts.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.opts.lr)
        return torch.optim.RMSprop(params, lr=self.opts.lr)

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """StepLR every --lr_step updates of the scheduler (the client steps it once per round)."""
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.opts.lr_step, gamma=self.opts.lr_gamma)

    # ---- the step ----------------------------------------------------------------------------
    def forward(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return model(*inputs)

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def training_loss(self, client: Any, model: nn.Module, batch: Batch,
                      forward: Callable[[tuple[torch.Tensor, ...]], torch.Tensor]
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one local step of `client` and detached values to log; ``forward`` is the
        strategy's forward pass. A task with per-client state (synthesis' discriminators) steps it here."""
        return self.loss(forward(batch.inputs), batch), {}

    # ---- per-client state the task keeps (in `client.extra`, beside the strategy's) ------------
    def init_client(self, client: Any, model: nn.Module) -> None:
        """Create what this task keeps per client before the first round."""

    def client_state(self, client: Any) -> dict:
        return {}

    def load_client_state(self, client: Any, state: dict) -> None:
        pass

    def end_local(self, client: Any) -> None:
        """Called after a client's local update succeeded (e.g. to step schedules of its own optimisers)."""

    def is_encoder(self, key: str) -> bool:
        """Whether a state_dict entry belongs to the model's encoder (FedMRI shares only that)."""
        raise UserError(f"the {self.name} task defines no encoder to share; choose another --strategy")

    def encode(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The latent FL-MRCM aligns, (B, C, h, w); only where `has_latent`."""
        raise NotImplementedError

    def forward_with_latent(self, model: nn.Module,
                            inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # ---- evaluation --------------------------------------------------------------------------
    def volume_parts(self, samples: Any, output: torch.Tensor | None) -> VolumeParts:
        """Prediction, reference and baseline per slice on the original scale. `output` is the
        model's float32 output on the host (None: baseline only, the reconstruction is zeros)."""
        raise NotImplementedError

    def volume_metrics(self, target: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
        """Scores of one predicted volume (S, H, W) against its reference: fastMRI's NMSE, PSNR, SSIM."""
        from utils.metrics import volume_metrics
        return volume_metrics(target, prediction)

    def write_volume(self, folder: Path, volume: Any, site: Site) -> Path:
        """--phase test: write one predicted volume (`federated.evaluation.Volume`) into `folder`;
        fastMRI's submission layout, an HDF5 file with dataset ``reconstruction`` (S, H, W)."""
        import h5py
        path = folder / (volume_stem(volume.fname) + ".h5")
        with h5py.File(path, "w") as f:
            f.create_dataset("reconstruction", data=volume.reconstruction.astype(np.float32))
        return path

    def figure_images(self, volume: Any, index: int, method: str) -> dict[str, np.ndarray]:
        """The images beside the reference in the test figure, for slice `index` of `volume`."""
        return {self.baseline_name.replace("_", "-"): volume.baseline[index], method: volume.reconstruction[index]}

    def notes(self) -> list[str]:
        """Lines for the run's log about the data (e.g. subjects skipped), after the clients are built."""
        return []

    def eval_loss_sum(self, samples: Any, output: torch.Tensor) -> float:
        """Sum over the batch's slices of the per-slice training loss (for the `loss` column of
        validation rows); only called for samples with a target."""
        raise NotImplementedError

    @staticmethod
    def has_target(samples: Any) -> bool:
        """Files without a reference give a (B, 1) placeholder target, as in fastMRI."""
        return samples.target.dim() == 3

    @staticmethod
    def names(samples: Any) -> tuple[list[str], list[int]]:
        """File names and slice numbers of the batch's slices."""
        return list(samples.fname), [int(s) for s in samples.slice_num]

    def parts(self, samples: Any) -> list[str]:
        """Per slice of the batch, the part of its site it is scored in (synthesis: the slice's
        translation, "T1->T2"); evaluation reports each part of a site separately. "": one part."""
        return [""] * len(samples.slice_num)


def volume_stem(fname: str) -> str:
    """A volume's file name without .h5 / .nii / .nii.gz: the name of its outputs."""
    for suffix in (".nii.gz", ".nii", ".h5"):
        if fname.endswith(suffix):
            return fname[: -len(suffix)]
    return fname
