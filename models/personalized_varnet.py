"""E2E-VarNet with pFLSynth-style personalisation in its cascades (`--strategy pfl --model varnet`).

One mapper turns the code (one-hot of the site) into a style latent w; every cascade's regulariser
is a `StyledUnet` (the U-Net with a personalisation block after each stage, `models.personalized_unet`)
driven by that w. The sensitivity network and the data-consistency weights carry no blocks.

The VarNet's own state_dict keys are unchanged; the additions live under ``mapper.`` and
``cascades.{c}.model.unet.personal_blocks.{i}.``.
"""
from __future__ import annotations

import torch

from models.personalized_unet import Mapper, StyledUnet, style_latent
from models.varnet import VarNet

CASCADE_UNET = "cascades.{}.model.unet."


class PersonalizedVarNet(VarNet):
    """`VarNet` whose cascades' U-Nets are `StyledUnet`s sharing one mapper: ``forward(kspace, mask,
    num_low_frequencies, code)``, shapes as `VarNet.forward`, code ``(code_size,)`` or ``(B, code_size)``."""

    def __init__(self, code_size: int, num_cascades: int = 12, sens_chans: int = 8, sens_pools: int = 4,
                 chans: int = 18, pools: int = 4, norm: str = "instance", latent_dim: int = 512):
        """
        Args:
            code_size: length of the code vector (the number of sites).
            latent_dim: width of the style latent w.
            The others: as `VarNet`.
        """
        super().__init__(num_cascades=num_cascades, sens_chans=sens_chans, sens_pools=sens_pools, chans=chans,
                         pools=pools, norm=norm)
        self.code_size = code_size
        self.mapper = Mapper(code_size, latent_dim)
        for cascade in self.cascades:
            cascade.model.unet = StyledUnet(in_chans=2, out_chans=2, chans=chans, num_pool_layers=pools, norm=norm,
                                            latent_dim=latent_dim)
        # What `pfl` averages besides the stages it is told to share: the mapper, and the parts with
        # no personalisation block (the sensitivity network, each cascade's data-consistency weight).
        self.always_shared_prefixes = ("mapper.", "sens_net.", *(f"cascades.{c}.dc_weight" for c in range(num_cascades)))

    def stages(self) -> list[list[str]]:
        """The key prefixes of each U-Net stage, across the cascades: stage i holds stage i of every
        cascade's U-Net (`StyledUnet.stages` order: the down blocks, the bottleneck, the up blocks)."""
        per_cascade = [cascade.model.unet.stages() for cascade in self.cascades]
        return [[CASCADE_UNET.format(c) + p for c, stages in enumerate(per_cascade) for p in stages[i]]
                for i in range(len(per_cascade[0]))]

    def fastmri_keys(self) -> list[str]:
        """`VarNet.fastmri_keys` without the mapper and the cascades' personalisation blocks."""
        return [k for k in super().fastmri_keys() if not k.startswith("mapper.") and ".personal_blocks." not in k]

    def forward(self, masked_kspace: torch.Tensor, mask: torch.Tensor,
                num_low_frequencies: int | torch.Tensor | None, code: torch.Tensor) -> torch.Tensor:
        """Complex ``(B, C, H, W)`` k-space, bool ``(B, 1, 1, W)`` mask, ACS widths, code -> real
        ``(B, H, W)`` RSS image."""
        return super().forward(masked_kspace, mask, num_low_frequencies,
                               style_latent(self.mapper, code, len(masked_kspace)))
