"""pFLSynth's generators for multi-contrast synthesis (Dalmaz et al., Medical Image Analysis 2024).

`ResnetGenerator` is the backbone (pGAN / ResNet style, 1 channel in and out, tanh output):

    model_1            reflect-pad 3, 7x7 conv 1 -> ngf, norm, ReLU
    model_2, model_3   3x3 stride-2 conv (ngf -> 2 ngf -> 4 ngf), norm, ReLU
    model_4..model_12  9 residual blocks at 4 ngf: [pad, 3x3 conv, norm, ReLU, Dropout(0.5),
                       pad, 3x3 conv, norm] plus the identity
    model_13, model_14 3x3 stride-2 transposed conv (4 ngf -> 2 ngf -> ngf), norm, ReLU
    model_15           reflect-pad 3, 7x7 conv ngf -> 1 (with bias), tanh

`PersonalizedGenerator` adds pFLSynth's mapper (one-hot site | source | target -> 512-d latent w)
and a personalisation block after every stage but the last (14 at 9 blocks): instance norm, then
(1 + gamma) x + beta with [gamma, beta] from w (AdaIN / "STIN"), then a channel gate
sigmoid(FC(ReLU(FC(w)))) that depends on w only (AdaCW / "STCA").

Module names follow pFLSynth's ``personalized_generator``, so its state_dict keys are ours and a
pFLSynth ``*_net_G.pth`` loads with ``load_state_dict``. Its partial aggregation is `is_shared`.

One deliberate difference, in the mapper's initialisation: pFLSynth's ``init_weights`` matches
every class whose name contains "Linear", so it also re-draws the mapper's equalized-learning-rate
weights from N(0, 0.02). Six such layers (effective weights ~1e-5 each) scale the latent down to
about 1e-20: at the start no style depends on the site or task code, and the mapper's gradients
vanish with it. Here the mapper keeps its equalized initialisation (N(0, 1 / lrmul), scaled at run
time, as StyleGAN's mapper intends), so the latent carries the code from the first step. Every
other layer is initialised as in pFLSynth, the style layers included: each personalisation block
starts close to a plain instance norm with a gate of about 0.5.

Why not `models.personalized_unet.PersonalizationBlock`: that block has separate gamma/beta
``nn.Linear`` layers initialised to zero and a gate with biases, behind a 2-layer plain-``Linear``
mapper; pFLSynth's has one equalized 512 -> 2C style layer, a bias-free gate and a 6-layer
equalized mapper with a 0.01 learning-rate multiplier. The two differ in parameters, in training
dynamics and in state_dict keys, so pFLSynth checkpoints could not load into the U-Net's blocks.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from models.unet import Norm, make_norm

# pFLSynth's one-hot order of contrasts for the source and target parts of the code.
CONTRASTS: tuple[str, ...] = ("T1", "T2", "PD", "FLAIR")
LATENT_DIM = 512


class ResidualBlock(nn.Module):
    """(B, C, H, W) -> x + conv_block(x), with reflect padding; dropout between the two convs."""

    def __init__(self, channels: int, norm: Norm, dropout: bool):
        super().__init__()
        bias = norm != "batch"  # a BatchNorm's shift makes the conv bias redundant
        layers: list[nn.Module] = [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias),
                                   make_norm(norm, channels), nn.ReLU(True)]
        if dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias), make_norm(norm, channels)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """The plain backbone: (B, 1, H, W) in [-1, 1] -> (B, 1, H, W) in (-1, 1); H, W multiples of 4.

    Stages are ``model_1`` .. ``model_{6 + n_blocks}`` (`stage_names`), as in pFLSynth.
    """

    def __init__(self, ngf: int = 64, n_blocks: int = 9, norm: Norm = "batch", dropout: bool = True):
        """
        Args:
            ngf: channels of the first stage (pFLSynth: 64); the residual blocks have 4 ngf.
            n_blocks: residual blocks (pFLSynth: 9).
            norm: "batch" (pFLSynth's scripts), "instance" or "instance_affine" (`models.unet.make_norm`).
            dropout: Dropout(0.5) inside every residual block (pFLSynth: on; off in eval mode).
        """
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
        self.ngf, self.n_blocks = ngf, n_blocks
        bias = norm != "batch"
        stages: list[nn.Module] = [
            nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(1, ngf, 7, bias=bias), make_norm(norm, ngf), nn.ReLU(True)),
            *(nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=bias), make_norm(norm, 2 * c),
                            nn.ReLU(True))
              for c in (ngf, 2 * ngf)),
            *(ResidualBlock(4 * ngf, norm, dropout) for _ in range(n_blocks)),
            *(nn.Sequential(nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                            make_norm(norm, c // 2), nn.ReLU(True))
              for c in (4 * ngf, 2 * ngf)),
            nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(ngf, 1, 7), nn.Tanh()),
        ]
        for name, stage in zip(self.stage_names(), stages):
            self.add_module(name, stage)
        init_weights(self)

    def stage_names(self) -> list[str]:
        """``model_1`` .. ``model_{6 + n_blocks}`` in forward order."""
        return [f"model_{i}" for i in range(1, self.n_blocks + 7)]

    def stage_channels(self) -> list[int]:
        """Output channels of every stage but the last: where personalisation blocks sit."""
        return [self.ngf, 2 * self.ngf] + [4 * self.ngf] * (self.n_blocks + 1) + [2 * self.ngf, self.ngf]

    def stages(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.stage_names()]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, 1, H, W)."""
        x = image
        for stage in self.stages():
            x = stage(x)
        return x


class EqualizedLinear(nn.Module):
    """StyleGAN's linear layer with equalized learning rate: y = x (w_mul W)^T + b_mul b.

    W ~ N(0, 1 / lrmul^2) is stored, w_mul = gain / sqrt(in) * lrmul applied at run time, so
    Adam's steps on W move the effective weights by lrmul relative to their scale.
    """

    def __init__(self, in_features: int, out_features: int, gain: float = math.sqrt(2), lrmul: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lrmul)
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.w_mul = gain / math.sqrt(in_features) * lrmul
        self.b_mul = lrmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_features) -> (B, out_features)."""
        return F.linear(x, self.weight * self.w_mul, self.bias * self.b_mul)


class Mapper(nn.Module):
    """pFLSynth's mapping network: (B, code_size) -> (B, 512), ``layers`` equalized linear layers
    of width 512 (learning-rate multiplier 0.01), each followed by LeakyReLU(0.2), the last too."""

    def __init__(self, code_size: int, layers: int = 6, latent_dim: int = LATENT_DIM):
        super().__init__()
        blocks: list[tuple[str, nn.Module]] = []
        for i in range(layers):
            blocks.append((f"dense{i}", EqualizedLinear(code_size if i == 0 else latent_dim, latent_dim, lrmul=0.01)))
            blocks.append((f"dense{i}_act", nn.LeakyReLU(0.2)))
        self.map = nn.Sequential(OrderedDict(blocks))

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.map(code)


class StyleMod(nn.Module):
    """x * (1 + gamma) + beta per channel, [gamma, beta] = EqualizedLinear(512 -> 2C, gain 1)(w)."""

    def __init__(self, channels: int, latent_dim: int = LATENT_DIM):
        super().__init__()
        self.lin = EqualizedLinear(latent_dim, 2 * channels, gain=1.0)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        style = self.lin(w).view(-1, 2, x.shape[1], 1, 1)
        return x * (1 + style[:, 0]) + style[:, 1]


class AdaIN(nn.Module):
    """Instance norm (no affine) then `StyleMod`: pFLSynth's site-task instance normalisation."""

    def __init__(self, channels: int, latent_dim: int = LATENT_DIM):
        super().__init__()
        self.top_epi = nn.Sequential(OrderedDict([("instance_norm", nn.InstanceNorm2d(channels))]))
        self.style_mod = StyleMod(channels, latent_dim)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.style_mod(self.top_epi(x), w)


class AdaCW(nn.Module):
    """Channel gate from the latent alone: x * sigmoid(W2 ReLU(W1 w)), W1: 512 -> C/8, no biases."""

    def __init__(self, channels: int, latent_dim: int = LATENT_DIM, reduction: int = 8):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(latent_dim, hidden, bias=False), nn.ReLU(),
                                nn.Linear(hidden, channels, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * self.fc(w)[:, :, None, None]


class PersonalizationBlock(nn.Module):
    """(B, C, H, W) features and (B, 512) latent -> AdaCW(AdaIN(x, w), w), (B, C, H, W)."""

    def __init__(self, channels: int, latent_dim: int = LATENT_DIM):
        super().__init__()
        self.adain = AdaIN(channels, latent_dim)
        self.adacw = AdaCW(channels, latent_dim)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.adacw(self.adain(x, w), w)


class PersonalizedGenerator(ResnetGenerator):
    """pFLSynth's generator: `ResnetGenerator`, a `Mapper` under ``mapper.`` and a personalisation
    block after every stage but the last under ``personalization_blocks.{i}.``.

    ``forward(image, code)``: code = [one-hot site | one-hot source | one-hot target], see `task_code`.
    """

    def __init__(self, num_sites: int, num_contrasts: int = len(CONTRASTS), ngf: int = 64, n_blocks: int = 9,
                 norm: Norm = "batch", dropout: bool = True, mapping_layers: int = 6):
        """
        Args:
            num_sites: length of the site one-hot (pFLSynth: 4).
            num_contrasts: length of each contrast one-hot (pFLSynth: 4, `CONTRASTS`).
            mapping_layers: mapper depth (pFLSynth's ``--mapping_layers`` default: 6).
            The others: as `ResnetGenerator`.
        """
        super().__init__(ngf, n_blocks, norm, dropout)
        self.num_sites, self.num_contrasts = num_sites, num_contrasts
        self.code_size = num_sites + 2 * num_contrasts
        self.mapper = Mapper(self.code_size, mapping_layers)
        self.personalization_blocks = nn.ModuleList(PersonalizationBlock(c) for c in self.stage_channels())
        init_weights(self.personalization_blocks)

    def forward(self, image: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) and code (code_size,) or (B, code_size) -> (B, 1, H, W)."""
        if code.dim() == 1:
            code = code.expand(len(image), -1)
        w = self.mapper(code)
        *personalised, last = self.stages()
        x = image
        for stage, block in zip(personalised, self.personalization_blocks):
            x = block(stage(x), w)
        return last(x)


def task_code(site: int, num_sites: int, source: int, target: int, num_contrasts: int = len(CONTRASTS),
              device: torch.device | None = None) -> torch.Tensor:
    """pFLSynth's (num_sites + 2 num_contrasts,) code: one-hot site | one-hot source | one-hot target.

    E.g. site 0 of 4, T2 -> PD: [1,0,0,0 | 0,1,0,0 | 0,0,1,0].
    """
    if not (0 <= site < num_sites and 0 <= source < num_contrasts and 0 <= target < num_contrasts):
        raise ValueError(f"site {site} / source {source} / target {target} out of range "
                         f"({num_sites} sites, {num_contrasts} contrasts)")
    code = torch.zeros(num_sites + 2 * num_contrasts, device=device)
    code[[site, num_sites + source, num_sites + num_contrasts + target]] = 1.0
    return code


def shared_prefixes(n_blocks: int = 9, shared_blocks: int = 4) -> tuple[str, ...]:
    """state_dict prefixes pFLSynth averages: the last ``shared_blocks`` residual blocks, the
    decoder (the three stages after them) and the mapper. Everything else -- the encoder, the
    first residual blocks and every personalisation block -- stays with its site."""
    if not 0 <= shared_blocks <= n_blocks:
        raise ValueError(f"shared_blocks must be in [0, {n_blocks}], got {shared_blocks}")
    first = 4 + n_blocks - shared_blocks  # residual blocks are model_4 .. model_{3 + n_blocks}
    return tuple(f"model_{i}." for i in range(first, n_blocks + 7)) + ("mapper.",)


def is_shared(n_blocks: int = 9, shared_blocks: int = 4) -> Callable[[str], bool]:
    """Predicate on generator state_dict keys: True for the keys pFLSynth's partial aggregation
    averages (`shared_prefixes`; BatchNorm running statistics of those stages included)."""
    prefixes = shared_prefixes(n_blocks, shared_blocks)
    return lambda key: key.startswith(prefixes)


def init_weights(module: nn.Module) -> None:
    """pFLSynth's ``normal`` init: every conv, linear and `EqualizedLinear` weight from N(0, 0.02),
    BatchNorm weight N(1, 0.02) and bias 0; other biases keep their defaults. The generators never
    apply it to their `Mapper` (see the module docstring)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, EqualizedLinear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

