"""The data pipeline with MRAugment at p = 1 against the model's training step, side by side.

Pipeline side (U-Net): a site's training `SliceDataset` (as `federated.experiment.site_dataset`
builds it) whose transform is wrapped by `data.augment.AugmentedTransform`, iterated through the
project's DataLoader (`make_loader`, num_workers 0, i.e. per worker) with a fresh epoch every pass:
without augmentation, at p = 1 with the paper's weights (each transform fires with its weight:
0.5 or 1), at p = 1 with every weight 1 (every transform on every slice, the worst case), and that
with `--aug_upsample` (factor 2). Sites: F (fastMRI-like HDF5 k-space, readout oversampled) and I
(NIfTI images). Model side: one RMSprop + L1 step of the scale's U-Net on an in-memory batch.

VarNet scale: one in-memory fastMRI knee-sized multicoil slice (15 coils, 640 x 368) through the
augmentation and a mask, as a VarNet transform would consume it, per slice; against a training step
of fastMRI's VarNet (12 cascades, chans 18) on that slice.

    python -m bench.augment_pipeline --scale paper   # the target's scale: chans 32, 256 x 256, bs 16
    python -m bench.augment_pipeline                 # demo scale: chans 16, 128 x 128, bs 4

Target (paper scale): augmented pipeline slices/s >= 10 x training-step slices/s.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

if not __package__:  # run as `python bench/<name>.py`: import the repository as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (base_parser, experiment, interleaved, load_average, med, run_options, setup,  # noqa: E402
                          spread, synthetic_root, varnet_training_step, verdict)
from data.augment import PAPER_WEIGHTS, AugmentConfig, AugmentedTransform, MRAugment
from data.subsample import RandomMaskFunc
from data.transforms import center_crop, fft2c, rss
from bench.data_pipeline import pipeline_pass, training_steps
from federated.client import make_loader
from federated.experiment import site_dataset

TARGET = 10.0
SITES = "FI"
ALL_ONE = {name: 1.0 for name in PAPER_WEIGHTS}
VARIANTS = {
    "no augmentation": None,
    "p=1 paper weights": AugmentConfig(strength=1.0, schedule="constant"),
    "p=1 every transform": AugmentConfig(strength=1.0, schedule="constant", weights=ALL_ONE),
    "p=1 every transform, upsampled x2": AugmentConfig(strength=1.0, schedule="constant", weights=ALL_ONE,
                                                       upsample=True),
}


def augmented(dataset, config: AugmentConfig | None):
    """``dataset`` with its transform wrapped in MRAugment at schedule time 0 of 1 (p = strength)."""
    if config is not None:
        dataset.transform = AugmentedTransform(dataset.transform, MRAugment(config))
        dataset.set_time(0, 1)
    return dataset


def measure_unet(args, scale) -> list[dict]:
    resolution = scale.resolutions[0]
    root = synthetic_root(args, resolution)
    bs = scale.local_bs
    opts = run_options(root, resolution, scale.chans, bs, extra=["--train_dataset", args.sites])
    strategy, exp = experiment(opts)
    datasets = {}
    for site in args.sites:
        spec = exp.registry[site]
        for variant, config in VARIANTS.items():
            ds = site_dataset(spec, spec.files(opts.sequence, "train"), opts, train=True)
            datasets[site, variant] = augmented(ds, config)
    model = strategy.build_model(exp.train_sites)
    first = datasets[args.sites[0], "no augmentation"]
    sample = next(iter(make_loader(first, bs, False, None, 0, torch.device("cpu"))))
    image, target = sample.image.unsqueeze(1), sample.target.unsqueeze(1)

    seed = [0]
    sides = {key: pipeline_pass(ds, bs, True, seed) for key, ds in datasets.items()}
    sides["train step"] = training_steps(model, image, target, args.steps)
    times = interleaved(sides, args.repeats)

    step_rate = [bs * args.steps / t for t in times["train step"]]
    print(f"  U-Net {resolution}x{resolution}, chans {scale.chans}, batch {bs}: training step "
          f"{med(step_rate):.2f} slices/s ({spread(step_rate)})")
    rows = []
    for (site, variant), ds in datasets.items():
        rate = [len(ds) / t for t in times[site, variant]]
        ratio = med(rate) / med(step_rate)
        rows.append({"site": site, "variant": variant, "rate": med(rate), "ratio": ratio})
        shape = ds[0].image.shape
        print(f"    site {site} ({exp.registry[site].format}, {len(ds)} slices, sample {tuple(shape)}) "
              f"{variant:34}: {med(rate):7.1f} slices/s ({spread(rate)}) = {ratio:6.1f} x the training "
              f"step -> {verdict(ratio >= TARGET)}", flush=True)
    return rows


def knee_slice(coils: int = 15, shape=(640, 368), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fastMRI knee-sized multicoil k-space slice (C, H, W) complex64 with its RSS target (320, 320)."""
    rng = np.random.default_rng(seed)
    images = (rng.standard_normal((coils, *shape)) + 1j * rng.standard_normal((coils, *shape)))
    images = torch.from_numpy(images.astype(np.complex64))
    target = center_crop(rss(images, dim=0), (320, 320)).numpy().copy()
    return fft2c(images).numpy(), target


def masked_kspace(mask_func):
    """What a VarNet transform does with the (augmented) k-space: draw the mask and apply it."""
    def transform(kspace, mask, target, attrs, fname, slice_num, seed=None):
        sampled, _ = mask_func(kspace.shape + (2,), seed=seed)
        return torch.from_numpy(kspace) * sampled.squeeze(-1), target
    return transform


def measure_varnet_scale(args) -> None:
    kspace, target = knee_slice()
    attrs = {"max": float(target.max()), "padding_left": 18, "padding_right": 350}
    mask_func = RandomMaskFunc([0.04], [8])
    transforms = {}
    for variant, config in VARIANTS.items():
        t = masked_kspace(mask_func)
        if config is not None:
            t = AugmentedTransform(t, MRAugment(config))
            t.set_time(0, 1)
        transforms[variant] = t
    count = [0]

    def per_slice(transform):
        def run() -> float:
            start = time.perf_counter()
            for _ in range(args.knee_slices):
                count[0] += 1
                transform(kspace, None, target, attrs, "knee.h5", 0, (count[0], 0))
            return time.perf_counter() - start
        return run

    sides = {v: per_slice(t) for v, t in transforms.items()}
    sides["VarNet training step"] = varnet_step(kspace, target, mask_func, args.knee_steps)
    times = interleaved(sides, args.repeats)
    step_rate = med([args.knee_steps / t for t in times["VarNet training step"]])
    print(f"  VarNet scale: one 15-coil 640x368 slice, augmentation + mask, per worker "
          f"(num_workers 0), against fastMRI's VarNet (12 cascades, chans 18) training step on it, batch 1: "
          f"{step_rate:.3f} slices/s:")
    for variant in VARIANTS:
        rate = [args.knee_slices / t for t in times[variant]]
        print(f"    {variant:34}: {med(rate):6.2f} slices/s ({spread(rate)}) = {med(rate) / step_rate:6.1f}x the step",
              flush=True)


def varnet_step(kspace: np.ndarray, target: np.ndarray, mask_func, steps: int):
    """A closure timing `steps` training steps (forward, crop, SSIM loss, backward, Adam) of the paper's
    VarNet on the knee slice, as `bench.varnet_step` does."""
    from models.ssim_loss import SSIMLoss
    from models.varnet import VarNet
    torch.manual_seed(0)
    model = VarNet(num_cascades=12, chans=18, pools=4, sens_chans=8, sens_pools=4)
    optimizer, ssim = torch.optim.Adam(model.parameters(), lr=3e-4), SSIMLoss()
    sampled, num_low = mask_func(kspace.shape + (2,), seed=0)
    mask = sampled.squeeze(-1).to(torch.bool).reshape(1, 1, 1, -1)
    masked = torch.from_numpy(kspace) * mask  # (1, C, H, W)
    target_t = torch.from_numpy(target).unsqueeze(0)
    max_value = target_t.amax(dim=(1, 2))

    def run() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            varnet_training_step(model, optimizer, ssim, masked, mask, num_low, target_t, max_value)
        return time.perf_counter() - start
    return run


def main(argv=None) -> None:
    p = base_parser(__doc__.split("\n")[0], default_repeats=3, paper_repeats=2)
    p.add_argument("--sites", default=SITES, help="sites to read")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per timed run (default: demo 8, paper 1)")
    p.add_argument("--knee_slices", type=int, default=3, help="knee-sized slices per timed run")
    p.add_argument("--knee_steps", type=int, default=1, help="VarNet training steps per timed run")
    args = p.parse_args(argv)
    scale = setup(args)
    args.steps = args.steps or (1 if scale.name == "paper" else 8)
    rows = measure_unet(args, scale)
    measure_varnet_scale(args)
    augmented_rows = [r for r in rows if r["variant"] != "no augmentation"]
    worst = min(augmented_rows, key=lambda r: r["ratio"])
    print(f"augment_pipeline ({scale.name}): augmented pipeline / U-Net training step: worst "
          f"{worst['ratio']:.1f}x ({worst['site']}, {worst['variant']}); target >= {TARGET:.0f}x at paper "
          f"scale; load average now {load_average()}")


if __name__ == "__main__":
    main()
