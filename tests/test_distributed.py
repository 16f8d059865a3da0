"""Data-parallel training under torchrun (real torchrun processes, gloo on CPU): every global batch
is split over the processes and the run ends where the one-process run ends."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from data.synthetic import SyntheticConfig, ensure_synthetic_sites
from federated.distributed import Group, ShardedBatches, shard_volumes
from tests.conftest import default_sigint, run_cli, wait_until
from tests.test_varnet_runs import TINY_VARNET

REPO = Path(__file__).resolve().parents[1]
# Two validation volumes per site: each of two processes scores one.
DATA = SyntheticConfig(resolution=32, train=2, val=2, test=1, slices=4, seed=0)
MULTICOIL = SyntheticConfig(resolution=32, train=2, val=2, test=1, slices=3, seed=0, multicoil=True, coils=4)
UNET = ["--chans", "4", "--num_pools", "2", "--local_ep", "1", "--local_bs", "4", "--quiet",
        "--train_dataset", "FH", "--test_dataset", "H"]
# The tiny VarNet of tests/test_varnet_runs.py, pooled on one site (one k-space size per batch).
VARNET = TINY_VARNET + ["--strategy", "central", "--train_dataset", "F", "--test_dataset", "F"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return ensure_synthetic_sites(DATA, tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def multicoil_root(tmp_path_factory) -> Path:
    return ensure_synthetic_sites(MULTICOIL, tmp_path_factory.mktemp("ddp-multicoil"))


def torchrun(args: list[str], nproc: int = 2, **popen) -> subprocess.Popen:
    """main_fl_mr.py under torchrun with `nproc` gloo processes, one math thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "main_fl_mr.py", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint, **popen)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def max_weight_difference(a: Path, b: Path) -> float:
    wa = torch.load(a / "last.pt", weights_only=True)["model"]
    wb = torch.load(b / "last.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def assert_same_metrics(a: Path, b: Path, tol: float = 1e-4) -> None:
    ra, rb = (list(csv.DictReader(open(p / "metrics.csv"))) for p in (a, b))
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            if k == "seconds":
                continue
            try:
                assert float(x[k] or "nan") == pytest.approx(float(y[k] or "nan"), abs=tol, nan_ok=True), (k, x, y)
            except ValueError:
                assert x[k] == y[k]


def test_each_step_splits_the_one_process_batch():
    """Rank r's share of step k is part of the one-process batch k; the shares cover it exactly and
    the client's generator ends in the same state."""
    n, bs = 10, 4
    g1 = torch.Generator().manual_seed(3)
    one = [b.tolist() for b in DataLoader(range(n), batch_size=bs, shuffle=True, generator=g1)]
    for world in (2, 4):
        gens = [torch.Generator().manual_seed(3) for _ in range(world)]
        shares = [list(DataLoader(range(n), batch_sampler=ShardedBatches(n, bs, gens[r], r, world), generator=gens[r]))
                  for r in range(world)]
        steps = [sorted(sum((s[k].tolist() for s in shares), [])) for k in range(len(shares[0]))]
        # world 4: the last batch of 2 slices cannot be split over 4 processes and is skipped.
        expected = [sorted(b) for b in one if len(b) >= world]
        assert steps == expected
        assert all(torch.equal(g.get_state(), g1.get_state()) for g in gens)


def test_evaluation_volumes_are_dealt_round_robin(root):
    from data.mri_data import SliceDataset
    files = sorted((root / "F" / "T1" / "val").glob("*.h5")) + sorted((root / "H" / "T1" / "val").glob("*.h5"))
    dataset = SliceDataset(files, lambda *a: 0, fmt="fastmri_h5", challenge="singlecoil")
    seen = []
    for rank in range(2):
        shard, ordinals = shard_volumes(Group(rank, 2, rank, active=True), dataset)
        assert ordinals == list(range(rank, len(files), 2))
        seen += [dataset.examples[i] for i in shard.indices]
    assert sorted(seen) == sorted(dataset.examples)


def test_two_processes_end_with_the_one_process_weights_and_metrics(root, tmp_path):
    args = UNET + ["--data_root", str(root), "--epochs", "2"]
    assert run_cli(args + ["--save_dir", str(tmp_path / "one")]) == 0
    rc, err = finish(torchrun(args + ["--save_dir", str(tmp_path / "runs" / "two")]))
    assert rc == 0, err
    assert max_weight_difference(tmp_path / "one", tmp_path / "runs" / "two") <= 1e-5
    assert_same_metrics(tmp_path / "one", tmp_path / "runs" / "two")
    # Exactly one run folder, written once.
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["two"]
    assert sorted(p.name for p in (tmp_path / "runs" / "two").iterdir()) == \
        ["best.pt", "last.pt", "metrics.csv", "options.json"]


@pytest.mark.slow
def test_central_varnet_two_processes_equal_one(multicoil_root, tmp_path):
    args = VARNET + ["--data_root", str(multicoil_root), "--epochs", "1"]
    assert run_cli(args + ["--save_dir", str(tmp_path / "one")]) == 0
    rc, err = finish(torchrun(args + ["--save_dir", str(tmp_path / "two")]))
    assert rc == 0, err
    assert max_weight_difference(tmp_path / "one", tmp_path / "two") <= 1e-5
    assert_same_metrics(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
@pytest.mark.parametrize("strategy, extra", [("fedbn", ["--norm", "instance_affine"]), ("mrcm", [])])
def test_fedbn_and_mrcm_under_two_processes(root, tmp_path, strategy, extra):
    """Each process holds the same local norms / discriminator; one round matches one process."""
    args = UNET + ["--data_root", str(root), "--epochs", "1", "--strategy", strategy, *extra]
    assert run_cli(args + ["--save_dir", str(tmp_path / "one")]) == 0
    rc, err = finish(torchrun(args + ["--save_dir", str(tmp_path / "two")]))
    assert rc == 0, err
    assert max_weight_difference(tmp_path / "one", tmp_path / "two") <= 1e-5
    one, two = (torch.load(p / "last.pt", weights_only=True)["clients"] for p in (tmp_path / "one", tmp_path / "two"))
    for name in one:
        for part in ("local_weights", "extra"):
            flat_a, flat_b = _tensors(one[name][part]), _tensors(two[name][part])
            assert len(flat_a) == len(flat_b)
            assert all((a.double() - b.double()).abs().max() <= 1e-5 for a, b in zip(flat_a, flat_b))


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


@pytest.mark.slow
def test_a_killed_process_stops_the_run_and_one_process_resumes_it(root, tmp_path):
    args = UNET + ["--data_root", str(root), "--epochs", "4"]
    assert run_cli(args + ["--save_dir", str(tmp_path / "straight")]) == 0
    run = tmp_path / "killed"
    proc = torchrun(args + ["--save_dir", str(run)], start_new_session=True)
    try:
        wait_until((run / "last.pt").exists, "round 1 is saved (last.pt)", proc)
        workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        os.kill(workers[-1], signal.SIGKILL)
        start = time.monotonic()
        rc, _ = finish(proc, timeout=120)
        assert rc != 0 and time.monotonic() - start < 120
        assert all(not Path(f"/proc/{w}").exists() or "zombie" in Path(f"/proc/{w}/status").read_text()
                   for w in workers)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    saved = torch.load(run / "last.pt", weights_only=True)["round"]
    assert 1 <= saved < 4
    assert run_cli(["--resume", str(run), "--quiet"]) == 0
    assert max_weight_difference(tmp_path / "straight", run) <= 1e-5


def test_a_client_failing_on_one_process_is_left_out_on_all(root, tmp_path):
    import shutil

    from tests.test_recovery import put_nan_in_training_file
    data = tmp_path / "data"
    shutil.copytree(root, data)
    bad = put_nan_in_training_file(data, "F")
    rc, err = finish(torchrun(UNET + ["--data_root", str(data), "--epochs", "1", "--save_dir", str(tmp_path / "r")]))
    assert rc == 0, err
    assert err.count("client F (site F) left out") == 1 and bad.name in err
    rows = list(csv.DictReader(open(tmp_path / "r" / "metrics.csv")))
    assert [r["model"] for r in rows if r["split"] == "train"] == ["H"]


@pytest.mark.parametrize("extra, message", [
    (["--local_bs", "3"], "--local_bs 3: the global batch is split over 2 processes"),
    pytest.param(["--val_sample_rate", "0.5"], "validation split has 1 volume(s), fewer than the 2 processes",
                 marks=pytest.mark.slow),
    pytest.param(["--norm", "batch"], "--norm batch: batch statistics", marks=pytest.mark.slow),
])
def test_a_world_that_cannot_split_the_work_is_one_line_and_writes_nothing(root, tmp_path, extra, message):
    run = tmp_path / "r"
    rc, err = finish(torchrun(UNET + ["--data_root", str(root), "--epochs", "1", "--save_dir", str(run), *extra]))
    assert rc != 0
    ours = [line for line in err.splitlines() if line.startswith("main_fl_mr.py: error:")]
    assert len(ours) == 1 and message in ours[0], err
    assert "exitcode  : 2" in err
    assert not run.exists()


@pytest.mark.slow
def test_a_grid_trains_each_run_under_torchrun(root, tmp_path):
    """`python -m experiments run --nproc_per_node 2`: each run trains over 2 processes and ends
    where the one-process command ends; its test phase runs in one process."""
    import json
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({
        "description": "one FedAvg run", "test_phase": True,
        "flags": {"chans": 4, "num_pools": 2, "local_ep": 1, "local_bs": 4, "train_dataset": "FH",
                  "test_dataset": "H", "epochs": 1, "quiet": True},
        "axes": {"seed": {"flag": "seed", "values": [0]}},
    }))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "experiments", "run", str(grid), "--out", str(out), "--quiet",
                           "--nproc_per_node", "2", "--", "--data_root", str(root)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    assert "torch.distributed.run --standalone --nproc_per_node 2" in (run / "log.txt").read_text()
    assert (run / "test").is_dir()
    assert run_cli(UNET + ["--data_root", str(root), "--epochs", "1", "--seed", "0",
                           "--save_dir", str(tmp_path / "one")]) == 0
    assert max_weight_difference(tmp_path / "one", run) <= 1e-5


def test_more_processes_than_gpus_is_one_line_before_joining(monkeypatch, capsys, root, tmp_path):
    """What rank 0 of `torchrun --nproc_per_node 2 ... --device cuda` says on a node with fewer GPUs."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    assert run_cli(UNET + ["--data_root", str(root), "--device", "cuda", "--save_dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["main_fl_mr.py: error: --device cuda: 2 processes on this node but 1 GPU(s); start torchrun "
                   "with --nproc_per_node 1 or use --device cpu"]
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_ctrl_c_stops_every_process_and_keeps_the_last_round(root, tmp_path):
    run = tmp_path / "r"
    proc = torchrun(UNET + ["--data_root", str(root), "--epochs", "100000", "--save_dir", str(run)],
                    start_new_session=True)
    try:
        wait_until((run / "last.pt").exists, "round 1 is saved (last.pt)", proc)
        workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: to the whole group
        _, err = finish(proc, timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert all(not Path(f"/proc/{w}").exists() for w in workers)
    assert err.count(f"Continue with: python main_fl_mr.py --resume {run}") == 1
    assert torch.load(run / "last.pt", weights_only=True)["round"] >= 1
