"""Round time for 4, 16 and 64 clients at a fixed total of training data.

The four synthetic sites get 16 training volumes each; `--num_users 4 | 16 | 64` deals each site's
volumes among 1, 4 or 16 clients (16, 4 or 1 volumes per client), so every round trains on the same
4 x 16 volumes with the same number of full batches. Each timed round is the project's
`federated.server.run_round` (every client's local update, then aggregation) after one untimed
round (from round 2 on, every client also restores its optimiser state). Rounds of the three
settings alternate in one process; the figures are the best of the timed rounds (the least
disturbed by other work on the machine), with the spread. The growth is split into aggregation and the rest of the
per-client cost; `bare steps` is the same number of RMSprop + L1 steps on in-memory tensors.

    python -m bench.client_scaling                     # demo: chans 16, 128, bs 4, 16 x 4 volumes of 4 slices
    python -m bench.client_scaling --slices 8          # twice the data per client

No target: the figures say what a client costs beyond its share of the training steps.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

if not __package__:  # run as `python bench/<name>.py`: import the repository as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (base_parser, interleaved, load_average, prepare_run, run_options, setup, spread,  # noqa: E402
                          synthetic_root, timed_steps)
from federated.client import make_loader  # noqa: E402

CLIENTS = (4, 16, 64)


def main(argv=None) -> None:
    p = base_parser(__doc__.split("\n")[0], default_repeats=3)
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the scale's first)")
    p.add_argument("--slices", type=int, default=None,
                   help="slices per volume, a multiple of the batch size (default: the batch size)")
    p.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    args = p.parse_args(argv)
    scale = setup(args)
    resolution = args.resolution or scale.resolutions[0]
    bs = scale.local_bs
    slices = args.slices or bs
    if scale.name == "paper":
        print("note: paper scale trains 64 volumes per round (tens of minutes per round on 2 CPU cores)")
    root = synthetic_root(args, resolution, train=16, val=1, test=0, slices=slices, sequences=("T1",))
    runs = {}
    for n in args.clients:
        opts = run_options(root, resolution, scale.chans, bs,
                           extra=["--num_users", str(n), "--local_ep", "1", "--train_dataset", "BFHI"])
        runs[n] = prepare_run(opts)
    agg_time = {n: [] for n in runs}
    for n, run in runs.items():
        orig = run.strategy.aggregate

        def timed(*a, _orig=orig, _n=n, **k):
            t = time.perf_counter()
            out = _orig(*a, **k)
            agg_time[_n].append(time.perf_counter() - t)
            return out
        run.strategy.aggregate = timed

    any_run = runs[args.clients[0]]
    total_slices = sum(c.num_slices for c in any_run.exp.clients)
    steps = sum(-(-c.num_slices // bs) for c in any_run.exp.clients)
    # In-memory reference: the same number of steps on one real batch.
    ds = any_run.exp.clients[0].dataset
    batch = next(iter(make_loader(ds, bs, False, None, 0, torch.device("cpu"))))
    image, target = batch.image.unsqueeze(1), batch.target.unsqueeze(1)
    model = any_run.strategy.build_model(any_run.exp.train_sites)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-4)

    def bare() -> float:
        return timed_steps(model, opt, [(image, target)] * steps)

    print(f"scale {scale.name}: chans {scale.chans}, {resolution}x{resolution}, batch {bs}, local_ep 1; "
          f"{total_slices} training slices = {steps} steps per round; {args.repeats} timed rounds each")
    sides = {f"{n} clients": run.round for n, run in runs.items()}
    sides["bare steps"] = bare
    times = interleaved(sides, args.repeats)
    base_n = args.clients[0]
    base = min(times[f"{base_n} clients"])
    ref = min(times["bare steps"])
    print(f"  bare steps: {ref:.2f} s ({spread(times['bare steps'])})")
    for n in runs:
        t = min(times[f"{n} clients"])
        agg = min(agg_time[n][1:])  # the untimed first round left out
        extra = (t - base) / (n - base_n) if n != base_n else float("nan")
        print(f"  {n:3d} clients ({total_slices // n:4d} slices each): round {t:7.2f} s ({spread(times[f'{n} clients'])}) "
              f"= {t / base:.3f} x {base_n} clients, {t / ref:.3f} x bare steps; aggregation {agg * 1e3:7.1f} ms; "
              + (f"{extra * 1e3:7.1f} ms per client added" if n != base_n else ""), flush=True)
    print(f"client_scaling ({scale.name}): round time " + ", ".join(
        f"{n} clients {min(times[f'{n} clients']) / base:.3f}x" for n in runs)
        + f" (of {base_n} clients); load average now {load_average()}")


if __name__ == "__main__":
    main()
