"""pFLSynth's adversarial objective and optimisation defaults (pix2pix-style conditional GAN).

Discriminator: 0.5 * (LSGAN(D(x, G(x)), fake) + LSGAN(D(x, y), real)) * lambda_adv.
Generator: LSGAN(D(x, G(x)), real) * lambda_adv + lambda_l1 * |G(x) - y|_1 (mean).
LSGAN is the mean squared error against 1 (real) or 0 (fake) over every patch logit.
Adam with lr 2e-4 and betas (0.5, 0.999) for the generator and each discriminator; the rate is
constant for 75 rounds, then decays linearly over 75 more (one round = one local epoch in pFLSynth).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class SynthesisHyperparameters:
    """pFLSynth's defaults (its training scripts), each overridable."""

    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    lambda_l1: float = 100.0
    lambda_adv: float = 1.0
    constant_rounds: int = 75
    decay_rounds: int = 75


def lsgan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Mean squared error of the patch logits (B, 1, h, w) against 1 (real) or 0 (fake)."""
    return F.mse_loss(logits, torch.full_like(logits, 1.0 if real else 0.0))


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, lambda_adv: float = 1.0) -> torch.Tensor:
    """0.5 * (LSGAN(real pair, real) + LSGAN(synthesised pair, fake)) * lambda_adv; the caller
    detaches the synthesised image so that no gradient reaches the generator."""
    return 0.5 * (lsgan_loss(real_logits, True) + lsgan_loss(fake_logits, False)) * lambda_adv


def generator_loss(fake_logits: torch.Tensor, synthesised: torch.Tensor, target: torch.Tensor,
                   lambda_l1: float = 100.0, lambda_adv: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LSGAN(D(x, G(x)), real) * lambda_adv + lambda_l1 * L1(G(x), y); also the two terms, detached
    (tensors, so that logging them does not wait for the device).

    Args:
        fake_logits: discriminator logits of (source, synthesised), (B, 1, h, w).
        synthesised, target: (B, 1, H, W) in [-1, 1].
    """
    adversarial = lsgan_loss(fake_logits, True) * lambda_adv
    l1 = F.l1_loss(synthesised, target) * lambda_l1
    return adversarial + l1, {"g_adv": adversarial.detach(), "g_l1": l1.detach()}


def make_adam(params: Iterable[torch.nn.Parameter], hp: SynthesisHyperparameters) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=hp.lr, betas=hp.betas)


def constant_then_linear_decay(optimizer: torch.optim.Optimizer, hp: SynthesisHyperparameters
                               ) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepped once per round: factor 1 for rounds 0 .. constant_rounds - 1, then
    1 - k / (decay_rounds + 1) in the k-th round after them (the last round trains at 1 / 76 of the
    rate at 75 + 75).

    This is pix2pix's rule. pFLSynth's copy adds 1 to the round index, which starts the decay one
    round early and trains its last round (the 150th) at rate 0; we do not repeat that.
    """
    def factor(round_index: int) -> float:
        return 1.0 - max(0, round_index + 1 - hp.constant_rounds) / (hp.decay_rounds + 1)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
