"""Centralised training (upper bound): the training sites' data pooled into one client that trains
one model; evaluated like FedAvg, the one model on every site."""
from __future__ import annotations

from typing import Any

from federated.strategies.base import Strategy


class Central(Strategy):
    name = "central"
    summary = "Central: all training sites pooled into one model (the upper bound, no federation)"
    schedule_per_epoch = True
    client_dp_refusal = ("central pools every site into one client, so there is no federation to protect at "
                         "client level; use --dpsgd_noise/--dpsgd_clip for sample-level DP")

    def arrange_clients(self, groups: list[list[Any]]) -> list[list[Any]]:
        return [[spec for group in groups for spec in group]]

    def federation_refusal(self) -> str | None:
        return ("--strategy central does not run on Flower: it pools every training site's images in one "
                "client, which is what a federation avoids")
