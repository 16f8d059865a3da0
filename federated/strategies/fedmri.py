"""FedMRI (Feng et al., IEEE TMI 2022): a shared encoder and a client-specific decoder.

The encoder (down path and bottleneck) is averaged, with equal weights as in the paper unless
`--weighting samples`; the decoder (up path and head) stays with each client. A weighted contrastive
regulariser in weight space pulls the local encoder towards the global one and pushes it away from
the encoders the clients sent in the last aggregation:

    loss = recon + beta * positive / (negative + eps)
    positive = sum |theta_local - theta_global|    over the shared parameters
    negative = sum_j sum |theta_local - theta_j|    theta_j: the encoder client j sent last round
                                                    (every client that sent one, itself included)

In round 1 there are no previous client encoders and the term is exactly zero.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from federated.strategies.base import State, Strategy
from utils.errors import UserError

EPS = 1e-8


class FedMRI(Strategy):
    name = "fedmri"
    summary = ("FedMRI: shared encoder, a decoder per client, weight-space contrastive term "
               "towards the global encoder")
    personalized = True
    secagg_refusal = ("its contrastive term needs each client's own encoder from the last round, and under "
                      "secure aggregation the server holds only their weighted mean")

    def __init__(self, opts: argparse.Namespace):
        super().__init__(opts)
        if opts.beta < 0:
            raise UserError(f"--beta {opts.beta}: must be 0 or more")
        self.anchor: State = {}
        # Key -> (J, *shape): the encoder parameters each of the J clients sent last round.
        self.previous: State = {}

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--beta", type=float, default=100.0,
                           help="weight of the contrastive regulariser (active from round 2 on)")

    def is_shared(self, key: str) -> bool:
        return self.task.is_encoder(key)

    def build_model(self, sites: list[str]) -> nn.Module:
        model = super().build_model(sites)
        self.param_keys = [k for k, _ in model.named_parameters() if self.is_shared(k)]
        return model

    def begin_round(self, rnd: int, model: nn.Module, global_state: State, clients: list) -> None:
        self.anchor = {k: global_state[k] for k in self.param_keys}

    def weight_term(self, client, model):
        """The contrastive term, none in round 1 (under DP-SGD: added after the noise, see
        `Strategy.weight_term`; the other clients' encoders are what the server released)."""
        params = dict(model.named_parameters())
        if not self.previous:
            return None, {"contrastive": torch.zeros((), device=next(iter(params.values())).device)}
        positive = sum((params[k] - self.anchor[k]).abs().sum() for k in self.param_keys)
        negative = sum((params[k].unsqueeze(0) - self.previous[k]).abs().sum() for k in self.param_keys)
        contrastive = self.opts.beta * positive / (negative + EPS)
        return contrastive, {"contrastive": contrastive.detach()}

    def aggregate(self, global_state: State, client_states: list[State], weights: list[float]) -> State:
        """Remembers the clients' encoders (the negatives of next round), then averages them."""
        self.previous = {k: torch.stack([s[k] for s in client_states]) for k in self.param_keys}
        return super().aggregate(global_state, client_states, weights)

    def round_payload(self, rnd: int, contexts: dict) -> State:
        """Every client needs the encoders the clients sent last round (none in round 1)."""
        return dict(self.previous)

    def load_round_payload(self, payload: State) -> None:
        self.previous = dict(payload)

    def state_dict(self) -> dict:
        return {"previous": self.previous}

    def load_state_dict(self, state: dict) -> None:
        self.previous = state["previous"]
