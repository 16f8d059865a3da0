"""Aggregation and evaluation as shares of a federated round, inside a real `federated.server.train`.

The run is the project's own (`federated.server.train`, checkpoints and metrics into a temporary
folder); the benchmark only wraps, for timing, the functions a round calls: `run_round` (local
updates, then aggregation), the strategy's `aggregate`, `evaluate_round` (every evaluation site's
validation split, per-volume metrics, the latent domain gap) and `save_atomic` (checkpoints). A
round runs from `select_clients` to the round's `write_metrics`.

    python -m bench.round_shares                  # the demo run (--demo: chans 16, 128, bs 4, local_ep 2)
    python -m bench.round_shares --scale paper    # chans 32, 256, bs 16, local_ep 2, 1 volume per client

Target: aggregation < 1% of a round. Evaluation has no target; it is printed.
"""
from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

if not __package__:  # run as `python bench/<name>.py`: import the repository as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import federated.server as server  # noqa: E402
from bench.common import base_parser, load_average, run_options, setup, synthetic_root, verdict, quiet_log  # noqa: E402
from federated.strategies import STRATEGIES  # noqa: E402
from utils.runlog import RunDir  # noqa: E402

TARGET = 0.01


def main(argv=None) -> None:
    p = base_parser(__doc__.split("\n")[0], default_repeats=3)
    p.add_argument("--strategy", default="fedavg")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the scale's first)")
    p.add_argument("--sample_rate", type=float, default=None,
                   help="fraction of each site's 4 training volumes (default: demo 1.0, paper 0.25)")
    args = p.parse_args(argv)
    scale = setup(args)
    resolution = args.resolution or scale.resolutions[0]
    sample_rate = args.sample_rate or (0.25 if scale.name == "paper" else 1.0)
    root = synthetic_root(args, resolution)
    rounds = args.repeats
    save_dir = Path(tempfile.mkdtemp(prefix="fedrecon-bench-"))
    extra = ["--epochs", str(rounds), "--local_ep", "2", "--eval_every", "1", "--sample_rate", str(sample_rate),
             "--save_dir", str(save_dir / "run")]
    if scale.name == "demo":
        extra += ["--demo"]  # the demo's lr and its other defaults; chans and bs as the scale says
    opts = run_options(root, resolution, scale.chans, scale.local_bs, strategy=args.strategy, extra=extra)
    strategy = STRATEGIES[opts.strategy](opts)

    spent: dict[str, list[float]] = defaultdict(lambda: [0.0] * (rounds + 1))
    current = [0]  # the round being timed (0: setup before the first round)
    starts: list[float] = []
    ends: list[float] = []

    def timed(key, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key][current[0]] += time.perf_counter() - t
        return wrapper

    def select_clients(*a, **k):
        current[0] += 1
        starts.append(time.perf_counter())
        return orig_select(*a, **k)

    def write_metrics(self, *a, **k):
        orig_write(self, *a, **k)
        if current[0] > len(ends):
            ends.append(time.perf_counter())

    orig_select, orig_write = server.select_clients, RunDir.write_metrics
    server.select_clients = select_clients
    server.run_round = timed("local updates + aggregation", server.run_round)
    server.evaluate_round = timed("evaluation", server.evaluate_round)
    server.save_atomic = timed("checkpoints", server.save_atomic)
    strategy.aggregate = timed("aggregation", strategy.aggregate)
    RunDir.write_metrics = write_metrics
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the final table
            server.train(opts, strategy, quiet_log())
    finally:
        RunDir.write_metrics = orig_write

    clients = ", ".join(f"{c}" for c in [opts.train_dataset])
    print(f"scale {scale.name}: {args.strategy}, chans {opts.chans}, {resolution}x{resolution}, batch "
          f"{opts.local_bs}, local_ep {opts.local_ep}, sites {clients} (--sample_rate {sample_rate}), "
          f"evaluation on {opts.test_dataset} + training sites every round, {rounds} rounds")
    worst = 0.0
    for r in range(1, rounds + 1):
        total = ends[r - 1] - starts[r - 1]
        agg = spent["aggregation"][r]
        local = spent["local updates + aggregation"][r] - agg
        ev, ck = spent["evaluation"][r], spent["checkpoints"][r]
        other = total - local - agg - ev - ck
        if r > 1 or rounds == 1:
            worst = max(worst, agg / total)
        print(f"  round {r}: {total:7.2f} s = local updates {local:7.2f} s ({local / total:6.2%}) + aggregation "
              f"{agg * 1e3:7.2f} ms ({agg / total:7.3%}) + evaluation {ev:6.2f} s ({ev / total:6.2%}) + "
              f"checkpoints {ck:5.2f} s ({ck / total:6.2%}) + other {other:5.2f} s ({other / total:6.2%})")
    print(f"round_shares ({scale.name}): aggregation at most {worst:.3%} of a round (round 1, with its "
          f"warm-up, left out when there are more); target < {TARGET:.0%} -> {verdict(worst < TARGET)}; "
          f"load average now {load_average()}")


if __name__ == "__main__":
    main()
