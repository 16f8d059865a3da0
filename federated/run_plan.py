"""The two lines a training run prints about itself: which configuration runs (before round 1), and
how long the rest will take, projected from the first round this process ran on this machine."""
from __future__ import annotations

import argparse

from torch import nn


def describe_run(opts: argparse.Namespace, model: nn.Module, num_clients: int) -> str:
    """One line: scale, rounds, model size, clients, batch and learning rate."""
    params = sum(p.numel() for p in model.parameters())
    scale = "demo scale" if opts.demo else "paper scale"
    if getattr(opts, "task", "reconstruction") == "synthesis":
        size = f"synthesis {opts.source_contrast}->{opts.target_contrast} generator --ngf {opts.ngf}"
    else:
        size = f"{opts.model} --chans {opts.chans}"
    return (f"{scale}: {opts.epochs} rounds x {opts.local_ep} local epochs, {num_clients} clients, "
            f"{size} ({params:,} parameters), --local_bs {opts.local_bs}, "
            f"--lr {opts.lr:g}; the time left is projected from the first round and printed after it")


def projection(rnd: int, last_round: int, seconds: float, evaluated: bool, eval_every: int) -> str:
    """The rounds after `rnd` at the pace of round `rnd`, which took `seconds` (its evaluation
    included when `evaluated`). The first round also pays one-time costs (first reads of every file,
    memory allocation), so the projection tends to err long."""
    left = last_round - rnd
    line = f"round {rnd} took {duration(seconds)}; the {left} rounds left: about {duration(left * seconds)}"
    if not evaluated:
        evaluations = len([r for r in range(rnd + 1, last_round + 1) if r % eval_every == 0 or r == last_round])
        line += f" plus {evaluations} evaluations (--eval_every {eval_every}), not timed yet"
    return line


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
