"""A VarNet client's throughput inside a federated round against a bare PyTorch loop.

FL side: `federated.client.local_update` on a client of the multicoil synthetic site F, built by
`federated.experiment.build_experiment` from `--model varnet` options (the whole local update:
the global weights loaded, Adam and StepLR made, a DataLoader reading each multicoil HDF5 slice,
masking it and computing its RSS target (fastMRI's VarNetDataTransform), the steps, the returned
weights). Bare side: the same VarNet, Adam and SSIM loss (`models.ssim_loss.SSIMLoss`, the target's
maximum as data range) over the same batches already in memory; only the steps are timed. Both
sides run interleaved in one process.

    python -m bench.varnet_round                   # demo: 4 cascades, chans 8, 64 x 64, 8 coils, batch 4
    python -m bench.varnet_round --scale paper     # fastMRI's VarNet (12 cascades, chans 18), 15 coils,
                                                   # 320 x 320, batch 1

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
                          spread, synthetic_root, varnet_training_step, verdict)
from federated.client import local_update, make_loader  # noqa: E402

TARGET = 0.95
SIZES = {
    "demo": dict(resolution=64, coils=8, local_bs=4, flags=["--num_cascades", "4", "--chans", "8", "--pools", "3",
                                                          "--sens_chans", "4", "--sens_pools", "3"]),
    "paper": dict(resolution=320, coils=15, local_bs=1, flags=["--num_cascades", "12", "--chans", "18", "--pools", "4",
                                                             "--sens_chans", "8", "--sens_pools", "4"]),
}


def bare_loop(model, batches, lr: float, start_state: dict):
    """A closure timing one pass of plain Adam + SSIM steps over in-memory batches."""
    from models.ssim_loss import SSIMLoss
    ssim = SSIMLoss()

    def run() -> float:
        model.load_state_dict(start_state)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        start = time.perf_counter()
        for (kspace, mask, num_low, _), target, max_value in batches:
            varnet_training_step(model, optimizer, ssim, kspace, mask, num_low, target, max_value)
        return time.perf_counter() - start
    return run


def main(argv=None) -> None:
    p = base_parser(__doc__.split("\n")[0], default_repeats=3, paper_repeats=1)
    p.add_argument("--slices", type=int, default=None,
                   help="slices per volume of the client's 2 training volumes (default: demo 16, paper 2)")
    args = p.parse_args(argv)
    scale = setup(args)
    size = SIZES[scale.name]
    slices = args.slices or (2 if scale.name == "paper" else 16)
    root = synthetic_root(args, size["resolution"], multicoil=True, coils=size["coils"], train=2, val=1, test=1,
                          slices=slices)
    opts = run_options(root, size["resolution"], 0, size["local_bs"],
                       extra=["--model", "varnet", "--challenge", "multicoil", "--train_dataset", "F",
                              "--test_dataset", "F", "--local_ep", "1", "--optimizer", "adam", "--lr", "3e-4",
                              *size["flags"]])
    strategy, exp = experiment(opts)
    task, client, device = strategy.task, exp.clients[0], torch.device("cpu")
    model = strategy.build_model(exp.train_sites)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # The bare loop's batches: the client's own, read once, kept in memory.
    client.dataset.set_epoch(0)
    batches = []
    for samples in make_loader(client.dataset, opts.local_bs, True, torch.Generator().manual_seed(0), 0, device):
        batch = task.to_device(samples, device)
        batches.append((batch.inputs, batch.target, samples.max_value))
    print(f"scale {scale.name}: VarNet {' '.join(size['flags'])}, {size['coils']} coils, {size['resolution']} x "
          f"{size['resolution']}, batch {opts.local_bs}, {client.num_slices} slices per local update, "
          f"{args.repeats} timed runs per side after one untimed, interleaved")

    def fl() -> float:
        start = time.perf_counter()
        result = local_update(client, model, strategy, global_state, opts, device, rnd=1)
        took = time.perf_counter() - start
        client.optimizer_state, client.scheduler_state = result.optimizer_state, result.scheduler_state
        return took

    times = interleaved({"fl": fl, "bare": bare_loop(model, batches, opts.lr, global_state)}, args.repeats)
    fl_rate = [client.num_slices / t for t in times["fl"]]
    bare_rate = [client.num_slices / t for t in times["bare"]]
    pairs = [f / b for f, b in zip(fl_rate, bare_rate)]
    ratio = med(pairs)
    print(f"  FL local_update {med(fl_rate):.3f} slices/s ({spread(fl_rate)}) | bare loop {med(bare_rate):.3f} "
          f"slices/s ({spread(bare_rate)}) | FL / bare {ratio:.3f} (pairs {', '.join(f'{x:.3f}' for x in pairs)})")
    print(f"varnet_round ({scale.name}): FL / bare = {ratio:.3f}; target >= {TARGET}: {verdict(ratio >= TARGET)}; "
          f"load average now {load_average()}")


if __name__ == "__main__":
    main()
