"""Reconstruction with the fastMRI U-Net on magnitude images (the FL-MR / FL-MRCM task).

Sample: fastMRI's `UnetDataTransform` (zero-filled magnitude, RSS over coils, normalised by its own
mean and std). Loss: L1 in normalised units. Optimiser: RMSprop at --lr (1e-4, FL-MRCM's) with StepLR.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from data.transforms import UnetDataTransform, UnetSample
from federated.tasks.base import Batch, Task, VolumeParts
from models.personalized_unet import PersonalizedUnet
from models.unet import Unet, load_pretrained, pretrained_architecture
from utils.errors import UserError


class UnetReconstruction(Task):
    name = "unet"
    summary = "the fastMRI U-Net on zero-filled magnitude images (L1 loss, RMSprop)"
    has_latent = True
    model_options = ("chans", "num_pools", "drop_prob", "norm")
    paper_defaults = {"chans": 32, "lr": 1e-4, "optimizer": "rmsprop"}  # FL-MRCM's
    demo_defaults = {"chans": 16, "lr": 3e-4}

    def check_options(self) -> None:
        o = self.opts
        if o.resolution is not None and o.resolution < 2 ** o.num_pools:
            raise UserError(f"--resolution {o.resolution}: must be at least 2**--num_pools = {2 ** o.num_pools}")

    def transform(self, site, mask_func, train: bool) -> UnetDataTransform:
        res = self.opts.resolution
        return UnetDataTransform(site.challenge, mask_func, use_seed=not train, crop_size=(res, res))

    def to_device(self, samples: UnetSample, device: torch.device) -> Batch:
        image = samples.image.unsqueeze(1).to(device, non_blocking=True)
        target = samples.target.unsqueeze(1).to(device, non_blocking=True)
        return Batch(inputs=(image,), target=target, samples=samples)

    def build_model(self) -> nn.Module:
        o = self.opts
        return Unet(chans=o.chans, num_pool_layers=o.num_pools, drop_prob=o.drop_prob, norm=o.norm)

    def build_personalized_model(self, code_size: int) -> nn.Module:
        o = self.opts
        return PersonalizedUnet(code_size=code_size, chans=o.chans, num_pool_layers=o.num_pools,
                                drop_prob=o.drop_prob, norm=o.norm)

    def load_pretrained(self, model: nn.Module, path: Path) -> None:
        load_pretrained(model, path)

    @classmethod
    def pretrained_options(cls, path: Path) -> dict[str, object]:
        found = pretrained_architecture(path)
        if found is None:
            return {}
        return {"chans": found["chans"], "num_pools": found["num_pool_layers"], "norm": found["norm"]}

    def is_encoder(self, key: str) -> bool:
        """The down path and bottleneck."""
        return key.startswith(Unet.encoder_prefixes)

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.l1_loss(output, batch.target)

    def encode(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return model.encode(*inputs)

    def forward_with_latent(self, model, inputs):
        return model.forward_with_latent(*inputs)

    def volume_parts(self, samples: UnetSample, output: torch.Tensor | None) -> VolumeParts:
        mean = samples.mean[:, None, None]
        std = samples.std[:, None, None]
        if output is None:
            recon = np.zeros(samples.image.shape, dtype=np.float32)
        else:
            recon = (output.squeeze(1) * std + mean).numpy()
        target = (samples.target * std + mean).numpy() if self.has_target(samples) else None
        return VolumeParts(recon, target, (samples.image * std + mean).numpy())

    def eval_loss_sum(self, samples: UnetSample, output: torch.Tensor) -> float:
        return (output.squeeze(1) - samples.target).abs().mean(dim=(1, 2)).sum().item()
