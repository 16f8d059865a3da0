"""The conditional PatchGAN discriminator of pix2pix, as pFLSynth uses it (``--which_model_netD basic``).

It sees the source image and a target-contrast image (real or synthesised) stacked as channels and
scores every 70 x 70 patch: at n_layers 3 a 256 x 256 pair gives a (B, 1, 30, 30) map of logits.
Module names follow pix2pix's ``NLayerDiscriminator`` (``model.{i}``), so pFLSynth's
``*_net_D_1.pth`` / ``*_net_D_2.pth`` load with ``load_state_dict``.
"""
from __future__ import annotations

import torch
from torch import nn

from models.pflsynth import init_weights
from models.unet import Norm, make_norm


class PatchDiscriminator(nn.Module):
    """C64 (4x4 stride 2, no norm) - C128 - C256 (stride 2) - C512 (stride 1) - 1-channel 4x4 conv,
    LeakyReLU(0.2) between, norm on all but the first and last (pFLSynth: BatchNorm)."""

    def __init__(self, in_chans: int = 2, ndf: int = 64, n_layers: int = 3, norm: Norm = "batch"):
        """
        Args:
            in_chans: channels of the stacked (source, target) input: 2 for 1-channel images.
            ndf: channels of the first layer (pFLSynth: 64); doubled per layer, at most 8 ndf.
            n_layers: stride-2 layers after the first (pFLSynth: 3).
            norm: "batch", "instance" or "instance_affine" (`models.unet.make_norm`).
        """
        super().__init__()
        bias = norm != "batch"
        layers: list[nn.Module] = [nn.Conv2d(in_chans, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=bias),
                       make_norm(norm, ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, source: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """source (B, 1, H, W) and real or synthesised target (B, 1, H, W) -> (B, 1, h, w) logits."""
        return self.model(torch.cat([source, image], dim=1))
