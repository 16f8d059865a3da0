"""Personalised FL in the manner of pFLSynth (Dalmaz et al.), adapted to reconstruction.

The model is the task's personalised model (`PersonalizedUnet`; for VarNet `PersonalizedVarNet`, the
blocks in every cascade's U-Net): a mapper turns one-hot(site) into a 512-d style latent that drives
a personalisation block (AdaIN and channel gating) after every U-Net stage. Partial aggregation: the
mapper (with VarNet also the sensitivity network and the data-consistency weights) and the later
U-Net stages (`--pfl_shared decoder`: up path and head) are averaged, weighted by each client's
number of training slices as in the paper (`--weighting` does not apply); the earlier stages and
every personalisation block stay with each client.

Every pass is given the code of the client's own site; on a site no client trains on, each client's
model is evaluated with its own site's code (the server evaluates every client's model there).
"""
from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F

from federated.client import Client
from federated.strategies.base import Strategy

SHARED_STAGES = {
    "decoder": "the up path and head (the paper's 'later layers')",
    "encoder": "the down path and bottleneck",
    "all": "every U-Net stage (only the personalisation blocks stay local)",
}


class PersonalizedFL(Strategy):
    name = "pfl"
    dpsgd_refusal = ("its site code enters the model as one vector for the whole batch, so Opacus cannot split "
                     "the personalisation layers' gradients per sample; use --strategy fedavg or fedbn")
    summary = ("pFLSynth-style personalised FL: site-coded AdaIN + gating blocks stay local, "
               "the mapper and later U-Net stages are averaged")
    personalized = True

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--pfl_shared", choices=list(SHARED_STAGES), default="decoder",
                           help="U-Net stages averaged besides the mapper; the rest and the "
                                "personalisation blocks stay local; averages are weighted by training "
                                "slices as in pFLSynth (--weighting does not apply). "
                                + "; ".join(f"{k}: {v}" for k, v in SHARED_STAGES.items()))

    def build_model(self, sites: list[str]) -> nn.Module:
        self.sites = list(sites)
        o = self.opts
        model = self.task.build_personalized_model(len(self.sites))
        stages = model.stages()
        n = (len(stages) + 1) // 2  # the down stages and the bottleneck, then the up stages
        shared_stages = {"decoder": stages[n:], "encoder": stages[:n], "all": stages}[o.pfl_shared]
        self.shared_prefixes = model.always_shared_prefixes + tuple(p for s in shared_stages for p in s)
        return model

    def is_shared(self, key: str) -> bool:
        return key.startswith(self.shared_prefixes)

    def client_weights(self, clients: list[Client]) -> list[float]:
        return [float(c.num_slices) for c in clients]

    def site_code(self, client: Client, device: torch.device) -> torch.Tensor:
        """(code_size,) one-hot of the client's site."""
        index = torch.tensor(self.sites.index(client.site), device=device)
        return F.one_hot(index, len(self.sites)).float()

    def forward(self, model: nn.Module, inputs: tuple[torch.Tensor, ...], client: Client | None) -> torch.Tensor:
        if client is None:
            raise ValueError("pfl evaluates each client's model: a client is needed for its site code")
        return self.task.forward(model, (*inputs, self.site_code(client, inputs[0].device)))
