"""--amp: model forward passes under bfloat16 autocast. Weights, optimiser state, loss reductions,
metrics and checkpoints stay float32; bfloat16 has float32's range, so no loss scaling is needed."""
from __future__ import annotations

import argparse
import contextlib
from typing import Callable

import torch


def autocast(opts: argparse.Namespace, device: torch.device) -> contextlib.AbstractContextManager:
    """The context to run a model's forward pass in: bfloat16 autocast with `--amp bf16`, else nothing."""
    if opts.amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def autocast_forward(predict: Callable[[tuple], torch.Tensor], opts: argparse.Namespace,
                     device: torch.device) -> Callable[[tuple], torch.Tensor]:
    """`predict` (the task's model inputs -> output) run under `autocast`; callers cast its output
    to float32."""
    def run(inputs: tuple) -> torch.Tensor:
        with autocast(opts, device):
            return predict(inputs)
    return run
