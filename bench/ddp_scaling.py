"""Data-parallel training under torchrun: how much faster N processes do the same work, and what the
data-parallel code path costs in one process.

Each measurement is one client's real local update (`federated.client.local_update`: its DataLoader
reading, masking and transforming every slice, the steps, the gradient all-reduce) on site F of the
synthetic sites, timed inside the workers (process start-up and imports are not part of a step):

- plain:    `python bench/ddp_scaling.py --worker`, one process, one math thread;
- torchrun1: the same under `torchrun --nproc_per_node 1` (gloo, world size 1: the data-parallel path,
            its sampler and all-reduce, with no one to share with);
- torchrunN: `torchrun --nproc_per_node N`, one math thread per process, the same global batches.

The three are launched interleaved (plain, torchrun1, torchrunN, plain, ...) and the median of each
is compared: scaling = plain / torchrunN (target >= 1.8 for N = 2 at paper scale on 2 cores: needs
the cores free), overhead = plain / torchrun1 (target >= 0.97).

    python -m bench.ddp_scaling                  # demo: U-Net chans 16, 128 x 128, batch 4
    python -m bench.ddp_scaling --scale paper    # chans 32, 320 x 320, batch 8
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if not __package__:  # run as `python bench/<name>.py`: import the repository as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_average, machine_line, med, spread, synthetic_root, verdict  # noqa: E402

SCALING_TARGET, OVERHEAD_TARGET = 1.8, 0.97
SIZES = {"demo": {"chans": 16, "resolution": 128, "local_bs": 4},
         "paper": {"chans": 32, "resolution": 320, "local_bs": 8}}
# Site F's training data: 2 volumes of 8 slices (paper: two steps of 8, demo: four of 4).
DATA = {"train": 2, "val": 2, "test": 1, "slices": 8}


def worker(args: argparse.Namespace) -> None:
    """One measurement: `local_update` of client F, once untimed, then timed; rank 0 prints JSON."""
    import torch

    from bench.common import experiment, run_options
    from federated import distributed
    from federated.client import local_update

    group = distributed.setup("cpu")
    size = SIZES[args.scale]
    opts = run_options(Path(args.root), size["resolution"], size["chans"], size["local_bs"],
                       extra=["--train_dataset", "F", "--test_dataset", "F", "--local_ep", "1"])
    torch.manual_seed(0)
    strategy, exp = experiment(opts)
    model = strategy.build_model(exp.train_sites)
    group.broadcast_state(model)
    client = exp.clients[0]
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    local_update(client, model, strategy, start_state, opts, torch.device("cpu"), rnd=1)
    start = time.perf_counter()
    local_update(client, model, strategy, start_state, opts, torch.device("cpu"), rnd=1)
    seconds = time.perf_counter() - start
    if group.writer:
        print(json.dumps({"seconds": seconds, "slices": client.num_slices, "threads": torch.get_num_threads()}))
    distributed.shutdown()


def launch(kind: str, nproc: int, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    me = [str(Path(__file__).resolve()), "--worker", "--scale", args.scale, "--root", str(args.root)]
    if kind == "plain":
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *me]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{kind} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scale", choices=sorted(SIZES), default="demo")
    p.add_argument("--nproc", type=int, default=2, help="processes of the scaling measurement")
    p.add_argument("--repeats", type=int, default=3, help="interleaved launches of each kind")
    p.add_argument("--synthetic_dir", default=None, help="cache folder of the synthetic sites")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    print(machine_line())
    args.root = synthetic_root(args, SIZES[args.scale]["resolution"], **DATA)
    kinds = {"plain": 1, "torchrun1": 1, f"torchrun{args.nproc}": args.nproc}
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for kind, nproc in kinds.items():
            result = launch(kind, nproc, args)
            seconds[kind].append(result["seconds"])
    slices = result["slices"]
    size = SIZES[args.scale]
    print(f"scale {args.scale}: U-Net chans {size['chans']}, {size['resolution']} x {size['resolution']}, "
          f"global batch {size['local_bs']}, {slices} slices per local update, 1 math thread per process")
    for kind, xs in seconds.items():
        print(f"  {kind:>10}: {slices / med(xs):6.2f} slices/s  (median of {len(xs)}: {med(xs):.2f} s, {spread(xs)})")
    scaling = med(seconds["plain"]) / med(seconds[f"torchrun{args.nproc}"])
    overhead = med(seconds["plain"]) / med(seconds["torchrun1"])
    print(f"scaling {args.nproc} processes / 1: {scaling:.2f}x (target >= {SCALING_TARGET} for 2: "
          f"{verdict(scaling >= SCALING_TARGET)})")
    print(f"data-parallel path at world size 1 / plain: {overhead:.3f} (target >= {OVERHEAD_TARGET}: "
          f"{verdict(overhead >= OVERHEAD_TARGET)})")
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    main()
