"""What differential privacy costs, side by side in one run.

1. Client-level DP: DP-FedAvg (clip + noise) and its accounting against FedAvg's uniform weighted
   mean, on the same client states of a fastMRI-size U-Net.
2. Sample-level DP-SGD: a local training step with Opacus (per-sample gradients, clipping, noise,
   accounting: `federated/dpsgd.py`'s PrivateTraining) against the plain step (the task's L1 loss and
   RMSprop), interleaved A, B, A, B on the same in-memory (B, 1, H, W) batches. The batch size is
   fixed here (Poisson sampling only changes how many slices a step sees). Memory: the bytes of the
   per-sample gradients Opacus holds after a backward (every p.grad_sample, B x the parameters),
   summed from the tensors themselves; on CUDA also each side's peak allocated memory
   (torch.cuda.max_memory_allocated). On CPU torch keeps no allocator statistics, and tracemalloc
   does not see tensor storage, so no peak is reported there.

    python bench/privacy_cost.py [--chans 32] [--clients 4] [--repeats 3]
        [--dpsgd_chans 16] [--resolution 128] [--batch 4] [--steps 3] [--device cpu]

Prints the median seconds of each and their ratios. Not measured here: the whole round.
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

from bench.common import load_average, machine_line  # noqa: E402
from federated.aggregation import weighted_average  # noqa: E402
from federated.dpsgd import PrivateTraining  # noqa: E402
from federated.privacy import ClientLevelAccountant, dp_fedavg  # noqa: E402
from models.unet import Unet  # noqa: E402


class Steps:
    """Local steps of one U-Net on fixed batches, plain or with DP-SGD (noise 1, clip 1)."""

    def __init__(self, o, private: bool, device: torch.device):
        torch.manual_seed(0)
        self.model = Unet(chans=o.dpsgd_chans).to(device)
        self.optimizer = torch.optim.RMSprop(self.model.parameters(), lr=1e-4)
        self.private, self.device, self.o = private, device, o
        g = torch.Generator().manual_seed(1)
        size = (o.batch, 1, o.resolution, o.resolution)
        self.batches = [(torch.randn(size, generator=g).to(device), torch.randn(size, generator=g).to(device))
                        for _ in range(o.steps)]
        self.grad_sample_bytes = 0
        self.peak = 0

    def __call__(self) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if self.private:
            opts = argparse.Namespace(dpsgd_noise=1.0, dpsgd_clip=1.0, dp_delta=1e-5, local_bs=self.o.batch)
            # N = 2 * batch: q = 1/2, the expected batch is `batch`.
            with PrivateTraining(self.model, self.optimizer, 2 * self.o.batch, opts,
                                 torch.Generator().manual_seed(0), None, self.device) as dp:
                for image, target in self.batches:
                    dp.optimizer.zero_grad(set_to_none=True)
                    torch.nn.functional.l1_loss(self.model(image), target).backward()
                    self.grad_sample_bytes = sum(p.grad_sample.numel() * p.grad_sample.element_size()
                                                 for p in self.model.parameters())
                    dp.step()
        else:
            for image, target in self.batches:
                self.optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.l1_loss(self.model(image), target).backward()
                self.optimizer.step()
        if cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()


def dpsgd_section(o) -> None:
    device = torch.device(o.device)
    plain, private = Steps(o, False, device), Steps(o, True, device)
    sides = {"plain": plain, "dpsgd": private}
    times = {k: [] for k in sides}
    for fn in sides.values():
        fn()  # warm-up (Opacus's import, kernels)
    for _ in range(o.repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / o.steps)
    a, b = statistics.median(times["plain"]), statistics.median(times["dpsgd"])
    params = sum(p.numel() for p in plain.model.parameters())
    print(f"\nDP-SGD local step: U-Net chans {o.dpsgd_chans} ({params:,} parameters), batch {o.batch} of "
          f"{o.resolution}x{o.resolution}, {device}, median of {o.repeats} x {o.steps} steps, interleaved")
    print(f"plain step (RMSprop)     {a * 1e3:8.1f} ms")
    print(f"Opacus DP-SGD step       {b * 1e3:8.1f} ms  ({b / a:.2f}x the plain step)")
    print(f"per-sample gradients     {private.grad_sample_bytes / 2**20:8.1f} MiB held after backward "
          f"({o.batch} x {params:,} float32; the plain step's gradient: {params * 4 / 2**20:.1f} MiB)")
    if device.type == "cuda":
        print(f"peak allocated (CUDA)    plain {plain.peak / 2**20:.1f} MiB, DP-SGD {private.peak / 2**20:.1f} MiB "
              f"({private.peak / plain.peak:.2f}x)")


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
    p.add_argument("--dpsgd_chans", type=int, default=16, help="U-Net channels of the DP-SGD comparison")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="slices per step")
    p.add_argument("--steps", type=int, default=3, help="steps per timed repetition")
    p.add_argument("--device", default="cpu")
    o = p.parse_args()
    print(machine_line())
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
    dpsgd_section(o)
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
