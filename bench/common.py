"""Shared setup of the benchmarks: scales, synthetic sites, run options built by the project's own
parser, interleaved timing (A, B, A, B ... in one process) and the machine line every script prints.

Every benchmark prints its figures and a ratio measured side by side in one process run: whatever
else runs on the machine slows both sides of a ratio alike. The load average is printed before and
after; numbers taken at a load above the number of cores are not comparable with quiet-machine ones.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from data.synthetic import SyntheticConfig, ensure_synthetic_sites
from federated.experiment import Experiment, build_experiment
from federated.strategies import STRATEGIES
from federated.strategies.base import Strategy
from options import parse_options
from utils.console import Console

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Scale:
    """Model and image sizes of a benchmark scale.

    demo: the project's demo (`--demo`: --chans 16, --local_bs 4, 128 x 128 synthetic sites).
    paper: FL-MRCM's U-Net (--chans 32) at its crop (256) and fastMRI's (320), --local_bs 16.
    """
    name: str
    chans: int
    resolutions: tuple[int, ...]
    local_bs: int


SCALES = {
    "demo": Scale("demo", chans=16, resolutions=(128,), local_bs=4),
    "paper": Scale("paper", chans=32, resolutions=(256, 320), local_bs=16),
}


def base_parser(description: str, default_repeats: int = 3,
                paper_repeats: int | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="demo")
    p.add_argument("--synthetic_dir", default=None,
                   help="cache folder of the synthetic sites (default: the project's default cache)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed repetitions of each side, interleaved A, B, A, B ... (default: demo "
                        f"{default_repeats}, paper {paper_repeats or default_repeats})")
    p.set_defaults(_repeats=(default_repeats, paper_repeats or default_repeats))
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own choice, one per core)")
    return p


def setup(args: argparse.Namespace) -> Scale:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = args._repeats[args.scale == "paper"]
    print(machine_line())
    return SCALES[args.scale]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_line() -> str:
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, python {platform.python_version()}; "
            f"load average {load_average()}")


def synthetic_root(args: argparse.Namespace, resolution: int, **config) -> Path:
    """The synthetic sites for `SyntheticConfig(resolution, **config)`, generated on first use."""
    cfg = SyntheticConfig(resolution=resolution, **config)
    cache = Path(args.synthetic_dir) if args.synthetic_dir else None
    start = time.perf_counter()
    root = ensure_synthetic_sites(cfg, cache, progress=True)
    took = time.perf_counter() - start
    if took > 1:
        print(f"generated synthetic sites {cfg} in {took:.0f} s")
    return root


def run_options(root: Path, resolution: int, chans: int, local_bs: int, strategy: str = "fedavg",
                extra: Sequence[str] = ()) -> argparse.Namespace:
    """Options exactly as the command line would give them (`main_fl_mr.py --data_root root ...`)."""
    argv = ["--data_root", str(root), "--resolution", str(resolution), "--chans", str(chans),
            "--local_bs", str(local_bs), "--strategy", strategy, "--quiet", "--device", "cpu",
            *extra]
    opts = parse_options(argv, "bench", strategy, "")
    # What `federated.cli.run` resolves before training, then its checks of the flags.
    from federated import cli
    if opts.test_dataset is None:
        opts.test_dataset = getattr(cli, "DEFAULT_TEST_SITE", "H")
    cli.check_options(opts)
    return opts


def experiment(opts: argparse.Namespace) -> tuple[Strategy, Experiment]:
    strategy = STRATEGIES[opts.strategy](opts)
    return strategy, build_experiment(opts, strategy)


def quiet_log() -> Console:
    return Console(quiet=True, verbose=False)


def interleaved(sides: dict[str, Callable[[], float | None]], repeats: int,
                warmup: bool = True) -> dict[str, list[float]]:
    """Run every side once (untimed warm-up), then `repeats` rounds of A, B, A, B ...

    A side returns its own elapsed seconds, or None to be timed here as a whole. Returns the
    seconds of each timed run per side.
    """
    if warmup:
        for fn in sides.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            took = fn()
            times[name].append(took if took is not None else time.perf_counter() - start)
    return times


def timed_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Seconds for plain L1 training steps over in-memory (B, 1, H, W) (image, target) batches: the
    bare PyTorch loop the benchmarks compare the project's own code against."""
    start = time.perf_counter()
    for image, target in batches:
        loss = torch.nn.functional.l1_loss(model(image), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def varnet_training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ssim: torch.nn.Module,
                         kspace: torch.Tensor, mask: torch.Tensor, num_low, target: torch.Tensor,
                         max_value: torch.Tensor) -> torch.Tensor:
    """One VarNet step as fastMRI's VarNetModule.training_step, then the optimiser: forward on the
    (B, C, H, W) masked k-space, output centre-cropped to the (B, h, w) target, SSIM loss with the
    target's maximum as data range, backward. Returns the loss, detached."""
    from data.transforms import center_crop
    output = center_crop(model(kspace, mask, num_low), target.shape[-2:])
    loss = ssim(output.unsqueeze(1), target.unsqueeze(1), data_range=max_value)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """min..max of a list, for a feeling of the noise."""
    return f"{min(xs):.3g}..{max(xs):.3g}"


def verdict(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


@dataclass
class Run:
    """What `federated.server.train` holds between rounds, set up in the same order."""
    opts: argparse.Namespace
    strategy: Strategy
    exp: Experiment
    model: torch.nn.Module
    state: "RunState"
    device: torch.device
    exchange: "InProcess"
    rounds_done: int = 0

    def round(self) -> float:
        """One `federated.server.run_round` (local updates of every client, then aggregation) and the
        strategy's `end_round`; returns its seconds."""
        from federated.server import run_round, select_clients
        self.rounds_done += 1
        start = time.perf_counter()
        selected = select_clients(self.exp.clients, self.opts.frac, self.state.server_generator)
        run_round(self.rounds_done, self.strategy, self.state, selected, self.exchange, self.opts, quiet_log(),
                  self.exp)
        self.strategy.end_round(self.rounds_done, self.model, self.state.global_state, self.exp.clients)
        return time.perf_counter() - start


def prepare_run(opts: argparse.Namespace) -> Run:
    """Seed, build the experiment, model and per-client state as `federated.server.train` does."""
    from federated.exchange import InProcess
    from federated.server import RunState
    from utils.seeding import seed_everything
    seed_everything(opts.seed)
    device = torch.device("cpu")
    strategy, exp = experiment(opts)
    model = strategy.build_model(exp.train_sites).to(device)
    strategy.prepare(exp, model, device)
    for c in exp.clients:
        strategy.init_client(c, model)
    state = RunState(global_state={k: v.detach().clone() for k, v in model.state_dict().items()},
                     server_generator=torch.Generator().manual_seed(opts.seed))
    exchange = InProcess(exp, model, strategy, {}, opts, device, quiet_log())
    return Run(opts, strategy, exp, model, state, device, exchange)


def client_summary(clients) -> str:
    """'B (32 slices), F (32 slices), ...' for a benchmark's header line."""
    return ", ".join(f"{c.name} ({c.num_slices} slices)" for c in clients)


def compare_rounds(runs: dict[str, Run], repeats: int) -> tuple[dict[str, float], str]:
    """Interleaved timed rounds of two prepared runs A and B (in `runs` order). Returns the median
    seconds of each, and a line with both times, their spreads and the ratio B / A of every pair."""
    times = interleaved({name: run.round for name, run in runs.items()}, repeats)
    (a, ta), (b, tb) = times.items()
    pairs = [y / x for x, y in zip(ta, tb)]
    line = (f"  {a} round {med(ta):.2f} s ({spread(ta)}) | {b} round {med(tb):.2f} s ({spread(tb)}) | "
            f"pairs {b}/{a} {', '.join(f'{x:.3f}' for x in pairs)}")
    return {a: med(ta), b: med(tb)}, line
