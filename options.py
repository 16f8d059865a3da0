"""The one command-line parser shared by every entry script.

Flag names follow the published FL-MRCM scripts (`--train_dataset`, `--local_bs`, `--center-fractions`,
...) so their command lines run verbatim. Each federated method adds its own flags through
`Strategy.add_arguments`, so a new method never edits this file.
"""
from __future__ import annotations

import argparse
import copy
from typing import Callable, Sequence

from data.augment import add_augment_arguments
from federated.dpsgd import add_dpsgd_arguments
from federated.privacy import add_privacy_arguments
from federated.strategies import STRATEGIES
from federated.tasks import TASKS, task_name

# Two scales. Paper: FL-MRCM's settings, the parser's defaults. Demo: a small configuration sized to
# finish in a few minutes on 2 CPU cores. A run on the synthetic sites is the demo unless the command
# gives a scale flag or `--scale paper`; a run on real data (--data_root/--sites) is paper scale.
# The model's own sizes and learning rate at each scale are the task's (`fill_task_defaults`).
DEMO_DEFAULTS = dict(epochs=5, local_ep=2, local_bs=4)
# The flags that say which model is trained and how (not --epochs: it only says for how long).
SCALE_FLAGS = ("chans", "local_ep", "local_bs", "lr")

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
    run.add_argument("--checkpoint", default=None, help="run checkpoint to evaluate with --phase test (its model, method and clients; "
                          "only the --test_dataset site's data is read)")
    run.add_argument("--pretrained", default=None,
                     help="fastMRI U-Net (or --model varnet: VarNet) weights, a state_dict or Lightning checkpoint: "
                          "training starts from them; --phase test evaluates them on --test_dataset")
    run.add_argument("--continues", action="store_true",
                     help="continue the run in --save_dir from its last complete round")
    run.add_argument("--resume", metavar="DIR", default=None,
                     help="continue the run saved in DIR (same as --save_dir DIR --continues)")
    run.add_argument("--overwrite", action="store_true",
                     help="allow --save_dir to hold a different, earlier run (its files are replaced)")
    run.add_argument("--scale", choices=["demo", "paper"], default=None,
                     help="demo: " + " ".join(f"--{k} {v}" for k, v in DEMO_DEFAULTS.items())
                          + "; paper: the defaults listed here (FL-MRCM's). Without it: demo on the "
                          "synthetic sites unless any of " + ", ".join(f"--{k}" for k in SCALE_FLAGS)
                          + " is given, paper on real data (--data_root/--sites). Flags given "
                          "explicitly always win")
    run.add_argument("--demo", action="store_true", help="same as --scale demo")
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
                      help="training sites: letters (BFHI) or comma-separated names (--phase test: the checkpoint's)")
    data.add_argument("--test_dataset", default=None,
                      help="target site evaluated every round (default: H; with --phase test: the run's own)")
    data.add_argument("--val_dataset", default=None,
                      help="more sites evaluated every round besides the target and the training sites "
                           "(letters or comma-separated names), e.g. every unseen site of a transfer study")
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
    model.add_argument("--task", choices=["reconstruction", "synthesis"], default="reconstruction",
                       help="reconstruction (the model is --model) or contrast synthesis (--source_contrast "
                            "-> --target_contrast, pFLSynth's generator)")
    model.add_argument("--model", choices=[k for k in TASKS if k != "synthesis"], default="unet",
                       help="reconstruction model: " + "; ".join(f"{k}: {t.summary}" for k, t in TASKS.items()
                                                                 if k != "synthesis"))
    model.add_argument("--chans", type=int, default=None,
                       help="channels of the first U-Net level (the VarNet's cascades' U-Nets); default: "
                            + task_defaults_help("chans"))
    model.add_argument("--num_pools", type=int, default=4, help="U-Net down-sampling levels")
    model.add_argument("--drop_prob", type=float, default=0.0)
    model.add_argument("--norm", choices=["instance", "instance_affine", "batch"], default="instance",
                       help="U-Net normalisation; instance is fastMRI's (no parameters). "
                            "FedBN needs a norm with parameters: instance_affine or batch")

    fed = p.add_argument_group("federated training")
    fed.add_argument("--epochs", type=int, default=50,
                     help=f"communication rounds; demo scale: {DEMO_DEFAULTS['epochs']:g}")
    fed.add_argument("--num_users", type=int, default=None,
                     help="clients; a multiple of the number of training sites splits each site's "
                          "volumes among several clients (default: one client per site)")
    fed.add_argument("--frac", type=float, default=1.0, help="fraction of clients taking part in each round")
    fed.add_argument("--local_ep", type=int, default=2,
                     help=f"local epochs per round; demo scale: {DEMO_DEFAULTS['local_ep']:g}")
    fed.add_argument("--local_bs", type=int, default=16,
                     help=f"local training batch size; demo scale: {DEMO_DEFAULTS['local_bs']:g}")
    fed.add_argument("--bs", type=int, default=8, help="evaluation batch size")
    fed.add_argument("--lr", type=float, default=None, help="learning rate; default: " + task_defaults_help("lr"))
    fed.add_argument("--optimizer", choices=["rmsprop", "adam"], default=None,
                     help="local optimiser; default: " + task_defaults_help("optimizer"))
    fed.add_argument("--lr_step", type=int, default=40, help="StepLR step size, in rounds")
    fed.add_argument("--lr_gamma", type=float, default=0.1, help="StepLR decay factor")
    fed.add_argument("--weighting", choices=["uniform", "samples"], default="uniform",
                     help="aggregation weights: equal (the paper) or by training slices")
    fed.add_argument("--eval_every", type=int, default=1, help="evaluate every N rounds (and after the last)")
    fed.add_argument("--min_clients", type=int, default=1,
                     help="stop the run when fewer clients than this finish a round")

    for task in TASKS.values():
        task.add_arguments(p.add_argument_group(f"{task.name} model"))
    add_augment_arguments(p.add_argument_group("augmentation (MRAugment)"))
    add_privacy_arguments(p.add_argument_group("differential privacy (client level, DP-FedAvg)"))
    add_dpsgd_arguments(p.add_argument_group("differential privacy (sample level, DP-SGD with Opacus)"))
    for strategy in STRATEGIES.values():
        strategy.add_arguments(p.add_argument_group(f"{strategy.name} strategy"))
    return p


def parse_options(argv: Sequence[str], prog: str, default_strategy: str, description: str,
                  extend: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """Parse `argv` at the scale it asks for (see `resolve_scale`); `opts.scale` and `opts.demo` say which.
    `extend` adds a front end's own flags (the Flower launcher's)."""
    parser = build_parser(prog, default_strategy, description)
    if extend is not None:
        extend(parser)
    argv = list(argv)
    opts = parser.parse_args(argv)
    scale = resolve_scale(parser, argv, opts)
    demo = scale == "demo"
    # Flags with a parser default (--epochs, --local_bs, ...) take the task's value at this scale
    # (pFLSynth trains at batch size 1); the command's own values still win.
    values = task_scale_values(TASKS[task_name(opts)], demo)
    run_defaults = {**(DEMO_DEFAULTS if demo else {}),
                    **{k: v for k, v in values.items() if parser.get_default(k) is not None}}
    if run_defaults:
        parser.set_defaults(**run_defaults)
        opts = parser.parse_args(argv)
    opts.scale, opts.demo = scale, demo
    fill_task_defaults(opts)
    return opts


def task_scale_values(task, demo: bool) -> dict[str, object]:
    """`Task.paper_defaults`, updated by `Task.demo_defaults` at demo scale."""
    return {**task.paper_defaults, **(task.demo_defaults if demo else {})}


def fill_task_defaults(opts: argparse.Namespace) -> None:
    """The model's own flags that the command left unset (default None): the task's demo values at
    demo scale, else its paper values (`Task.paper_defaults`, `Task.demo_defaults`)."""
    for key, value in task_scale_values(TASKS[task_name(opts)], opts.demo).items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)


def task_defaults_help(flag: str) -> str:
    """'unet 32 (demo 16), varnet 18 (demo 8)': each task's paper and demo value of `flag`."""
    parts = []
    for name, task in TASKS.items():
        if flag in task.paper_defaults:
            demo = task.demo_defaults.get(flag)
            parts.append(f"{name} {task.paper_defaults[flag]}" + (f" (demo {demo})" if demo is not None else ""))
    return ", ".join(parts)


def resolve_scale(parser: argparse.ArgumentParser, argv: list[str], opts: argparse.Namespace) -> str:
    """--scale (or --demo) when given; else demo on the synthetic sites without a scale flag, paper otherwise."""
    if opts.demo and opts.scale == "paper":
        parser.error("--demo and --scale paper contradict each other; give one of them")
    if opts.demo or opts.scale:
        return opts.scale or "demo"
    real_data = opts.data_root is not None or opts.sites is not None
    return "paper" if real_data or scale_flags_given(parser, argv) else "demo"


def scale_flags_given(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The SCALE_FLAGS on the command line, however spelled (`--lr=1e-3`, an abbreviation, ...)."""
    unset = object()
    probe = copy.deepcopy(parser)
    probe.set_defaults(**{k: unset for k in SCALE_FLAGS})
    given = probe.parse_args(argv)
    return [k for k in SCALE_FLAGS if getattr(given, k) is not unset]
