"""The flags a Flower study adds to `main_fl_mr.py`'s, and the check that a study can run on Flower
(each method says why it cannot, if it cannot: `Strategy.federation_refusal`).

They are kept out of the run's options.json: how long the server waits is not part of what was
trained, and a run may be continued with other values.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Sequence

from options import parse_options
from utils.errors import UserError

if TYPE_CHECKING:
    from federated.strategies.base import Strategy

FLOWER_FLAGS = ("node_wait", "reply_timeout", "insecure")


def add_flower_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("flower")
    g.add_argument("--node_wait", type=float, default=600.0,
                   help="seconds the server waits at the start for one SuperNode per site")
    g.add_argument("--reply_timeout", type=float, default=3600.0,
                   help="seconds the server waits for a round's replies; a client that has not answered "
                        "by then is left out of the round (a SuperNode that dies is noticed by the "
                        "SuperLink within about 60 s: two missed 30-s heartbeats)")
    g.add_argument("--insecure", action="store_true",
                   help="local launcher only: plain HTTP and no SuperNode authentication")


def parse_flower_options(argv: Sequence[str], prog: str) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(the run's options as main_fl_mr.py parses them, the Flower flags)."""
    opts = parse_options(argv, prog, "fedavg", "A federated study on Flower.", extend=add_flower_arguments)
    flower = argparse.Namespace(**{k: vars(opts).pop(k) for k in FLOWER_FLAGS})
    if flower.node_wait < 0 or flower.reply_timeout <= 0:
        raise UserError(f"--node_wait {flower.node_wait} / --reply_timeout {flower.reply_timeout}: "
                        "must be 0 or more / positive")
    return opts, flower


def check_flower_support(opts: argparse.Namespace, strategy: Strategy) -> None:
    """One line on why this study cannot run on Flower (the method's own `federation_refusal`)."""
    if why := strategy.federation_refusal():
        raise UserError(why)
    if opts.phase != "train":
        raise UserError("--phase test does not run on Flower yet (a Flower run's client state is on the "
                        "SuperNodes, not in its checkpoint)")
    if getattr(opts, "val_dataset", None):
        raise UserError("--val_dataset does not run on Flower yet (the server evaluates on the SuperNodes of "
                        "the target and training sites only); leave it out")
