"""What every entry script runs: parse the options, check them, dispatch to train or test, and turn
user errors into one line on stderr with exit code 2."""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

from federated import distributed
from federated.strategies import STRATEGIES, describe
from federated.tasks import TASKS, task_name
from options import REAL_DATA_RESOLUTION, SYNTHETIC_RESOLUTION, parse_options
from utils.console import Console
from utils.errors import UserError

DEFAULT_TEST_SITE = "H"


def check_options(opts: argparse.Namespace) -> None:
    """Flag values that are wrong whatever the data; each message names the flag."""
    positive = {"epochs": opts.epochs, "local_ep": opts.local_ep, "local_bs": opts.local_bs, "bs": opts.bs,
                "chans": opts.chans, "num_pools": opts.num_pools, "eval_every": opts.eval_every,
                "lr_step": opts.lr_step}
    for flag, value in positive.items():
        if value is not None and value < 1:  # None: a flag the run's task does not use (--chans for synthesis)
            raise UserError(f"--{flag} {value}: must be at least 1")
    if opts.num_users is not None and opts.num_users < 1:
        raise UserError(f"--num_users {opts.num_users}: must be at least 1")
    if not 0 < opts.frac <= 1:
        raise UserError(f"--frac {opts.frac}: must be in (0, 1]")
    for flag in ("sample_rate", "val_sample_rate"):
        if not 0 < getattr(opts, flag) <= 1:
            raise UserError(f"--{flag} {getattr(opts, flag)}: must be in (0, 1]")
    if opts.lr <= 0:
        raise UserError(f"--lr {opts.lr}: must be positive")
    if not 0 <= opts.drop_prob < 1:
        raise UserError(f"--drop_prob {opts.drop_prob}: must be in [0, 1)")
    TASKS[task_name(opts)](opts).check_options()
    from data.augment import check_augment_options
    check_augment_options(opts, STRATEGIES[opts.strategy].schedule_per_epoch)
    from federated.privacy import check_privacy_options
    check_privacy_options(opts)
    strategy = STRATEGIES[opts.strategy]
    if opts.dp_clip is not None and strategy.client_dp_refusal:
        raise UserError(f"--dp_clip with --strategy {opts.strategy}: {strategy.client_dp_refusal}; "
                        "drop the --dp_ flags")
    from federated.dpsgd import check_dpsgd_options
    check_dpsgd_options(opts, TASKS[task_name(opts)](opts), strategy, distributed.current().active)
    if opts.num_workers < 0:
        raise UserError(f"--num_workers {opts.num_workers}: must be 0 or more")
    # Mask flags are checked where masks are made; make one now so a bad value fails before any work.
    from data.subsample import create_mask_for_mask_type
    create_mask_for_mask_type(opts.mask_type, opts.center_fractions, opts.accelerations)


def uses_synthetic(opts: argparse.Namespace) -> bool:
    return opts.data_root is None and opts.sites is None


def default_resolution(opts: argparse.Namespace) -> int:
    """The synthetic sites' size; else what the sites file declares; else the paper's crop."""
    if uses_synthetic(opts):
        return SYNTHETIC_RESOLUTION
    from data.sites import declared_resolution
    declared = declared_resolution(Path(opts.data_root) if opts.data_root else None,
                                   Path(opts.sites) if opts.sites else None)
    return declared or REAL_DATA_RESOLUTION


def default_save_dir(opts: argparse.Namespace) -> str:
    """runs/<strategy>-<train>-to-<test>-<sequence>, numbered -2, -3, ... when that already holds a
    run: a folder the user did not choose is never refused (--continues takes the unnumbered one).
    --phase test: the checkpoint's run folder; for --pretrained weights runs/<weights>-on-<test>."""
    if opts.phase == "test":
        if opts.checkpoint is not None:
            return str(Path(opts.checkpoint).parent)
        if opts.pretrained is not None:
            return str(Path("runs") / f"{Path(opts.pretrained).stem}-on-{opts.test_dataset}")
    train = opts.train_dataset.replace(",", "")
    base = Path("runs") / f"{opts.strategy}-{train}-to-{opts.test_dataset}-{opts.sequence}"
    candidate, n = base, 1
    while not opts.continues and (candidate / "options.json").exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return str(candidate)


def resume_command(prog: str, save_dir: str) -> str:
    return f"python {prog} --resume {shlex.quote(save_dir)}"


def main(argv: Sequence[str] | None, prog: str, default_strategy: str, description: str) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = parse_options(argv, prog, default_strategy, description)
    try:
        group = distributed.setup(opts.device)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    # Under torchrun only rank 0 prints; the others compute the same run in silence.
    log = Console(quiet=opts.quiet, verbose=opts.verbose, silent=not group.writer)
    previous = _stop_on_sigterm()
    try:
        return run(opts, argv, prog, log)
    except UserError as e:
        if group.writer:
            print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm():
    """SIGTERM stops a run as Ctrl-C does (the last round kept, the resume command printed): a run
    started in the background ignores SIGINT, and the grid runner and torchrun stop runs with
    SIGTERM. Returns the previous handler (None when this is not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    return signal.signal(signal.SIGTERM, interrupt)


def run(opts: argparse.Namespace, argv: list[str], prog: str, log: Console) -> int:
    from federated.server import RunStopped, train

    if opts.strategy == "list":
        print(describe())
        return 0
    group = distributed.current()
    error = None
    try:
        opts = resolve_options(opts, argv, log)
    except UserError as e:
        error = e
    group.agree(error)
    if opts.phase == "test":
        if not group.writer:
            return 0  # the test phase runs in one process (rank 0)
        from federated.inference import test
        test(opts, log)
        return 0
    strategy = STRATEGIES[opts.strategy](opts)
    try:
        train(opts, strategy, log)
    except KeyboardInterrupt:
        if group.writer:
            print(f"\ninterrupted; the last complete round is saved in {opts.save_dir}/last.pt. "
                  f"Continue with: {resume_command(prog, opts.save_dir)}", file=sys.stderr)
        return 130
    except RunStopped as e:
        if group.writer:
            print(f"{prog}: stopped: {e}. The last complete round is in {opts.save_dir}/last.pt; "
                  f"continue with: {resume_command(prog, opts.save_dir)}", file=sys.stderr)
        return 1
    return 0


def resolve_options(opts: argparse.Namespace, argv: list[str], log: Console) -> argparse.Namespace:
    """The options the run records: a resumed run's own, defaults that depend on the data filled
    in, every value checked. The Flower ServerApp and launcher resolve theirs here too."""
    if opts.strategy not in STRATEGIES:
        raise UserError(f"--strategy {opts.strategy}: unknown; choose one of {', '.join(STRATEGIES)} "
                        "(`--strategy list` describes them)")
    if opts.resume:
        opts = resumed_options(opts, argv)
    if opts.test_dataset is None and opts.phase == "train":
        opts.test_dataset = DEFAULT_TEST_SITE
    if opts.resolution is None:
        opts.resolution = default_resolution(opts)
    check_options(opts)
    if opts.save_dir is None:
        opts.save_dir = default_save_dir(opts)
    if uses_synthetic(opts):
        log.info("Using the synthetic sites (no --data_root or --sites given); "
                 "point it at real data with --data_root DIR or --sites FILE (see README).")
    return opts


def resumed_options(opts: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """--resume DIR: the saved run's options, with the few that may change taken from this command."""
    import json

    saved = Path(opts.resume) / "options.json"
    if not saved.is_file():
        raise UserError(f"--resume {opts.resume}: no run there (no options.json); pass the --save_dir of a run")
    try:
        values = json.loads(saved.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{saved}: unreadable ({e}); cannot continue this run") from None
    given = {a.split("=")[0].lstrip("-") for a in argv if a.startswith("--")}
    explicit = {k: getattr(opts, k) for k in ("epochs", "quiet", "verbose", "num_workers", "device", "amp")
                if k in given}
    # Defaults first: a run saved before an option existed continues with that option's default.
    resumed = argparse.Namespace(**{**vars(opts), **values, **explicit})
    resumed.save_dir, resumed.continues, resumed.resume = opts.resume, True, None
    return resumed
