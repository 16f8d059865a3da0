"""Weighted averaging of client weights (FedAvg's aggregation step)."""
from __future__ import annotations

from typing import Sequence

import torch

State = dict[str, torch.Tensor]


def weighted_average(states: Sequence[State], weights: Sequence[float], keys: Sequence[str]) -> State:
    """sum_i w_i * state_i[k] / sum_i w_i for every k in `keys`.

    Floating tensors are averaged in their own dtype, clients summed in the order given so the result
    is deterministic; integer buffers (BatchNorm's step counter) are averaged and rounded.
    """
    if not states:
        raise ValueError("weighted_average needs at least one client state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights must sum to a positive number, got {list(weights)}")
    fractions = [w / total for w in weights]
    out: State = {}
    for k in keys:
        first = states[0][k]
        if first.is_floating_point():
            acc = first * fractions[0]
            for s, f in zip(states[1:], fractions[1:]):
                acc.add_(s[k], alpha=f)
            out[k] = acc
        else:
            acc = sum(s[k].double() * f for s, f in zip(states, fractions))
            out[k] = acc.round().to(first.dtype)
    return out
