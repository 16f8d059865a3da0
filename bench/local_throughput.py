"""A client's local training throughput inside a real FL round against a bare PyTorch loop.

FL side: `federated.client.local_update` on a client built by `federated.experiment.build_experiment`
(the round's whole local update: load the global weights, make RMSprop and StepLR, a DataLoader
reading, masking and transforming every slice with num_workers 0, the steps, the returned weights).
Bare side: the same U-Net, batch size, image size, RMSprop and L1 loss over the same batches already
in memory as tensors; only the steps are timed. Both sides run interleaved in one process.

    python -m bench.local_throughput                     # demo scale: chans 16, 128 x 128, bs 4
    python -m bench.local_throughput --scale paper       # chans 32, 256 and 320, bs 16, site F

Target: FL / bare >= 0.95.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

if not __package__:  # run as `python bench/<name>.py`: import the repository as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (base_parser, experiment, interleaved, load_average, med, run_options, setup,  # noqa: E402
                          spread, synthetic_root, timed_steps, verdict)
from federated.client import local_update, make_loader  # noqa: E402

TARGET = 0.95


def bare_loop(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float,
              start_state: dict) -> callable:
    """A closure timing one pass of plain RMSprop + L1 steps over in-memory (B, 1, H, W) batches."""
    def run() -> float:
        model.load_state_dict(start_state)
        model.train()
        return timed_steps(model, torch.optim.RMSprop(model.parameters(), lr=lr), batches)
    return run


class FetchTimer:
    """Wraps `federated.client.make_loader` so that a real `local_update` reports how long it waited
    for batches (read, mask, transform, collate) and when its first and last fetches happened."""

    def __init__(self) -> None:
        import federated.client as client_module
        self.module, self.make_loader = client_module, client_module.make_loader
        self.reset()

    def reset(self) -> None:
        self.fetch, self.first, self.last = 0.0, None, None

    def __enter__(self) -> "FetchTimer":
        def timed_loader(*a, **k):
            loader = self.make_loader(*a, **k)

            def batches():
                it = iter(loader)
                while True:
                    t = time.perf_counter()
                    self.first = self.first or t
                    try:
                        batch = next(it)
                    except StopIteration:
                        self.last = time.perf_counter()
                        self.fetch += self.last - t
                        return
                    self.fetch += time.perf_counter() - t
                    yield batch
            return _Iterable(batches)
        self.module.make_loader = timed_loader
        return self

    def __exit__(self, *exc) -> None:
        self.module.make_loader = self.make_loader


class _Iterable:
    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return self.make()


def measure(args, scale, resolution: int, site: str) -> dict:
    root = synthetic_root(args, resolution)  # the project's own sites: 4 training volumes x 16 slices
    opts = run_options(root, resolution, scale.chans, args.local_bs or scale.local_bs,
                       extra=["--train_dataset", site, "--test_dataset", site, "--local_ep", "1",
                              "--sample_rate", str(args.sample_rate)])
    strategy, exp = experiment(opts)
    client = exp.clients[0]
    device = torch.device("cpu")
    model = strategy.build_model(exp.train_sites)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # The bare loop's batches: the client's own, read once, kept in memory.
    client.dataset.set_epoch(0)
    batches = [(b.image.unsqueeze(1), b.target.unsqueeze(1))
               for b in make_loader(client.dataset, opts.local_bs, True,
                                    torch.Generator().manual_seed(0), 0, device)]
    slices = sum(len(x) for x, _ in batches)
    assert slices == client.num_slices

    parts = {"data": [], "setup": [], "steps": []}
    timer = FetchTimer()

    def fl() -> float:
        timer.reset()
        with timer:
            start = time.perf_counter()
            result = local_update(client, model, strategy, global_state, opts, device, rnd=1)
            end = time.perf_counter()
        client.optimizer_state, client.scheduler_state = result.optimizer_state, result.scheduler_state
        setup = (timer.first - start) + (end - timer.last)
        parts["data"].append(timer.fetch)
        parts["setup"].append(setup)
        parts["steps"].append(end - start - timer.fetch - setup)
        return end - start

    times = interleaved({"fl": fl, "bare": bare_loop(model, batches, opts.lr, global_state)},
                        args.repeats, warmup=not args.no_warmup)
    n = args.repeats
    fl_rate = [slices / t for t in times["fl"]]
    bare_rate = [slices / t for t in times["bare"]]
    pairs = [f / b for f, b in zip(fl_rate, bare_rate)]
    data, setup, steps = (parts[k][-n:] for k in ("data", "setup", "steps"))
    return {"site": site, "resolution": resolution, "slices": slices, "steps": len(batches),
            "fl": med(fl_rate), "bare": med(bare_rate), "ratio": med(pairs), "pairs": pairs,
            "fl_spread": spread(fl_rate), "bare_spread": spread(bare_rate),
            "data_share": med([d / t for d, t in zip(data, times["fl"])]),
            "data_ms_per_slice": med(data) / slices * 1e3, "setup_ms": med(setup) * 1e3,
            "step_ratio": med([b / s for b, s in zip(times["bare"], steps)])}


def main(argv=None) -> None:
    p = base_parser(__doc__.split("\n")[0], default_repeats=5, paper_repeats=2)
    p.add_argument("--sites", default=None, help="sites to measure, e.g. FHIB (default: demo FHIB, paper F)")
    p.add_argument("--resolutions", type=int, nargs="+", default=None,
                   help="image sizes (default: the scale's)")
    p.add_argument("--local_bs", type=int, default=None, help="batch size (default: the scale's)")
    p.add_argument("--sample_rate", type=float, default=None,
                   help="fraction of the site's 4 training volumes the client trains on "
                        "(default: demo 1.0 = 64 slices, paper 0.5 = 32 slices)")
    p.add_argument("--no_warmup", action="store_true", help="skip the untimed first run of each side")
    args = p.parse_args(argv)
    scale = setup(args)
    paper = scale.name == "paper"
    args.sample_rate = args.sample_rate or (0.5 if paper else 1.0)
    sites = args.sites or ("F" if paper else "FHIB")
    print(f"scale {scale.name}: chans {scale.chans}, batch {args.local_bs or scale.local_bs}, local_ep 1, "
          f"--sample_rate {args.sample_rate} of 4 volumes x 16 slices, {args.repeats} timed runs per side")
    rows = []
    for resolution in args.resolutions or scale.resolutions:
        for site in sites:
            r = measure(args, scale, resolution, site)
            rows.append(r)
            print(f"  site {site} {resolution}x{resolution}: {r['slices']} slices, {r['steps']} steps | "
                  f"FL local_update {r['fl']:.2f} slices/s ({r['fl_spread']}) | bare loop "
                  f"{r['bare']:.2f} slices/s ({r['bare_spread']}) | FL / bare {r['ratio']:.3f} (median of "
                  f"pairs {', '.join(f'{x:.3f}' for x in r['pairs'])}) -> {verdict(r['ratio'] >= TARGET)}",
                  flush=True)
            print(f"      inside local_update: waiting for batches {r['data_share']:.1%} of its time "
                  f"({r['data_ms_per_slice']:.2f} ms per slice), setup + teardown {r['setup_ms']:.1f} ms; "
                  f"its steps alone run at {r['step_ratio']:.3f} x the bare loop's speed", flush=True)
    print(f"local_throughput ({scale.name}): FL / bare = "
          + ", ".join(f"{r['site']}@{r['resolution']} {r['ratio']:.3f}" for r in rows)
          + f"; target >= {TARGET}; load average now {load_average()}")


if __name__ == "__main__":
    main()
