"""Round time of a Flower study with secure aggregation (`--secagg`, SecAgg+) against the same study
without it: localhost deployments (SuperLink + one SuperNode per site, TLS and SuperNode
authentication on), same data, flags and seed, run one after the other (plain, secure, plain, ...).

A round is timed between two writes of `last.pt` (`bench.flower_round.study`: rounds 2 .. R-1,
train + aggregate + checkpoint, no evaluation). A secure round adds SecAgg+'s four message exchanges
with every node (setup, share keys, masked vectors, unmask) after the usual train messages; each
message starts a ClientApp process on its node. Printed besides: the largest difference between the
two studies' final weights (the quantisation error, carried through the later rounds' training).

    python -m bench.secagg_round                  # demo: chans 16, 128 x 128, BFHI, 3 rounds
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

if not __package__:  # run as `python bench/<name>.py`: import the repository as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import base_parser, load_average, med, setup, spread, synthetic_root
from bench.flower_round import study
from federated.flower.options import SECAGG_DEFAULTS


def main(argv=None) -> None:
    p = base_parser(__doc__.split("\n")[0], default_repeats=1)
    p.add_argument("--rounds", type=int, default=3, help="rounds per study (rounds 2 .. R-1 are timed)")
    p.add_argument("--sites", default="BFHI", help="training sites, one SuperNode each")
    args = p.parse_args(argv)
    scale = setup(args)
    resolution = scale.resolutions[0]
    root = synthetic_root(args, resolution)
    flags = ["--data_root", str(root), "--resolution", str(resolution), "--chans", str(scale.chans),
             "--local_bs", str(scale.local_bs), "--local_ep", "1", "--lr", "3e-4", "--epochs", str(args.rounds),
             "--eval_every", str(args.rounds), "--train_dataset", args.sites, "--test_dataset", args.sites[0],
             "--device", "cpu", "--quiet"]
    work = Path(tempfile.mkdtemp(prefix="fedrecon-bench-"))
    print(f"scale {scale.name}: FedAvg, chans {scale.chans}, {resolution}x{resolution}, batch {scale.local_bs}, "
          f"local_ep 1, sites {args.sites}, {args.rounds} rounds; load average at the start {load_average()}")
    times: dict[str, list[float]] = {"plain": [], "secagg": []}
    for i in range(args.repeats):
        for kind in times:
            rounds, _ = study("flower", flags + (["--secagg"] if kind == "secagg" else []), work / f"{kind}-{i}")
            times[kind] += rounds
    a, b = med(times["plain"]), med(times["secagg"])
    print(f"  plain Flower round {a:.2f} s ({spread(times['plain'])}) | SecAgg+ round {b:.2f} s "
          f"({spread(times['secagg'])}) | SecAgg+ / plain = {b / a:.2f}")
    plain, secure = (torch.load(work / f"{kind}-0" / "last.pt", weights_only=True)["model"]
                     for kind in ("plain", "secagg"))
    diff = max(float((secure[k].double() - plain[k].double()).abs().max())
               for k in plain if plain[k].is_floating_point())
    bound = 2 * SECAGG_DEFAULTS["secagg_clip"] / SECAGG_DEFAULTS["secagg_quantization"]
    print(f"  largest weight difference after {args.rounds} rounds: {diff:.2e} (one round's bound: 2 clip / T = "
          f"{bound:.2e})")
    print(f"load average at the end {load_average()}")


if __name__ == "__main__":
    main()
