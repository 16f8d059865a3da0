"""The one command-line parser shared by every entry script.

Flag names follow the published FL-MRCM scripts (`--train_dataset`, `--local_bs`, `--center-fractions`,
...) so their command lines run verbatim. Each federated method adds its own flags through
`Strategy.add_arguments`, so a new method never edits this file.
"""
from __future__ import annotations

import argparse
from typing import Callable, Sequence

from federated.strategies import STRATEGIES

# With no arguments at all an entry script runs this small configuration on the synthetic sites,
# sized to finish in a few minutes on 2 CPU cores. `--demo` asks for it explicitly.
DEMO_DEFAULTS = dict(epochs=5, chans=16, local_ep=2, local_bs=4, lr=3e-4, eval_every=1)

SYNTHETIC_RESOLUTION = 128  # the synthetic sites' matrix size unless --resolution says otherwise
REAL_DATA_RESOLUTION = 256  # the FL-MRCM crop size for real data


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser(prog: str, default_strategy: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_Formatter)

    run = p.add_argument_group("run")
    run.add_argument("--phase", choices=["train", "test"], default="train",
                     help="train a model, or evaluate --checkpoint on the test split")
    run.add_argument("--strategy", default=default_strategy,
                     help="federated method; `--strategy list` prints them all")
    run.add_argument("--save_dir", default=None,
                     help="folder for options.json, metrics.csv and checkpoints "
                          "(default: runs/<strategy>-<train>-to-<test>-<sequence>)")
    run.add_argument("--seed", type=int, default=0, help="seed of every random choice in the run")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                     help="auto takes CUDA when available")
    run.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes per loader")
    run.add_argument("--amp", choices=["off", "bf16"], default="off",
                     help="bf16: forward passes in bfloat16 autocast (weights and checkpoints stay float32). "
                          "Meant for CUDA GPUs from Ampere on and CPUs with bf16 instructions "
                          "(AVX512-BF16, AMX)")
    run.add_argument("--checkpoint", default=None, help="checkpoint to evaluate with --phase test")
    run.add_argument("--pretrained", default=None,
                     help="start from these U-Net weights (a fastMRI U-Net state_dict or Lightning checkpoint)")
    run.add_argument("--continues", action="store_true",
                     help="continue the run in --save_dir from its last complete round")
    run.add_argument("--resume", metavar="DIR", default=None,
                     help="continue the run saved in DIR (same as --save_dir DIR --continues)")
    run.add_argument("--overwrite", action="store_true",
                     help="allow --save_dir to hold a different, earlier run (its files are replaced)")
    run.add_argument("--demo", action="store_true",
                     help="demo scale: " + ", ".join(f"--{k} {v}" for k, v in DEMO_DEFAULTS.items())
                          + " (implied when no arguments are given)")
    run.add_argument("--verbose", action="store_true", help="print each client's loss every round")
    run.add_argument("--quiet", action="store_true", help="no progress bars, only warnings and the final table")

    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=["mri"], default="mri", help="kept for FL-MRCM command lines")
    data.add_argument("--challenge", choices=["singlecoil", "multicoil"], default="singlecoil")
    data.add_argument("--data_root", default=None,
                      help="folder with one subfolder per site (F, H, I, B) or a sites.json; "
                           "without it and --sites the synthetic sites are used")
    data.add_argument("--sites", default=None, help="JSON sites file adding or redefining sites (see README)")
    data.add_argument("--synthetic_dir", default=None,
                      help="cache folder of the synthetic sites (default: $FEDRECON_SYNTHETIC_DIR or "
                           "~/.cache/fedrecon/synthetic)")
    data.add_argument("--train_dataset", "--train_datasets", dest="train_dataset", default="BFHI",
                      help="training sites: letters (BFHI) or comma-separated names")
    data.add_argument("--test_dataset", default=None,
                      help="target site evaluated every round (default: H; with --phase test: the run's own)")
    data.add_argument("--sequence", default="T1", help="sequence subfolder of every site (T1, T2, ...)")
    data.add_argument("--resolution", type=int, default=None,
                      help=f"square crop of every image (default: {SYNTHETIC_RESOLUTION} for the synthetic "
                           f"sites, {REAL_DATA_RESOLUTION} for real data)")
    data.add_argument("--sample_rate", type=float, default=1.0, help="fraction of training volumes used")
    data.add_argument("--val_sample_rate", type=float, default=1.0, help="fraction of validation volumes used")
    data.add_argument("--mask-type", "--mask_type", dest="mask_type", default="random",
                      choices=["random", "equispaced", "equispaced_fraction"])
    data.add_argument("--accelerations", type=int, nargs="+", default=[4])
    data.add_argument("--center-fractions", "--center_fractions", dest="center_fractions", type=float,
                      nargs="+", default=[0.08])

    model = p.add_argument_group("model")
    model.add_argument("--model", choices=["unet"], default="unet")
    model.add_argument("--chans", type=int, default=32, help="U-Net channels of the first level")
    model.add_argument("--num_pools", type=int, default=4, help="U-Net down-sampling levels")
    model.add_argument("--drop_prob", type=float, default=0.0)
    model.add_argument("--norm", choices=["instance", "instance_affine", "batch"], default="instance",
                       help="U-Net normalisation; instance is fastMRI's (no parameters). "
                            "FedBN needs a norm with parameters: instance_affine or batch")

    fed = p.add_argument_group("federated training")
    fed.add_argument("--epochs", type=int, default=50, help="communication rounds")
    fed.add_argument("--num_users", type=int, default=None,
                     help="clients; a multiple of the number of training sites splits each site's "
                          "volumes among several clients (default: one client per site)")
    fed.add_argument("--frac", type=float, default=1.0, help="fraction of clients taking part in each round")
    fed.add_argument("--local_ep", type=int, default=2, help="local epochs per round")
    fed.add_argument("--local_bs", type=int, default=16, help="local training batch size")
    fed.add_argument("--bs", type=int, default=8, help="evaluation batch size")
    fed.add_argument("--lr", type=float, default=1e-4, help="U-Net learning rate (RMSprop)")
    fed.add_argument("--lr_step", type=int, default=40, help="StepLR step size, in rounds")
    fed.add_argument("--lr_gamma", type=float, default=0.1, help="StepLR decay factor")
    fed.add_argument("--weighting", choices=["uniform", "samples"], default="uniform",
                     help="aggregation weights: equal (the paper) or by training slices")
    fed.add_argument("--eval_every", type=int, default=1, help="evaluate every N rounds (and after the last)")
    fed.add_argument("--min_clients", type=int, default=1,
                     help="stop the run when fewer clients than this finish a round")

    for strategy in STRATEGIES.values():
        strategy.add_arguments(p.add_argument_group(f"{strategy.name} strategy"))
    return p


def parse_options(argv: Sequence[str], prog: str, default_strategy: str, description: str,
                  extend: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """Parse `argv`; an empty `argv` means the demo configuration. `extend` adds a front end's own
    flags (the Flower launcher's)."""
    parser = build_parser(prog, default_strategy, description)
    if extend is not None:
        extend(parser)
    argv = list(argv)
    opts = parser.parse_args(argv)
    if opts.demo or not argv:
        parser.set_defaults(**DEMO_DEFAULTS)
        opts = parser.parse_args(argv)
        opts.demo = True
    return opts
