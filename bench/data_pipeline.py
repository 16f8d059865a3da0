"""The data pipeline alone (read, mask, transform) per worker against the U-Net's training step.

Pipeline side: a site's training `SliceDataset` (as `federated.experiment.site_dataset` builds it: a
fresh mask per slice and epoch) iterated through the project's DataLoader (`make_loader`,
num_workers 0, the training batch size), shuffled as training reads it and in file order, for the
fastMRI HDF5 sites F, H and the NIfTI (.nii.gz) sites I, B. Model side: one RMSprop + L1 training
step of the scale's U-Net on an in-memory batch. Everything runs interleaved in one process.

    python -m bench.data_pipeline --scale paper     # the target's scale: chans 32, 256 and 320, bs 16
    python -m bench.data_pipeline                   # demo scale: chans 16, 128, bs 4

Target (paper scale): pipeline slices/s >= 10 x training-step slices/s, for every site, shuffled
and in order. A `.nii.gz` file decompresses as a whole: a shuffled read of a volume that is not
among the few decoded ones this process keeps costs a whole volume.
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
from federated.client import make_loader  # noqa: E402
from federated.experiment import site_dataset  # noqa: E402

TARGET = 10.0
SITES = "FHIB"


def pipeline_pass(dataset, batch_size: int, shuffle: bool, seed: list[int]):
    """A closure timing one full pass over `dataset`; a new epoch (masks, order) every call."""
    def run() -> float:
        seed[0] += 1
        dataset.set_epoch(seed[0])
        loader = make_loader(dataset, batch_size, shuffle, torch.Generator().manual_seed(seed[0]), 0,
                             torch.device("cpu"))
        start = time.perf_counter()
        for _ in loader:
            pass
        return time.perf_counter() - start
    return run


def training_steps(model, image, target, steps: int):
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-4)

    def run() -> float:
        model.train()
        return timed_steps(model, opt, [(image, target)] * steps)
    return run


def measure(args, scale, resolution: int) -> list[dict]:
    root = synthetic_root(args, resolution)
    bs = args.local_bs or scale.local_bs
    opts = run_options(root, resolution, scale.chans, bs, extra=["--train_dataset", SITES])
    strategy, exp = experiment(opts)
    datasets = {}
    for site in args.sites:
        spec = exp.registry[site]
        datasets[site] = site_dataset(strategy.task, spec, spec.files(opts.sequence, "train"), opts, train=True)
    model = strategy.build_model(exp.train_sites)
    sample = next(iter(make_loader(datasets[args.sites[0]], bs, False, None, 0, torch.device("cpu"))))
    image, target = sample.image.unsqueeze(1), sample.target.unsqueeze(1)

    sides = {}
    seed = [0]
    for site, ds in datasets.items():
        sides[f"{site} shuffled"] = pipeline_pass(ds, bs, True, seed)
        sides[f"{site} in order"] = pipeline_pass(ds, bs, False, seed)
    sides["train step"] = training_steps(model, image, target, args.steps)
    times = interleaved(sides, args.repeats)

    step_rate = [bs * args.steps / t for t in times["train step"]]
    print(f"  {resolution}x{resolution}: U-Net training step {med(step_rate):.2f} slices/s "
          f"({spread(step_rate)}; chans {scale.chans}, batch {bs})")
    rows = []
    for site, ds in datasets.items():
        for order in ("shuffled", "in order"):
            rate = [len(ds) / t for t in times[f"{site} {order}"]]
            ratio = med(rate) / med(step_rate)
            rows.append({"site": site, "order": order, "resolution": resolution, "rate": med(rate),
                         "ratio": ratio})
            print(f"    site {site} ({exp.registry[site].format}, {len(ds.volumes())} volumes, {len(ds)} "
                  f"slices) {order:8}: {med(rate):8.1f} slices/s ({spread(rate)}) = {ratio:6.1f} x the "
                  f"training step -> {verdict(ratio >= TARGET)}", flush=True)
    return rows


def main(argv=None) -> None:
    p = base_parser(__doc__.split("\n")[0], default_repeats=3, paper_repeats=2)
    p.add_argument("--sites", default=SITES, help="sites to read")
    p.add_argument("--resolutions", type=int, nargs="+", default=None, help="image sizes (default: the scale's)")
    p.add_argument("--local_bs", type=int, default=None, help="batch size (default: the scale's)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per timed run (default: demo 8, paper 1)")
    args = p.parse_args(argv)
    scale = setup(args)
    args.steps = args.steps or (1 if scale.name == "paper" else 8)
    rows = []
    for resolution in args.resolutions or scale.resolutions:
        rows += measure(args, scale, resolution)
    worst = min(rows, key=lambda r: r["ratio"])
    print(f"data_pipeline ({scale.name}): pipeline / training step = "
          + ", ".join(f"{r['site']}@{r['resolution']} {r['order']} {r['ratio']:.1f}x" for r in rows)
          + f"; worst {worst['ratio']:.1f}x; target >= {TARGET:.0f}x at paper scale; load average now "
          f"{load_average()}")


if __name__ == "__main__":
    main()
