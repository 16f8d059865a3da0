"""Shared fixtures: a tiny synthetic multi-site data root, generated once per test session."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from data.synthetic import SyntheticConfig, ensure_synthetic_sites

# Small enough for a federated round in about a second on 2 CPU cores.
TINY = SyntheticConfig(resolution=32, train=2, val=1, test=1, slices=4, seed=0)
# Flags that make the model and the run tiny; tests add what they check.
TINY_RUN = ["--chans", "4", "--num_pools", "2", "--epochs", "1", "--local_ep", "1", "--local_bs", "4",
            "--quiet"]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A data root with sites F, H, I, B (T1, T2) and its sites.json."""
    return ensure_synthetic_sites(TINY, tmp_path_factory.mktemp("synthetic"))


def run_cli(args: list[str], prog: str = "main_fl_mr.py", strategy: str = "fedavg") -> int:
    from federated.cli import main
    return main(args, prog, strategy, "")


def straight_and_resumed(args: list[str], tmp_path: Path, rounds: int = 3) -> tuple[Path, Path]:
    """The run of `args` for `rounds` rounds straight, and one stopped after `rounds - 1` and resumed
    to `rounds` (`--resume`); returns their run folders (straight, resumed)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli(args + ["--epochs", str(rounds), "--save_dir", str(straight)]) == 0
    assert run_cli(args + ["--epochs", str(rounds - 1), "--save_dir", str(resumed)]) == 0
    assert run_cli(["--resume", str(resumed), "--epochs", str(rounds)]) == 0
    return straight, resumed


def wait_until(condition: Callable[[], bool], what: str, proc: subprocess.Popen | None = None,
               timeout: float = 300.0) -> None:
    """Poll `condition` until it holds. Fails naming `what` when `proc` exits first or after `timeout`
    seconds (generous: the wait is for a state, the bound only keeps a broken run from hanging the suite)."""
    end = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process exited with code {proc.returncode} before {what}")
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:.0f} s waiting until {what}")
        time.sleep(0.01)


def default_sigint() -> None:
    """Popen preexec_fn: a child started from a shell's background job inherits SIGINT ignored, and
    Python then never turns SIGINT into KeyboardInterrupt; give it the default disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
