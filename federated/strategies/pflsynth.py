"""pFLSynth (Dalmaz et al., Medical Image Analysis 2024): personalised federated synthesis.

The model is pFLSynth's generator (`models.pflsynth.PersonalizedGenerator`): a mapper turns
one-hot(site) | one-hot(source) | one-hot(target) into a latent that drives a personalisation
block after every stage. Partial aggregation as in pFLSynth's train_pflsynth.py: the last
`--pflsynth_shared_blocks` (4) of the 9 residual blocks, the decoder and the mapper are averaged,
weighted by each client's number of training slices (`--weighting` does not apply); the encoder, the
first residual blocks, every personalisation block and the discriminators stay with each client.
At pFLSynth's sizes that shares 6,414,785 of the generator's 15,986,817 parameters (40.1 %).

Needs ``--task synthesis``. Each client's model is evaluated with its own site's code.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F

from federated.client import Client
from federated.strategies.base import Strategy
from models.pflsynth import is_shared
from utils.errors import UserError


class PFLSynth(Strategy):
    name = "pflsynth"
    dpsgd_refusal = "it trains the synthesis task, which DP-SGD does not support"
    summary = ("pFLSynth: site/task-coded personalisation blocks and early stages stay local, later "
               "residual blocks, decoder and mapper are averaged (needs --task synthesis)")
    personalized = True

    def __init__(self, opts: argparse.Namespace):
        super().__init__(opts)
        if self.task.name != "synthesis":
            raise UserError("--strategy pflsynth learns contrast synthesis: add --task synthesis "
                            "(for reconstruction, --strategy pfl borrows its personalisation blocks)")
        if not 0 <= opts.pflsynth_shared_blocks <= opts.n_blocks:
            raise UserError(f"--pflsynth_shared_blocks {opts.pflsynth_shared_blocks}: must be in 0 .. --n_blocks "
                            f"({opts.n_blocks})")
        self._shared = is_shared(opts.n_blocks, opts.pflsynth_shared_blocks)

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--pflsynth_shared_blocks", type=int, default=4,
                           help="residual blocks averaged (the last ones, with the decoder and the mapper); "
                                "pFLSynth: 4 of 9")

    def build_model(self, sites: list[str]) -> nn.Module:
        self.sites = list(sites)
        return self.task.build_pflsynth_model(len(self.sites))

    def is_shared(self, key: str) -> bool:
        return self._shared(key)

    def client_weights(self, clients: list[Client]) -> list[float]:
        return [float(c.num_slices) for c in clients]

    def forward(self, model: nn.Module, inputs: tuple[torch.Tensor, ...], client: Client | None) -> torch.Tensor:
        """inputs = (source (B, 1, H, W), translation code (B, 2 K)); the code gets the client's site."""
        if client is None:
            raise ValueError("pflsynth evaluates each client's model: a client is needed for its site code")
        source, translation = inputs
        site = F.one_hot(torch.tensor(self.sites.index(client.site), device=source.device), len(self.sites))
        return model(source, torch.cat([site.float().expand(len(source), -1), translation], dim=1))
