"""Nothing lost: a failing client is left out of its round, and a run killed mid-round resumes to the
same final weights as an uninterrupted one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.conftest import TINY_RUN, default_sigint, run_cli, wait_until
from tests.test_bad_input import data_copy, first, flags  # noqa: F401  (data_copy is a fixture)
from tests.test_fl_mr import read_metrics

REPO = Path(__file__).resolve().parents[1]


def put_nan_in_training_file(root: Path, site: str) -> Path:
    bad = first(root, site, "train", "*.h5")
    with h5py.File(bad, "r+") as f:
        k = f["kspace"][()]
        k[:, 5, 5] = np.nan
        f["kspace"][...] = k
    return bad


def test_failing_client_is_left_out_and_the_run_finishes(capsys, data_copy, tmp_path):
    bad = put_nan_in_training_file(data_copy, "F")
    assert run_cli(flags(data_copy, tmp_path / "run", "--epochs", "2")) == 0
    err = capsys.readouterr().err
    assert "client F (site F) left out" in err and bad.name in err
    trained = [r["model"] for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert sorted(trained) == sorted(["B", "H", "I"] * 2)


def test_too_few_clients_stops_with_checkpoint_intact(capsys, data_copy, tmp_path):
    put_nan_in_training_file(data_copy, "F")
    assert run_cli(flags(data_copy, tmp_path / "run", "--min_clients", "4")) == 1
    err = capsys.readouterr().err
    assert "--min_clients 4" in err and "Traceback" not in err


def test_sigkill_mid_round_then_resume_gives_the_same_weights(tiny_root, tmp_path):
    # Six rounds: the kill follows round 1's checkpoint within milliseconds, five rounds before the end.
    args = TINY_RUN + ["--data_root", str(tiny_root), "--epochs", "6", "--local_ep", "3"]
    assert run_cli(args + ["--save_dir", str(tmp_path / "straight")]) == 0

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "main_fl_mr.py", *args, "--save_dir", str(run)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until((run / "last.pt").exists, "round 1 is saved (last.pt)", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    saved_round = torch.load(run / "last.pt", weights_only=True)["round"]
    assert saved_round < 6, "the run finished before the kill reached it"

    assert run_cli(["--resume", str(run), "--quiet"]) == 0
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    b = torch.load(run / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_keeps_the_last_round_and_prints_the_resume_command(tiny_root, tmp_path):
    run = tmp_path / "run"
    # Far more rounds than the wait can take: the interrupt always finds the run still training.
    args = TINY_RUN + ["--data_root", str(tiny_root), "--epochs", "100000", "--save_dir", str(run)]
    proc = subprocess.Popen([sys.executable, "main_fl_mr.py", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        wait_until((run / "last.pt").exists, "round 1 is saved (last.pt)", proc)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the run was still training 120 s after SIGINT")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert f"--resume {run}" in err and "Traceback" not in err
    assert torch.load(run / "last.pt", weights_only=True)["round"] >= 1
    assert not list(run.glob("*.tmp"))
