"""Reconstruction with fastMRI's E2E-VarNet on multicoil k-space.

Sample: fastMRI's `VarNetDataTransform` (masked k-space, mask, ACS width, RSS target, volume max,
crop size). The model's RSS output is centre-cropped to the target before the loss and evaluation.
Loss: fastMRI's SSIMLoss with each volume's max as data range. Optimiser: Adam at 3e-4 with StepLR
(40 rounds, 0.1), fastMRI's VarNet module defaults; --optimizer/--lr/--lr_step override them.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from data.transforms import VarNetDataTransform, VarNetSample, center_crop, ifft2c, rss
from federated.tasks.base import Batch, Task, VolumeParts
from models.ssim_loss import SSIMLoss
from models.personalized_varnet import PersonalizedVarNet
from models.varnet import VarNet, load_pretrained_varnet, pretrained_varnet_architecture
from utils.errors import UserError

# The down path and bottleneck of every U-Net inside the VarNet (the cascades' and the sensitivity
# network's): what FedMRI shares.
ENCODER_KEY = re.compile(r"(^|\.)unet\.(down_sample_layers|conv)\.")


class VarNetReconstruction(Task):
    name = "varnet"
    summary = "fastMRI's E2E-VarNet on multicoil k-space (SSIM loss, Adam)"
    # Checked: each cascade holds its data-consistency weight in a module whose forward takes four
    # inputs; Opacus's per-sample fallback (functorch) replays it with one and fails (TypeError).
    dpsgd_refusal = ("--model varnet with DP-SGD: Opacus cannot compute per-sample gradients through "
                     "VarNet's cascades (their data-consistency weight); use --model unet or drop --dpsgd_noise")
    model_options = ("num_cascades", "chans", "pools", "sens_chans", "sens_pools", "norm")
    # fastMRI's VarNet module; the demo is sized for a few minutes on 2 CPU cores.
    # Multicoil k-space: the synthetic (and the paper's brain) sites that have it are F and H. fastMRI
    # trains its VarNet at batch size 1: slices of different matrix sizes (sites, scanners) cannot
    # share a batch.
    paper_defaults = {"num_cascades": 12, "chans": 18, "pools": 4, "sens_chans": 8, "sens_pools": 4,
                      "lr": 3e-4, "optimizer": "adam", "challenge": "multicoil", "train_dataset": "FH",
                      "local_bs": 1}
    demo_defaults = {"num_cascades": 4, "chans": 8, "sens_chans": 4, "sens_pools": 3, "pools": 3, "local_bs": 4,
                     "resolution": 64, "local_ep": 1, "lr": 1e-3}

    def __init__(self, opts):
        super().__init__(opts)
        self.ssim = SSIMLoss()

    @classmethod
    def add_arguments(cls, group) -> None:
        d, demo = cls.paper_defaults, cls.demo_defaults
        group.add_argument("--num_cascades", type=int, default=None,
                           help=f"VarNet cascades (default {d['num_cascades']}, demo {demo['num_cascades']})")
        group.add_argument("--pools", type=int, default=None,
                           help=f"down-sampling levels of each cascade's U-Net (default 4, demo {demo['pools']})")
        group.add_argument("--sens_chans", type=int, default=None,
                           help=f"channels of the sensitivity U-Net (default {d['sens_chans']}, demo {demo['sens_chans']})")
        group.add_argument("--sens_pools", type=int, default=None,
                           help=f"down-sampling levels of the sensitivity U-Net (default 4, demo {demo['sens_pools']})")

    def check_options(self) -> None:
        for flag in ("num_cascades", "pools", "sens_chans", "sens_pools"):
            if getattr(self.opts, flag) < 1:
                raise UserError(f"--{flag} {getattr(self.opts, flag)}: must be at least 1")

    def check_site(self, site) -> None:
        if site.format != "fastmri_h5" or site.challenge != "multicoil":
            kind = "image-only" if site.format != "fastmri_h5" else "singlecoil"
            raise UserError(f"--model varnet needs multicoil k-space, but site '{site.name}' is {kind}; "
                            "use --challenge multicoil with multicoil fastMRI HDF5 sites, or --model unet")

    def dataset(self, site, files, train: bool, mask_func):
        if train and self.opts.aug_on and self.opts.aug_weight_rot90 > 0 and self.opts.local_bs > 1:
            check_square_kspace(site, files)
        return super().dataset(site, files, train, mask_func)

    def transform(self, site, mask_func, train: bool) -> VarNetDataTransform:
        return VarNetDataTransform(mask_func, use_seed=not train)

    def to_device(self, samples: VarNetSample, device: torch.device) -> Batch:
        crop = (int(samples.crop_size[0][0]), int(samples.crop_size[1][0]))
        inputs = (samples.masked_kspace.to(device, non_blocking=True), samples.mask.to(device, non_blocking=True),
                  samples.num_low_frequencies.to(device), crop)
        return Batch(inputs=inputs, target=samples.target.to(device, non_blocking=True), samples=samples)

    def build_model(self) -> nn.Module:
        o = self.opts
        return VarNet(num_cascades=o.num_cascades, sens_chans=o.sens_chans, sens_pools=o.sens_pools,
                      chans=o.chans, pools=o.pools, norm=o.norm)

    def build_personalized_model(self, code_size: int) -> nn.Module:
        o = self.opts
        return PersonalizedVarNet(code_size, num_cascades=o.num_cascades, sens_chans=o.sens_chans,
                                  sens_pools=o.sens_pools, chans=o.chans, pools=o.pools, norm=o.norm)

    def load_pretrained(self, model: nn.Module, path: Path) -> None:
        load_pretrained_varnet(model, path)

    @classmethod
    def pretrained_options(cls, path: Path) -> dict[str, object]:
        return pretrained_varnet_architecture(path) or {}

    def forward(self, model: nn.Module, inputs) -> torch.Tensor:
        """(B, h, w): the RSS image centre-cropped to the target's size (inputs: the batch's, then
        what a method adds, such as pfl's site code)."""
        kspace, mask, num_low, crop, *extra = inputs
        return center_crop(model(kspace, mask, num_low, *extra), crop)

    def is_encoder(self, key: str) -> bool:
        return bool(ENCODER_KEY.search(key))

    def _ssim_loss(self, output: torch.Tensor, target: torch.Tensor, max_value: torch.Tensor,
                   reduced: bool = True) -> torch.Tensor:
        self.ssim = self.ssim.to(output.device)
        return self.ssim(output.unsqueeze(1), target.unsqueeze(1), max_value.to(output), reduced=reduced)

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self._ssim_loss(output, batch.target, batch.samples.max_value)

    def volume_parts(self, samples: VarNetSample, output: torch.Tensor | None) -> VolumeParts:
        crop = (int(samples.crop_size[0][0]), int(samples.crop_size[1][0]))
        zero_filled = center_crop(rss(ifft2c(samples.masked_kspace), dim=1), crop).numpy()
        recon = output.numpy() if output is not None else zero_filled * 0
        target = samples.target.numpy() if self.has_target(samples) else None
        return VolumeParts(recon, target, zero_filled)

    def eval_loss_sum(self, samples: VarNetSample, output: torch.Tensor) -> float:
        per_position = self._ssim_loss(output, samples.target, samples.max_value.float(), reduced=False)
        return per_position.mean(dim=(1, 2, 3)).sum().item()


def check_square_kspace(site, files) -> None:
    """MRAugment's odd rot90 swaps the sides of non-square k-space, so two slices of one batch can
    differ in shape (VarNet reads the whole k-space): a UserError for such a site."""
    import h5py
    for f in files:
        with h5py.File(f, "r") as hf:
            height, width = hf["kspace"].shape[-2:]
        if height != width:
            raise UserError(f"--aug_weight_rot90 with --local_bs > 1: site {site.name}'s k-space is {height} x {width} "
                            f"({f.name}), and an odd rot90 swaps its sides, so slices of one batch differ in shape; "
                            "use --local_bs 1 (fastMRI's and MRAugment's) or --aug_weight_rot90 0")
