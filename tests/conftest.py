"""Shared fixtures: a tiny synthetic multi-site data root, generated once per test session."""
from __future__ import annotations

from pathlib import Path

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
