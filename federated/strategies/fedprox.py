"""FedProx (Li et al., MLSys 2020): FedAvg plus a proximal term that keeps each client's local update
near the round's global weights: loss = recon + mu / 2 * ||w - w_global||^2 over the shared parameters.

With `--mu 0` the term is still computed and scaled by zero, so its gradient adds exactly 0.0 and the
run equals FedAvg bit for bit: the method has no other effect.
"""
from __future__ import annotations

import argparse

from torch import nn

from federated.strategies.base import State, Strategy
from utils.errors import UserError


class FedProx(Strategy):
    name = "fedprox"
    summary = "FedProx: FedAvg plus a proximal term mu/2 * ||w - w_global||^2 on every local step"

    def __init__(self, opts: argparse.Namespace):
        super().__init__(opts)
        if opts.mu < 0:
            raise UserError(f"--mu {opts.mu}: must be 0 or more")
        self.anchor: State = {}

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--mu", type=float, default=0.01,
                           help="weight of the proximal term (0: FedAvg's updates exactly)")

    def begin_round(self, rnd: int, model: nn.Module, global_state: State, clients: list) -> None:
        # The global state is replaced, never modified in place, during the round: no copy needed.
        self.anchor = {k: global_state[k] for k, _ in model.named_parameters() if self.is_shared(k)}

    def weight_term(self, client, model):
        """mu / 2 * ||w - w_global||^2 (under DP-SGD: added after the noise, see `Strategy.weight_term`)."""
        prox = sum((p - self.anchor[k]).square().sum() for k, p in model.named_parameters() if k in self.anchor)
        return self.opts.mu / 2 * prox, {"prox": prox.detach()}
