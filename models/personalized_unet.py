"""The fastMRI U-Net with pFLSynth-style personalisation (Dalmaz et al., Medical Image Analysis).

A mapper MLP turns a code vector (one-hot of the site, optionally concatenated with one-hots of the
sequence) into a style latent w. After every U-Net stage -- each down block, the bottleneck and
each up block -- a personalisation block modulates the stage output with w: AdaIN (instance norm,
then (1 + gamma) * x + beta) followed by channel gating.

`StyledUnet` is the U-Net with the blocks, driven by a latent it is given (E2E-VarNet's cascades
share one mapper, `models.personalized_varnet`); `PersonalizedUnet` adds the mapper. The U-Net's
own state_dict keys are unchanged (`Unet.encoder_prefixes`, `Unet.decoder_prefixes`); the additions
live under ``mapper.`` and ``personal_blocks.{i}.`` with i the stage index in `stages()` order.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.unet import Norm, Unet, _pad_to_skip


class Mapper(nn.Module):
    """MLP from a code vector (B, code_size) to the style latent (B, latent_dim)."""

    def __init__(self, code_size: int, latent_dim: int = 512, layers: int = 2):
        super().__init__()
        blocks: list[nn.Module] = []
        width = code_size
        for _ in range(layers):
            blocks += [nn.Linear(width, latent_dim), nn.LeakyReLU(0.2)]
            width = latent_dim
        self.layers = nn.Sequential(*blocks)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        """(B, code_size) -> (B, latent_dim)."""
        return self.layers(code)


class PersonalizationBlock(nn.Module):
    """AdaIN and channel gating of a (B, C, H, W) feature map, driven by a (B, latent_dim) latent.

    AdaIN: instance norm, then (1 + gamma) * x + beta with gamma, beta = Linear(latent_dim, C)(w),
    both zero at initialisation.
    Gating: x * sigmoid(FC(C/8 -> C)(ReLU(FC(latent_dim -> C/8)(w)))), per channel.
    """

    def __init__(self, channels: int, latent_dim: int = 512):
        super().__init__()
        self.gamma = nn.Linear(latent_dim, channels)
        self.beta = nn.Linear(latent_dim, channels)
        hidden = max(1, channels // 8)
        # gamma = beta = 0 at the start: each block begins as a plain instance norm and learns its
        # modulation; random modulations at initialisation slowed reconstruction training markedly.
        for layer in (self.gamma, self.beta):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.gate = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), w (B, latent_dim) -> (B, C, H, W)."""
        scale = 1 + self.gamma(w)[:, :, None, None]
        shift = self.beta(w)[:, :, None, None]
        x = scale * F.instance_norm(x) + shift
        return x * self.gate(w)[:, :, None, None]


class StyledUnet(Unet):
    """`Unet` with one personalisation block after each of its 2 * num_pool_layers + 1 stages, driven
    by a style latent w given with every pass: ``forward(image, w)``."""

    def __init__(self, in_chans: int = 1, out_chans: int = 1, chans: int = 32, num_pool_layers: int = 4,
                 drop_prob: float = 0.0, norm: Norm = "instance", latent_dim: int = 512):
        """
        Args:
            latent_dim: width of the style latent w.
            The others: as `Unet`.
        """
        super().__init__(in_chans, out_chans, chans, num_pool_layers, drop_prob, norm)
        down = [chans * 2**i for i in range(num_pool_layers)]
        channels = down + [chans * 2**num_pool_layers] + down[::-1]
        self.personal_blocks = nn.ModuleList([PersonalizationBlock(c, latent_dim) for c in channels])

    def stages(self) -> list[list[str]]:
        """The state_dict key prefixes of each U-Net stage in forward order: the down blocks, the
        bottleneck, then the up blocks (transposed conv and conv block; the last one with the head)."""
        n = self.num_pool_layers
        return ([[f"down_sample_layers.{i}."] for i in range(n)] + [["conv."]]
                + [[f"up_transpose_conv.{i}.", f"up_conv.{i}."] for i in range(n)])

    def fastmri_keys(self) -> list[str]:
        """`Unet.fastmri_keys` without the personalisation blocks."""
        return [k for k in super().fastmri_keys() if not k.startswith("personal_blocks.")]

    def _encode_personal(self, image: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Down path and bottleneck, each stage personalised: (latent, skips, shallowest first)."""
        skips = []
        output = image
        for block, personal in zip(self.down_sample_layers, self.personal_blocks):
            output = personal(block(output), w)
            skips.append(output)
            output = F.avg_pool2d(output, kernel_size=2, stride=2, padding=0)
        return self.personal_blocks[self.num_pool_layers](self.conv(output), w), skips

    def _decode_personal(self, latent: torch.Tensor, skips: list[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
        """Up path, each stage personalised before the head: -> (B, out_chans, H, W)."""
        output = latent
        personal = self.personal_blocks[self.num_pool_layers + 1:]
        last = self.num_pool_layers - 1
        for i, (transpose_conv, block, skip) in enumerate(zip(self.up_transpose_conv, self.up_conv, reversed(skips))):
            output = torch.cat([_pad_to_skip(transpose_conv(output), skip), skip], dim=1)
            # The last up block ends with the 1x1 head; the personalisation acts on its features.
            conv_block, head = (block[0], block[1]) if i == last else (block, nn.Identity())
            output = head(personal[i](conv_block(output), w))
        return output

    def forward(self, image: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) and w (B, latent_dim) -> (B, out_chans, H, W)."""
        latent, skips = self._encode_personal(image, w)
        return self._decode_personal(latent, skips, w)


def style_latent(mapper: Mapper, code: torch.Tensor, batch: int) -> torch.Tensor:
    """(code_size,) or (B, code_size) code -> (B, latent_dim) style latent."""
    if code.dim() == 1:
        code = code.expand(batch, -1)
    return mapper(code)


class PersonalizedUnet(StyledUnet):
    """`StyledUnet` plus the mapper that makes its style latent from a code: ``forward(image, code)``."""

    always_shared_prefixes: tuple[str, ...] = ("mapper.",)  # averaged by `pfl` whatever --pfl_shared says

    def __init__(self, code_size: int, in_chans: int = 1, out_chans: int = 1, chans: int = 32,
                 num_pool_layers: int = 4, drop_prob: float = 0.0, norm: Norm = "instance",
                 latent_dim: int = 512):
        """
        Args:
            code_size: length of the code vector (number of sites, plus sequences when coded).
            The others: as `StyledUnet`.
        """
        super().__init__(in_chans, out_chans, chans, num_pool_layers, drop_prob, norm, latent_dim)
        self.code_size = code_size
        self.mapper = Mapper(code_size, latent_dim)

    def fastmri_keys(self) -> list[str]:
        """`StyledUnet.fastmri_keys` without the mapper."""
        return [k for k in super().fastmri_keys() if not k.startswith("mapper.")]

    def encode(self, image: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) and code -> the personalised bottleneck output (B, latent_channels, h, w)."""
        return self._encode_personal(image, style_latent(self.mapper, code, len(image)))[0]

    def forward_with_latent(self, image: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, in_chans, H, W) and code -> output (B, out_chans, H, W) and latent as `encode`."""
        w = style_latent(self.mapper, code, len(image))
        latent, skips = self._encode_personal(image, w)
        return self._decode_personal(latent, skips, w), latent

    def forward(self, image: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) and code (code_size,) or (B, code_size) -> (B, out_chans, H, W)."""
        return self.forward_with_latent(image, code)[0]
