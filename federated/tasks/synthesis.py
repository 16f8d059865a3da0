"""Multi-contrast MRI synthesis, pFLSynth's task: translate a source-contrast slice into the same
subject's target-contrast slice (``--task synthesis --source_contrast T1 --target_contrast T2``).

Sample: the registered source and target slices of a subject (`data.paired`), each min-max scaled to
[-1, 1] as pFLSynth's loader does, and the translation's one-hot code. Model: pFLSynth's ResNet
generator without personalisation (`models.pflsynth.ResnetGenerator`; `--strategy pflsynth` uses the
personalised one). Training: the conditional GAN of pix2pix / pFLSynth -- every client keeps one
PatchGAN per translation task, never shared (`federated.site_discriminators`), and each local step
updates it before the generator's LSGAN + lambda_l1 * L1 step. Adam 2e-4, betas (0.5, 0.999),
constant for --niter rounds then linear decay over --niter_decay.

Evaluation: each synthesised slice is put back on its real target's intensity scale; per volume,
PSNR and SSIM against the real target with both scaled to [0, 1] by that target's range, over the
whole image (``psnr``, ``ssim``: what the tables show, pFLSynth's protocol) and inside the head
(``psnr_head``, ``ssim_head``). The baseline is the identity: the source slice itself, min-max
matched to the target slice's range.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from data.paired import (ContrastSlices, ContrastSliceDataset, Subject, check_contrasts, match_subjects,
                         subject_name)
from data.translation import Translation, parse_translation, translation
from data.sites import Site
from federated.site_discriminators import SiteDiscriminators
from federated.tasks.base import Batch, Task, VolumeParts
from models.patchgan import PatchDiscriminator
from models.pflsynth import CONTRASTS, PersonalizedGenerator, ResnetGenerator
from models.synthesis_losses import SynthesisHyperparameters, constant_then_linear_decay
from utils.errors import UserError
from utils.synthesis_metrics import synthesis_metrics


class SynthesisSample(NamedTuple):
    """One slice of a translation task; a batch stacks every field."""

    source: torch.Tensor  # (H, W) in [-1, 1]
    target: torch.Tensor  # (H, W) in [-1, 1]
    translation: torch.Tensor  # (2 K,) one-hot source contrast | one-hot target contrast (K contrasts)
    task: int  # index of the translation among the site's tasks (its discriminator)
    target_range: torch.Tensor  # (2,) min and max of the real target slice
    fname: str  # the subject
    slice_num: int


class SynthesisTransform:
    """`ContrastSlices` -> `SynthesisSample` of one of a site's translations: the sample's seed
    draws it when training on several; evaluation asks for one (`index`)."""

    def __init__(self, translations: list[Translation], contrasts: tuple[str, ...], train: bool, index: int = 0):
        self.translations, self.contrasts, self.train, self.index = translations, contrasts, train, index

    def __call__(self, slices: ContrastSlices) -> SynthesisSample:
        index = self.index
        if self.train and len(self.translations) > 1 and slices.seed is not None:
            index = int(np.random.default_rng(slices.seed).integers(len(self.translations)))
        source, target = self.translations[index]
        code = torch.zeros(2 * len(self.contrasts))
        code[self.contrasts.index(source)] = 1.0
        code[len(self.contrasts) + self.contrasts.index(target)] = 1.0
        return SynthesisSample(torch.from_numpy(slices.images[source]), torch.from_numpy(slices.images[target]),
                               code, index, torch.tensor(slices.ranges[target], dtype=torch.float32),
                               slices.subject, slices.slice_num)


def site_tasks(values: list[str] | None) -> dict[str, list[Translation]]:
    """--site_tasks ["I=T1->T2,T2->PD", ...] -> {"I": [T1->T2, T2->PD], ...}; UserError naming the flag."""
    out: dict[str, list[Translation]] = {}
    for value in values or []:
        site, sep, tasks = value.partition("=")
        if not sep or not site or not tasks:
            raise UserError(f"--site_tasks {value!r}: write SITE=TASK[,TASK], e.g. I=T1->T2,T2->PD")
        out[site] = list(dict.fromkeys(parse_translation(t, f"--site_tasks {site}") for t in tasks.split(",")))
    return out


class Synthesis(Task):
    name = "synthesis"
    summary = "contrast synthesis with pFLSynth's generator and a local PatchGAN per client and task"
    dpsgd_refusal = ("--task synthesis with DP-SGD: its adversarial loss trains local discriminators on "
                     "the client's images outside the per-sample clipping; drop --dpsgd_noise")
    baseline_name = "identity"
    # pflsynth_shared_blocks too: the strategy exists only for this task, and its split must match the checkpoint's.
    model_options = ("ngf", "ndf", "n_blocks", "mapping_layers", "no_dropout", "source_contrast", "target_contrast",
                     "site_tasks", "pflsynth_shared_blocks")
    # pFLSynth's sizes, optimiser and loop: batch size 1, one local epoch per round, 75 + 75 rounds.
    # The demo: small networks on 64 x 64 sites, still batch size 1, constant then decaying lr.
    paper_defaults = {"ngf": 64, "ndf": 64, "lr": 2e-4, "optimizer": "adam", "local_bs": 1, "local_ep": 1,
                      "epochs": 150, "niter": 75, "niter_decay": 75}
    demo_defaults = {"ngf": 16, "ndf": 16, "resolution": 64, "epochs": 10, "niter": 5, "niter_decay": 5}

    def __init__(self, opts):
        super().__init__(opts)
        self._translations: dict[str, list[Translation]] = {}
        self._subjects: dict[tuple[str, str], Subject] = {}  # (site, subject) -> its files
        self._notes: list[str] = []

    @classmethod
    def add_arguments(cls, group) -> None:
        group.add_argument("--source_contrast", default="T1", help="contrast folder the generator reads")
        group.add_argument("--target_contrast", default="T2", help="contrast folder it synthesises")
        group.add_argument("--site_tasks", nargs="+", default=None, metavar="SITE=TASK[,TASK]",
                           help="per-site translations (pFLSynth's variable-task setting), e.g. "
                                "I=T1->T2,T2->PD B=T1->T2,FLAIR->T2; replaces a sites file's \"tasks\" for "
                                "the sites named; the others keep theirs or the run's")
        group.add_argument("--ngf", type=int, default=None, help="generator channels of the first stage (pFLSynth: 64; demo 16)")
        group.add_argument("--ndf", type=int, default=None, help="discriminator channels of the first layer (pFLSynth: 64; demo 16)")
        group.add_argument("--n_blocks", type=int, default=9, help="generator residual blocks (pFLSynth: 9)")
        group.add_argument("--mapping_layers", type=int, default=6, help="pflsynth mapper depth (pFLSynth: 6)")
        group.add_argument("--no_dropout", action="store_true", help="no Dropout(0.5) in the residual blocks")
        group.add_argument("--lambda_l1", type=float, default=100.0, help="weight of the L1 term (pFLSynth's --lambda_A)")
        group.add_argument("--lambda_gan", type=float, default=1.0,
                           help="weight of the LSGAN terms (pFLSynth's --lambda_adv)")
        group.add_argument("--niter", type=int, default=75, help="rounds at the initial learning rate")
        group.add_argument("--niter_decay", type=int, default=75, help="rounds of linear decay after them")

    # ---- options and data ----------------------------------------------------------------------
    def check_options(self) -> None:
        o = self.opts
        translation(o.source_contrast, o.target_contrast, "--source_contrast/--target_contrast")
        if o.resolution is not None and (o.resolution < 32 or o.resolution % 4):
            raise UserError(f"--resolution {o.resolution}: synthesis needs a multiple of 4, at least 32")
        for flag in ("ngf", "ndf", "n_blocks", "mapping_layers"):
            if getattr(o, flag) < 1:
                raise UserError(f"--{flag} {getattr(o, flag)}: must be at least 1")
        if getattr(o, "aug_on", False):
            raise UserError("--aug_on: MRAugment augments k-space for reconstruction; --task synthesis has no "
                            "augmentation yet: leave --aug_on out")
        site_tasks(o.site_tasks)
        if o.niter < 0 or o.niter_decay < 0:
            raise UserError("--niter and --niter_decay must be 0 or more")
        o.sequence = o.source_contrast  # the contrast whose folders list a site's subjects

    @property
    def hp(self) -> SynthesisHyperparameters:
        o = self.opts
        return SynthesisHyperparameters(lr=o.lr, lambda_l1=o.lambda_l1, lambda_adv=o.lambda_gan,
                                        constant_rounds=o.niter, decay_rounds=o.niter_decay)

    @property
    def contrasts(self) -> tuple[str, ...]:
        """The contrasts the code one-hots cover: pFLSynth's four, then any other the run names."""
        named = (self.opts.source_contrast, self.opts.target_contrast)
        return CONTRASTS + tuple(sorted(set(named) - set(CONTRASTS)))

    def translations(self, site: Site) -> list[Translation]:
        """The site's translation tasks: --site_tasks', its own (a sites file's "tasks") or the run's one."""
        return (site_tasks(self.opts.site_tasks).get(site.name) or list(site.tasks)
                or [Translation(self.opts.source_contrast, self.opts.target_contrast)])

    def check_site(self, site: Site) -> None:
        tasks = self.translations(site)
        unknown = sorted({c for t in tasks for c in t} - set(self.contrasts))
        if unknown:
            raise UserError(f"site '{site.name}' tasks {', '.join(map(str, tasks))}: contrast {', '.join(unknown)} "
                            f"has no place in the task code (it covers {', '.join(self.contrasts)}); name it "
                            "with --source_contrast/--target_contrast or use one of those")
        check_contrasts(site, tasks)

    def dataset(self, site: Site, files: list[Path], train: bool, mask_func: Any) -> torch.utils.data.Dataset:
        """The subjects of ``files`` (volumes of the source contrast) that have every contrast of the
        site's translations; the others are skipped and named in `notes`. Training draws one of the
        site's translations per slice; evaluation has every slice once per translation, translation
        after translation (scored separately: `parts`)."""
        tasks = self._translations.setdefault(site.name, self.translations(site))
        contrasts = list(dict.fromkeys(c for t in tasks for c in t))
        split = files[0].parent.name
        matching = match_subjects(site, contrasts, split)
        wanted = {subject_name(f, f.parent.parent.name) for f in files}
        subjects = [s for s in matching.subjects if s.name in wanted]
        skipped = sorted(wanted & set(matching.skipped))
        if skipped:
            shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
            self._notes.append(f"site {site.name} {split}: {len(skipped)} subject(s) without all of "
                               f"{', '.join(contrasts)} skipped: {shown}")
        if not subjects:
            raise UserError(f"site '{site.name}' {split}: none of its {len(files)} selected subjects has all of "
                            f"{', '.join(contrasts)}; raise --sample_rate or check the contrast folders")
        self._subjects.update({(site.name, s.name): s for s in subjects})
        if train:
            return ContrastSliceDataset(site, subjects, contrasts, resolution=self.opts.resolution,
                                        transform=SynthesisTransform(tasks, self.contrasts, train))
        return torch.utils.data.ConcatDataset([
            ContrastSliceDataset(site, subjects, contrasts, resolution=self.opts.resolution,
                                 transform=SynthesisTransform(tasks, self.contrasts, train, index))
            for index in range(len(tasks))])

    def notes(self) -> list[str]:
        return list(self._notes)

    def to_device(self, samples: SynthesisSample, device: torch.device) -> Batch:
        source = samples.source.unsqueeze(1).to(device, non_blocking=True)
        target = samples.target.unsqueeze(1).to(device, non_blocking=True)
        return Batch(inputs=(source, samples.translation.to(device, non_blocking=True)), target=target,
                     samples=samples)

    # ---- models --------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        o = self.opts
        return ResnetGenerator(o.ngf, o.n_blocks, "batch", dropout=not o.no_dropout)

    def build_pflsynth_model(self, num_sites: int) -> PersonalizedGenerator:
        """pFLSynth's personalised generator: its code is one-hot site | the sample's translation code."""
        o = self.opts
        return PersonalizedGenerator(num_sites, len(self.contrasts), o.ngf, o.n_blocks, "batch",
                                     dropout=not o.no_dropout, mapping_layers=o.mapping_layers)

    def build_personalized_model(self, code_size: int) -> nn.Module:
        raise UserError("--strategy pfl adapts pFLSynth's blocks to reconstruction; for --task synthesis "
                        "use --strategy pflsynth (pFLSynth itself)")

    def is_encoder(self, key: str) -> bool:
        """The encoder and the residual blocks (FedMRI shares them; the decoder stays local)."""
        return key.startswith(tuple(f"model_{i}." for i in range(1, 4 + self.opts.n_blocks)))

    def forward(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return model(inputs[0])

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.opts.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.opts.lr, betas=self.hp.betas)
        return super().make_optimizer(params)

    def make_scheduler(self, optimizer):
        return constant_then_linear_decay(optimizer, self.hp)

    # ---- the GAN step and the discriminators each client keeps ---------------------------------
    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The supervised part alone: lambda_l1 * L1."""
        return nn.functional.l1_loss(output, batch.target) * self.opts.lambda_l1

    def training_loss(self, client, model, batch, forward):
        synthesised = forward(batch.inputs)
        source, task = batch.inputs[0], batch.samples.task.to(synthesised.device)
        discriminators: SiteDiscriminators = client.extra["discriminators"]
        d_loss = discriminators.step(source, batch.target, synthesised, task)
        loss, logs = discriminators.generator_loss(source, batch.target, synthesised, task)
        return loss, {**logs, "d_loss": d_loss}

    def init_client(self, client, model: nn.Module) -> None:
        device = next(model.parameters()).device
        tasks = len(self._translations[client.site])
        # Its own seed: making discriminators must not shift the random numbers the generator uses.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.opts.seed * 1_000_003 + zlib.crc32(f"discriminators-{client.name}".encode()))
            client.extra["discriminators"] = SiteDiscriminators(
                tasks, lambda: PatchDiscriminator(ndf=self.opts.ndf), self.hp, device)

    def client_state(self, client) -> dict:
        return {"discriminators": client.extra["discriminators"].state_dict()}

    def load_client_state(self, client, state: dict) -> None:
        if state:
            client.extra["discriminators"].load_state_dict(state["discriminators"])

    def end_local(self, client) -> None:
        client.extra["discriminators"].end_round()

    # ---- evaluation ----------------------------------------------------------------------------
    def volume_parts(self, samples: SynthesisSample, output: torch.Tensor | None) -> VolumeParts:
        low = samples.target_range[:, 0, None, None]
        span = samples.target_range[:, 1, None, None] - low

        def original(x: torch.Tensor) -> np.ndarray:
            return (low + (x + 1) / 2 * span).numpy().astype(np.float32)

        synthesised = np.zeros(samples.source.shape, np.float32) if output is None else original(output.squeeze(1))
        return VolumeParts(synthesised, original(samples.target), original(samples.source))

    def write_volume(self, folder: Path, volume, site: Site) -> Path:
        """The synthesised volume beside its source's format: NIfTI (slices on the last axis, the real
        target's affine when the volume has the target file's shape) for NIfTI sites, else HDF5 with
        dataset ``synthesis`` (S, H, W)."""
        subject = self._subjects[(site.name, volume.fname)]
        target_file = subject.files[parse_translation(volume.part, "synthesis part").target]
        data = volume.reconstruction.astype(np.float32)
        if target_file.name.endswith((".nii", ".nii.gz")):
            import nibabel as nib
            reference = nib.load(target_file)
            stack = np.ascontiguousarray(np.transpose(data, (1, 2, 0)))  # (H, W, S): a slice is [:, :, s]
            affine = reference.affine if stack.shape == reference.shape else np.eye(4)
            path = folder / f"{volume.fname}.nii.gz"
            nib.save(nib.Nifti1Image(stack, affine), path)
            return path
        import h5py
        path = folder / f"{volume.fname}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("synthesis", data=data)
        return path

    def figure_images(self, volume, index: int, method: str) -> dict[str, np.ndarray]:
        """Source (intensity-matched, the identity baseline) and the synthesis."""
        return {"source (identity)": volume.baseline[index], method: volume.reconstruction[index]}

    def volume_metrics(self, target: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
        return synthesis_metrics(target, prediction)

    def parts(self, samples: SynthesisSample) -> list[str]:
        """Each slice's translation ("T1->T2"), read from its one-hot code."""
        k = len(self.contrasts)
        return [f"{self.contrasts[int(code[:k].argmax())]}->{self.contrasts[int(code[k:].argmax())]}"
                for code in samples.translation]

    def eval_loss_sum(self, samples: SynthesisSample, output: torch.Tensor) -> float:
        return (output.squeeze(1) - samples.target).abs().mean(dim=(1, 2)).sum().item() * self.opts.lambda_l1
