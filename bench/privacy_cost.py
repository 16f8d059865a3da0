"""What client-level DP adds to aggregation: DP-FedAvg (clip + noise) and its accounting against
FedAvg's uniform weighted mean, side by side on the same client states of a fastMRI-size U-Net.

    python bench/privacy_cost.py [--chans 32] [--clients 4] [--repeats 3]

Prints the median seconds of each and their ratio. Not measured here yet: the whole round (local
updates dominate it) and sample-level DP-SGD.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

if not __package__:  # run as `python bench/<name>.py`: import the repository as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from federated.aggregation import weighted_average  # noqa: E402
from federated.privacy import ClientLevelAccountant, dp_fedavg  # noqa: E402
from models.unet import Unet  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chans", type=int, default=32)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    o = p.parse_args()
    torch.manual_seed(0)
    g = Unet(chans=o.chans).state_dict()
    clients = [{k: v + 1e-3 * torch.randn_like(v) for k, v in g.items()} for _ in range(o.clients)]
    keys = list(g)
    gen = torch.Generator().manual_seed(0)
    fedavg = median_seconds(lambda: weighted_average(clients, [1.0] * o.clients, keys), o.repeats)
    dp = median_seconds(lambda: dp_fedavg(g, clients, keys, 0.01, 1.0, gen), o.repeats)
    acc = ClientLevelAccountant(1.0, 1e-5)
    accounting = median_seconds(lambda: acc.spend(o.clients, o.clients), o.repeats)
    params = sum(v.numel() for v in g.values())
    print(f"U-Net chans {o.chans} ({params:,} values), {o.clients} clients, median of {o.repeats}")
    print(f"FedAvg mean            {fedavg * 1e3:8.1f} ms")
    print(f"DP-FedAvg clip+noise   {dp * 1e3:8.1f} ms  ({dp / fedavg:.2f}x the FedAvg mean)")
    print(f"RDP accounting (round) {accounting * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
