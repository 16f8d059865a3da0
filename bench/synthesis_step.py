"""A synthesis client's local update against a bare PyTorch loop of the same GAN step, side by side;
then a pflsynth round against a fedavg round on the same task.

1. Local update. Ours: `federated.client.local_update` of one `--task synthesis --strategy pflsynth`
   client (site I, T1 -> T2), everything a run does per step: the DataLoader over its files, the
   task's batch, the strategy's forward with the site code, the discriminator's step
   (`federated.site_discriminators`), the generator's LSGAN + 100 L1 loss, Adam on both; the client's
   data are its first `--steps` slices. Bare: the same step written out in plain PyTorch (G forward,
   D update on real and detached fake, G update through the frozen D) on the same slices, loaded into
   memory before timing, with the same generator and discriminator sizes and initial weights.
   Target: bare / ours time >= 0.95 (our update at most about 5 % slower), the median of the
   ratios of the interleaved pairs.
2. Rounds. One `federated.server.run_round` of four clients (B, F, H, I) with `--strategy
   pflsynth` (pFLSynth's generator: mapper and personalisation blocks) against `--strategy fedavg`
   (the same backbone without them); the ratio is what the personalisation costs per round.

    python -m bench.synthesis_step                   # demo: ngf/ndf 16 at 64 x 64
    python -m bench.synthesis_step --scale paper     # pFLSynth's 64 channels at 256 x 256

The images are the synthetic sites' (64 x 64) centre-padded to the scale's size: the step costs the
same whatever the pixels hold, and no 256 x 256 sites need to be generated.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

if not __package__:  # run as `python bench/<name>.py`: import the repository as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (base_parser, interleaved, load_average, med, prepare_run, setup,  # noqa: E402
                          spread, synthetic_root, verdict)
from federated.client import local_update  # noqa: E402
from options import parse_options  # noqa: E402

TARGET = 0.95
SCALES = {"demo": dict(resolution=64, ngf=16), "paper": dict(resolution=256, ngf=64)}
SITE_RESOLUTION = 64  # the synthetic sites used, padded to the scale's resolution


class FirstSlices(torch.utils.data.Subset):
    """A client's first `n` training slices, with the dataset's epoch and time hooks."""

    def __init__(self, dataset, n: int):
        super().__init__(dataset, range(min(n, len(dataset))))

    def set_epoch(self, seed) -> None:
        self.dataset.set_epoch(seed)

    def set_time(self, t: int, total: int) -> None:
        self.dataset.set_time(t, total)


def synthesis_options(root, scale: dict, strategy: str, train: str) -> argparse.Namespace:
    """Options as `main_fl_mr.py --task synthesis ...` would give them, checked as a run checks them."""
    argv = ["--task", "synthesis", "--data_root", str(root), "--resolution", str(scale["resolution"]),
            "--ngf", str(scale["ngf"]), "--ndf", str(scale["ngf"]), "--local_bs", "1", "--local_ep", "1",
            "--strategy", strategy, "--train_dataset", train, "--test_dataset", train[0], "--device", "cpu", "--quiet"]
    opts = parse_options(argv, "bench", strategy, "")
    from federated import cli
    cli.check_options(opts)
    return opts


def bare_step_loop(generator, discriminator, batches, lambda_l1: float, lr: float, cpu: list[float]):
    """A plain-PyTorch pix2pix / pFLSynth step over in-memory (source, target, code) batches; each
    run appends its CPU seconds to `cpu`."""
    g_opt = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.999))

    def lsgan(logits, real: bool):
        return F.mse_loss(logits, torch.full_like(logits, 1.0 if real else 0.0))

    def run() -> float:
        start, start_cpu = time.perf_counter(), time.process_time()
        generator.train()
        for source, target, code in batches:
            fake = generator(source, code)
            discriminator.requires_grad_(True)
            d_loss = 0.5 * (lsgan(discriminator(source, target), True) + lsgan(discriminator(source, fake.detach()), False))
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
            discriminator.requires_grad_(False)
            g_loss = lsgan(discriminator(source, fake), True) + lambda_l1 * F.l1_loss(fake, target)
            g_opt.zero_grad(set_to_none=True)
            g_loss.backward()
            g_opt.step()
        cpu.append(time.process_time() - start_cpu)
        return time.perf_counter() - start
    return run


def local_update_bench(args, scale: dict, root) -> None:
    opts = synthesis_options(root, scale, "pflsynth", "I")
    run = prepare_run(opts)
    client = run.exp.clients[0]
    client.dataset = FirstSlices(client.dataset, args.steps)
    client.num_slices = len(client.dataset)

    # The bare side: the same slices, batches made once, the client's own forward (its site code).
    site = F.one_hot(torch.tensor(0), 1).float()
    batches = []
    for i in range(len(client.dataset)):
        sample = client.dataset[i]
        batches.append((sample.source[None, None], sample.target[None, None],
                        torch.cat([site, sample.translation])[None]))
    bare_generator = copy.deepcopy(run.model)
    bare_discriminator = copy.deepcopy(client.extra["discriminators"].discriminators[0])
    cpu: dict[str, list[float]] = {"ours": [], "bare": []}
    bare = bare_step_loop(bare_generator, bare_discriminator, batches, opts.lambda_l1, opts.lr, cpu["bare"])

    def ours() -> float:
        # As from the second round of a run on: the client's Adam state is restored (and copied) first.
        start, start_cpu = time.perf_counter(), time.process_time()
        result = local_update(client, run.model, run.strategy, run.state.global_state, opts, run.device, rnd=1)
        took = time.perf_counter() - start
        cpu["ours"].append(time.process_time() - start_cpu)
        client.optimizer_state, client.scheduler_state = result.optimizer_state, result.scheduler_state
        return took

    params = sum(p.numel() for p in run.model.parameters())
    print(f"local update ({args.scale}): pFLSynth generator ngf {opts.ngf} ({params:,} parameters), PatchGAN ndf "
          f"{opts.ndf}, {opts.resolution} x {opts.resolution}, batch size 1, {len(batches)} steps per run; "
          f"{args.repeats} timed runs each after one untimed, interleaved")
    times = interleaved({"ours": ours, "bare": bare}, args.repeats)
    pairs = [b / o for o, b in zip(times["ours"], times["bare"])]
    steps = len(batches)
    print(f"  ours {med(times['ours']) / steps:.3f} s/step ({spread([t / steps for t in times['ours']])}) | bare "
          f"{med(times['bare']) / steps:.3f} s/step ({spread([t / steps for t in times['bare']])}) | pairs bare/ours "
          f"{', '.join(f'{x:.3f}' for x in pairs)}")
    # CPU seconds of this process (warm-up left out): under load, wall time also counts waits for a core.
    cpu_pairs = [b / o for o, b in zip(cpu["ours"][1:], cpu["bare"][1:])]
    print(f"  CPU time: ours {med(cpu['ours'][1:]) / steps:.3f} s/step | bare {med(cpu['bare'][1:]) / steps:.3f} "
          f"s/step | pairs bare/ours {', '.join(f'{x:.3f}' for x in cpu_pairs)} (median {med(cpu_pairs):.3f})")
    ratio = med(pairs)
    print(f"synthesis local update ({args.scale}): bare / ours = {ratio:.3f} (median of the pairs; target >= "
          f"{TARGET}: {verdict(ratio >= TARGET)}); load average now {load_average()}")


def rounds_bench(args, scale: dict, root) -> None:
    runs = {}
    for strategy in ("fedavg", "pflsynth"):
        run = prepare_run(synthesis_options(root, scale, strategy, "BFHI"))
        for c in run.exp.clients:
            c.dataset = FirstSlices(c.dataset, args.round_slices)
            c.num_slices = len(c.dataset)
        runs[strategy] = run
    sizes = {k: sum(p.numel() for p in r.model.parameters()) for k, r in runs.items()}
    print(f"rounds ({args.scale}): 4 clients x {args.round_slices} slices, batch size 1; fedavg generator "
          f"{sizes['fedavg']:,} parameters, pflsynth {sizes['pflsynth']:,} (+{sizes['pflsynth'] - sizes['fedavg']:,}: "
          f"mapper and personalisation blocks); {args.repeats} timed rounds each after one untimed, interleaved")

    times = interleaved({k: r.round for k, r in runs.items()}, args.repeats)
    pairs = [p / f for f, p in zip(times["fedavg"], times["pflsynth"])]
    print(f"  fedavg round {med(times['fedavg']):.2f} s ({spread(times['fedavg'])}) | pflsynth round "
          f"{med(times['pflsynth']):.2f} s ({spread(times['pflsynth'])}) | pairs pflsynth/fedavg "
          f"{', '.join(f'{x:.3f}' for x in pairs)}")
    print(f"synthesis round ({args.scale}): pflsynth / fedavg = {med(pairs):.3f} (median of the pairs); load "
          f"average now {load_average()}")


def main(argv=None) -> None:
    p = base_parser(__doc__.split("\n")[0], default_repeats=3, paper_repeats=2)
    p.add_argument("--steps", type=int, default=None, help="GAN steps per timed local update (default: demo 8, paper 2)")
    p.add_argument("--round_slices", type=int, default=None,
                   help="training slices per client in the round comparison (default: demo 8, paper 2)")
    p.add_argument("--skip_rounds", action="store_true", help="only the local-update comparison")
    args = p.parse_args(argv)
    setup(args)
    scale = SCALES[args.scale]
    args.steps = args.steps or (2 if args.scale == "paper" else 8)
    args.round_slices = args.round_slices or (2 if args.scale == "paper" else 8)
    root = synthetic_root(args, SITE_RESOLUTION)
    local_update_bench(args, scale, root)
    if not args.skip_rounds:
        rounds_bench(args, scale, root)


if __name__ == "__main__":
    main()
