"""The flags a Flower study adds to `main_fl_mr.py`'s, and the check that a study can run on Flower
(each method says why it cannot, if it cannot: `Strategy.federation_refusal`, and with `--secagg`
`Strategy.secagg_refusal`).

The waiting flags are kept out of the run's options.json: how long the server waits is not part of
what was trained, and a run may be continued with other values. The `--secagg` flags stay in it:
they change the weights a round gives, and a continued run keeps them.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Sequence

from options import parse_options
from utils.errors import UserError

if TYPE_CHECKING:
    from federated.strategies.base import Strategy

FLOWER_FLAGS = ("node_wait", "reply_timeout", "insecure")
# --secagg_* defaults: SecAgg+'s own clipping and quantisation ranges; a key share threshold of half
# the round's nodes (at least 2).
SECAGG_DEFAULTS = {"secagg_clip": 8.0, "secagg_quantization": 2**22, "secagg_threshold": 0.5}
SECAGG_MODULUS = 2**32  # SecAgg+'s mask range (flwr's default)


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
    g.add_argument("--secagg", action="store_true",
                   help="secure aggregation (SecAgg+): the server learns only the weighted mean of the "
                        "clients' updates each round, never one client's (methods whose server step is "
                        "that mean; see the README)")
    g.add_argument("--secagg_clip", type=float, default=None,
                   help=f"with --secagg: bound on every entry of a node's update (default "
                        f"{SECAGG_DEFAULTS['secagg_clip']:g}); a node whose update exceeds it is left out")
    g.add_argument("--secagg_quantization", type=int, default=None,
                   help="with --secagg: integer levels over [-clip, clip] (default 2^22); the mean's error per "
                        "entry is below 2 clip / levels with equal weights")
    g.add_argument("--secagg_threshold", type=float, default=None,
                   help="with --secagg: fraction of the round's nodes whose key shares rebuild a node's masks "
                        f"(default {SECAGG_DEFAULTS['secagg_threshold']:g}, at least 2 nodes); the round "
                        "survives nodes dropping out as long as that many remain")


def parse_flower_options(argv: Sequence[str], prog: str) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(the run's options as main_fl_mr.py parses them, the Flower flags)."""
    opts = parse_options(argv, prog, "fedavg", "A federated study on Flower.", extend=add_flower_arguments)
    flower = argparse.Namespace(**{k: vars(opts).pop(k) for k in FLOWER_FLAGS})
    return opts, flower


def check_waits(flower: argparse.Namespace) -> None:
    """The server's waits: --node_wait 0 or more, --reply_timeout positive."""
    if flower.node_wait < 0:
        raise UserError(f"--node_wait {flower.node_wait:g}: must be 0 or more (seconds)")
    if flower.reply_timeout <= 0:
        raise UserError(f"--reply_timeout {flower.reply_timeout:g}: must be positive (seconds)")


def check_secagg_flags(opts: argparse.Namespace) -> None:
    """The --secagg_* values: given only with --secagg, each in its range; their defaults filled in."""
    given = [k for k in SECAGG_DEFAULTS if getattr(opts, k) is not None]
    if not opts.secagg:
        if given:
            raise UserError(f"--{given[0]} needs --secagg")
        return
    for key, value in SECAGG_DEFAULTS.items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    if opts.secagg_clip <= 0:
        raise UserError(f"--secagg_clip {opts.secagg_clip}: must be positive")
    if not 0 < opts.secagg_quantization < SECAGG_MODULUS:
        raise UserError(f"--secagg_quantization {opts.secagg_quantization}: must be in 1 .. 2^32 - 1")
    if not 0 < opts.secagg_threshold <= 1:
        raise UserError(f"--secagg_threshold {opts.secagg_threshold}: must be in (0, 1]")


def check_secagg_sites(opts: argparse.Namespace, train_sites: list[str]) -> None:
    """--secagg needs two training sites (nodes), and the sum of their quantised updates must fit
    SecAgg+'s 32-bit masks."""
    if not opts.secagg:
        return
    if len(train_sites) < 2:
        raise UserError(f"--secagg with --train_dataset {opts.train_dataset}: secure aggregation needs at least "
                        "two training sites (the sum of one site's update is that update)")
    if len(train_sites) * opts.secagg_quantization >= SECAGG_MODULUS:
        raise UserError(f"--secagg_quantization {opts.secagg_quantization}: {len(train_sites)} sites' quantised "
                        f"updates would overflow SecAgg+'s 2^32 masks; use at most "
                        f"{(SECAGG_MODULUS - 1) // len(train_sites)}")


def check_flower_support(opts: argparse.Namespace, strategy: Strategy) -> None:
    """One line on why this study cannot run on Flower (the method's own `federation_refusal`), or
    not with --secagg (`secagg_refusal`, client-level DP, the --secagg_* values)."""
    if why := strategy.federation_refusal():
        raise UserError(why)
    check_secagg_flags(opts)
    if opts.secagg:
        if strategy.secagg_refusal:
            raise UserError(f"--secagg with --strategy {opts.strategy}: {strategy.secagg_refusal}; drop --secagg")
        if strategy.privacy is not None:
            raise UserError("--secagg with --dp_clip/--dp_noise: client-level DP clips each client's update on the "
                            "server, which under secure aggregation never sees one; drop one of them")
    if opts.phase != "train":
        raise UserError("--phase test does not run on Flower yet (a Flower run's client state is on the "
                        "SuperNodes, not in its checkpoint)")
    if getattr(opts, "val_dataset", None):
        raise UserError("--val_dataset does not run on Flower yet (the server evaluates on the SuperNodes of "
                        "the target and training sites only); leave it out")
