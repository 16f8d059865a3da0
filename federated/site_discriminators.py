"""The discriminator side of a synthesis client's conditional GAN: one PatchGAN per translation task
the client trains on (pFLSynth's netD_1 / netD_2), each with its own Adam and learning-rate
schedule. They never leave the client: they are in its state and its checkpoint, never aggregated.

One local step, in pFLSynth's order (pix2pix's ``optimize_parameters``):

    synthesised = G(source, code)
    `step`: update the discriminators on (source, target) vs (source, synthesised.detach())
    `generator_loss`: LSGAN(D(source, synthesised), real) + lambda_l1 * L1, with the updated
        discriminators frozen; the caller back-propagates it into the generator and steps it.

A batch may mix tasks (a variable-task site draws one per slice): each sample is scored by its own
task's discriminator, and each LSGAN term is the mean over all the batch's patch logits, as one
discriminator's would be. With one task per batch (pFLSynth's batch size 1) that is pFLSynth's loss.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from federated import distributed
from models.synthesis_losses import SynthesisHyperparameters, constant_then_linear_decay, lsgan_loss, make_adam


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

    def _lsgan(self, source: torch.Tensor, image: torch.Tensor, task: torch.Tensor, real: bool) -> torch.Tensor:
        """LSGAN loss of the (source, image) pairs, each scored by its task's discriminator."""
        if len(self.discriminators) == 1:  # the common task: no per-task split (and no device sync)
            return lsgan_loss(self.discriminators[0](source, image), real)
        total = torch.zeros((), device=source.device)
        for t in torch.unique(task).tolist():  # sorted: the same order on every run
            pick = task == t
            share = pick.sum() / len(task)
            total = total + lsgan_loss(self.discriminators[t](source[pick], image[pick]), real) * share
        return total

    def step(self, source: torch.Tensor, target: torch.Tensor, synthesised: torch.Tensor,
             task: torch.Tensor) -> torch.Tensor:
        """One update of the discriminators of the batch's tasks: 0.5 * (real + fake) * lambda_adv;
        returns that loss, detached.

        Args:
            source, target, synthesised: (B, 1, H, W) in [-1, 1]; ``synthesised`` is detached here.
            task: (B,) index of each sample's task.
        """
        for d in self.discriminators:
            d.requires_grad_(True)
        loss = 0.5 * (self._lsgan(source, target, task, True) + self._lsgan(source, synthesised.detach(), task, False))
        loss = loss * self.hp.lambda_adv
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        # Under torchrun every process holds the same discriminators: their gradients are summed over
        # the processes' shares of the batch, as the generator's are.
        group = distributed.current()
        group.average_gradients([p for d in self.discriminators for p in d.parameters()], group.share)
        for o in self.optimizers:
            o.step()  # a discriminator with no sample in the batch has no gradient and is left as it is
        return loss.detach()

    def generator_loss(self, source: torch.Tensor, target: torch.Tensor, synthesised: torch.Tensor,
                       task: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """LSGAN(D(source, synthesised), real) * lambda_adv + lambda_l1 * L1(synthesised, target), the
        discriminators frozen so that the gradient reaches only the generator; also the two terms."""
        for d in self.discriminators:
            d.requires_grad_(False)
        adversarial = self._lsgan(source, synthesised, task, True) * self.hp.lambda_adv
        l1 = F.l1_loss(synthesised, target) * self.hp.lambda_l1
        return adversarial + l1, {"g_adv": adversarial.detach(), "g_l1": l1.detach()}

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
