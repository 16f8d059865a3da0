"""The discriminator side of a synthesis client's conditional GAN: one PatchGAN per translation task
the client trains on (pFLSynth's netD_1 / netD_2), each with its own Adam and learning-rate
schedule. They never leave the client: they are in its state and its checkpoint, never aggregated.

One local step, in pFLSynth's order (pix2pix's ``optimize_parameters``), for a batch of one task:

    synthesised = G(source, code)
    `step`: update that task's discriminator on (source, target) vs (source, synthesised.detach())
    `generator_loss`: LSGAN(D(source, synthesised), real) + lambda_l1 * L1, with the updated
        discriminator frozen; the caller back-propagates it into the generator and steps it.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import torch
from torch import nn

from models.synthesis_losses import (SynthesisHyperparameters, constant_then_linear_decay, discriminator_loss,
                                     generator_loss, make_adam)


class SiteDiscriminators:
    """Per-task discriminators of one client, their optimisers and schedules."""

    def __init__(self, num_tasks: int, make_discriminator: Callable[[], nn.Module],
                 hp: SynthesisHyperparameters, device: torch.device):
        """
        Args:
            num_tasks: translation tasks of the client; task ``t`` is scored by ``discriminators[t]``.
            make_discriminator: builds one fresh discriminator (seed the RNG before for reproducibility).
        """
        self.hp = hp
        self.discriminators = [make_discriminator().to(device) for _ in range(num_tasks)]
        self.optimizers = [make_adam(d.parameters(), hp) for d in self.discriminators]
        self.schedulers = [constant_then_linear_decay(o, hp) for o in self.optimizers]

    def step(self, task: int, source: torch.Tensor, target: torch.Tensor, synthesised: torch.Tensor) -> torch.Tensor:
        """One update of task ``task``'s discriminator; returns its loss, detached.

        Args:
            source, target, synthesised: (B, 1, H, W) in [-1, 1]; ``synthesised`` is detached here.
        """
        disc, optimizer = self.discriminators[task], self.optimizers[task]
        disc.requires_grad_(True)
        loss = discriminator_loss(disc(source, target), disc(source, synthesised.detach()), self.hp.lambda_adv)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def generator_loss(self, task: int, source: torch.Tensor, target: torch.Tensor, synthesised: torch.Tensor
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`models.synthesis_losses.generator_loss` under task ``task``'s discriminator, which is
        frozen so that the gradient reaches only the generator."""
        disc = self.discriminators[task]
        disc.requires_grad_(False)
        return generator_loss(disc(source, synthesised), synthesised, target, self.hp.lambda_l1, self.hp.lambda_adv)

    def end_round(self) -> None:
        """Advance every discriminator's learning-rate schedule by one round."""
        with warnings.catch_warnings():
            # The schedule follows rounds, also for a task that drew no step this round (PyTorch
            # warns when a scheduler steps before its optimizer ever did).
            warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"), UserWarning)
            for s in self.schedulers:
                s.step()

    def train(self, mode: bool = True) -> None:
        for d in self.discriminators:
            d.train(mode)

    def state_dict(self) -> dict:
        return {"discriminators": [d.state_dict() for d in self.discriminators],
                "optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["discriminators"]) != len(self.discriminators):
            raise ValueError(f"state has {len(state['discriminators'])} discriminators, this client "
                             f"{len(self.discriminators)}")
        for items, key in ((self.discriminators, "discriminators"), (self.optimizers, "optimizers"),
                           (self.schedulers, "schedulers")):
            for item, saved in zip(items, state[key]):
                item.load_state_dict(saved)
