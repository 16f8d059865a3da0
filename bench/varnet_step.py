"""Our VarNet training step against fastMRI's, on the same weights and batch, side by side.

One step is what fastMRI's VarNetModule.training_step does, then the optimiser: forward, output
centre-cropped to the target, SSIM loss with the target's maximum as data range, backward, Adam.
Ours: `models.varnet.VarNet` (complex tensors) + `models.ssim_loss.SSIMLoss`. fastMRI's:
`fastmri.models.VarNet` (trailing-2 real tensors) + `fastmri.SSIMLoss`, starting from our weights.
Both batches are prepared before timing (the k-space is the same memory, viewed as trailing-2 for
fastMRI). Random complex k-space, a random mask (centre fraction 0.08, 4x) with its ACS width.

    python -m bench.varnet_step                    # demo: 8 coils, 128 x 128, 4 cascades
    python -m bench.varnet_step --scale paper      # 15 coils, 320 x 320, 12 cascades (fastMRI's model)

Target: fastMRI step time / ours >= 0.97 (ours at most 3% slower), the median of the ratios of the
interleaved pairs.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if not __package__:  # run as `python bench/<name>.py`: import the repository as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_parser, interleaved, load_average, med, setup, spread, varnet_training_step, verdict
from data.subsample import RandomMaskFunc
from data.transforms import center_crop, ifft2c, rss
from models.ssim_loss import SSIMLoss
from models.varnet import VarNet

TARGET = 0.97


@dataclass(frozen=True)
class VarNetScale:
    """Batch and model size of a scale (model widths as fastMRI's paper model)."""
    name: str
    coils: int
    height: int
    width: int
    crop: tuple[int, int]
    num_cascades: int
    steps: int


SCALES = {
    "demo": VarNetScale("demo", coils=8, height=128, width=128, crop=(128, 128), num_cascades=4, steps=3),
    "paper": VarNetScale("paper", coils=15, height=320, width=320, crop=(320, 320), num_cascades=12, steps=1),
}


def make_batch(scale: VarNetScale, batch_size: int, seed: int = 0):
    """Complex (B, C, H, W) masked k-space, bool (B, 1, 1, W) mask, ACS width, (B, h, w) target and
    (B,) target maxima."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, scale.coils, scale.height, scale.width)
    kspace = torch.randn(shape, dtype=torch.complex64, generator=generator)
    sampled, num_low = RandomMaskFunc([0.08], [4], seed=seed)((1, scale.height, scale.width, 2))
    mask = sampled.squeeze(-1).to(torch.bool).expand(batch_size, 1, 1, scale.width).contiguous()
    target = center_crop(rss(ifft2c(kspace), dim=1), scale.crop).contiguous()
    return kspace * mask, mask, num_low, target, target.amax(dim=(1, 2))


def ours_side(model, kspace, mask, num_low, target, max_value, steps, losses, cpu):
    ssim = SSIMLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)

    def run() -> float:
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            losses.append(varnet_training_step(model, optimizer, ssim, kspace, mask, num_low, target, max_value).item())
        cpu.append(time.process_time() - start_cpu)
        return time.perf_counter() - start
    return run


def fastmri_side(model, kspace, mask, num_low, target, max_value, steps, losses, cpu):
    import fastmri
    from fastmri.data.transforms import center_crop as fastmri_crop
    ssim = fastmri.SSIMLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    kspace, mask = torch.view_as_real(kspace), mask.unsqueeze(-1)

    def run() -> float:
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            output = fastmri_crop(model(kspace, mask, num_low), target.shape[-2:])
            loss = ssim(output.unsqueeze(1), target.unsqueeze(1), data_range=max_value)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        cpu.append(time.process_time() - start_cpu)
        return time.perf_counter() - start
    return run


def main(argv=None) -> None:
    p = base_parser(__doc__.split("\n")[0], default_repeats=5, paper_repeats=3)
    p.add_argument("--batch_size", type=int, default=1, help="slices per step (fastMRI trains with 1)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed run (default: demo 3, paper 1)")
    p.add_argument("--num_cascades", type=int, default=None, help="default: demo 4, paper 12")
    p.add_argument("--chans", type=int, default=18)
    p.add_argument("--pools", type=int, default=4)
    p.add_argument("--sens_chans", type=int, default=8)
    p.add_argument("--sens_pools", type=int, default=4)
    args = p.parse_args(argv)
    setup(args)
    import fastmri.models

    scale = SCALES[args.scale]
    steps = args.steps or scale.steps
    config = dict(num_cascades=args.num_cascades or scale.num_cascades, chans=args.chans, pools=args.pools,
                  sens_chans=args.sens_chans, sens_pools=args.sens_pools)
    torch.manual_seed(0)
    ours = VarNet(**config)
    reference = fastmri.models.VarNet(**config)
    reference.load_state_dict(ours.state_dict(), strict=True)
    batch = make_batch(scale, args.batch_size)
    print(f"scale {scale.name}: {config}, batch {args.batch_size} x {scale.coils} coils x {scale.height} x "
          f"{scale.width}, crop {scale.crop}, ACS {batch[2]}; {steps} steps per run, {args.repeats} timed "
          f"runs each after one untimed, interleaved")

    losses: dict[str, list[float]] = {"ours": [], "fastmri": []}
    cpu: dict[str, list[float]] = {"ours": [], "fastmri": []}
    times = interleaved({"ours": ours_side(ours, *batch, steps, losses["ours"], cpu["ours"]),
                         "fastmri": fastmri_side(reference, *batch, steps, losses["fastmri"], cpu["fastmri"])},
                        args.repeats)
    per_step = {name: [t / steps for t in ts] for name, ts in times.items()}
    pairs = [f / o for o, f in zip(per_step["ours"], per_step["fastmri"])]
    # CPU seconds of this process (the warm-up run left out): on a machine busy with other jobs they
    # count the work done, where wall time also counts the waits for a core.
    cpu_pairs = [f / o for o, f in zip(cpu["ours"][1:], cpu["fastmri"][1:])]
    ratio = med(pairs)
    first_gap = abs(losses["ours"][0] - losses["fastmri"][0])
    last_gap = abs(losses["ours"][-1] - losses["fastmri"][-1])
    print(f"  ours {med(per_step['ours']):.3f} s/step ({spread(per_step['ours'])}) | fastMRI "
          f"{med(per_step['fastmri']):.3f} s/step ({spread(per_step['fastmri'])}) | pairs fastMRI/ours "
          f"{', '.join(f'{x:.3f}' for x in pairs)}")
    print(f"  CPU time: ours {med(cpu['ours'][1:]) / steps:.3f} s/step | fastMRI "
          f"{med(cpu['fastmri'][1:]) / steps:.3f} s/step | pairs fastMRI/ours "
          f"{', '.join(f'{x:.3f}' for x in cpu_pairs)} (median {med(cpu_pairs):.3f})")
    print(f"  SSIM loss: first step ours {losses['ours'][0]:.6f} vs fastMRI {losses['fastmri'][0]:.6f} "
          f"(|diff| {first_gap:.1e}); after {len(losses['ours'])} steps |diff| {last_gap:.1e}")
    print(f"varnet_step ({scale.name}): fastMRI / ours step time = {ratio:.3f}, the median of the pairs "
          f"(of the medians {med(per_step['fastmri']) / med(per_step['ours']):.3f}; target >= {TARGET}: "
          f"{verdict(ratio >= TARGET)}); load average now {load_average()}")


if __name__ == "__main__":
    main()
