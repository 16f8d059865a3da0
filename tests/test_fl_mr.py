"""FL-MR end to end: the seed command line, run outputs, determinism, resumption, the test phase."""
from __future__ import annotations

import csv
import shlex

import h5py
import torch

from tests.conftest import TINY_RUN, run_cli

SEED_COMMAND = ("--phase train --dataset mri --model unet --epochs 50 --challenge singlecoil --local_bs 16 "
                "--num_users 4 --local_ep 2 --train_dataset BFHI --test_dataset H --sequence T1 --accelerations 4 "
                "--center-fractions 0.08 --val_sample_rate 1.0 --save_dir {save_dir} --verbose")


def read_metrics(path) -> list[dict]:
    with open(path / "metrics.csv") as f:
        return list(csv.DictReader(f))


def final_weights(save_dir) -> dict[str, torch.Tensor]:
    return torch.load(save_dir / "last.pt", weights_only=True)["model"]


def test_seed_command_runs_verbatim(tiny_root, tmp_path):
    # The FL-MRCM README line as written, shortened only by the user's own --epochs.
    args = shlex.split(SEED_COMMAND.format(save_dir=tmp_path / "run")) + ["--epochs", "1", "--data_root", str(tiny_root)]
    assert run_cli(args) == 0
    run = tmp_path / "run"
    assert {"options.json", "metrics.csv", "last.pt", "best.pt"} <= {p.name for p in run.iterdir()}
    rows = read_metrics(run)
    val = [r for r in rows if r["split"] == "val" and r["psnr"]]
    assert {r["site"] for r in val if r["model"] == "global"} == {"B", "F", "H", "I"}
    assert {r["site"] for r in val if r["model"] == "zero_filled"} == {"B", "F", "H", "I"}
    assert {r["model"] for r in rows if r["split"] == "train"} == {"B", "F", "H", "I"}


def test_same_seed_same_metrics(tiny_root, tmp_path):
    common = TINY_RUN + ["--data_root", str(tiny_root), "--epochs", "2", "--seed", "3"]
    for name in ("a", "b"):
        assert run_cli(common + ["--save_dir", str(tmp_path / name)]) == 0
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert drop_time(read_metrics(tmp_path / "a")) == drop_time(read_metrics(tmp_path / "b"))
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_reaches_the_same_weights(tiny_root, tmp_path):
    common = TINY_RUN + ["--data_root", str(tiny_root), "--frac", "0.5", "--sample_rate", "1.0"]
    assert run_cli(common + ["--epochs", "3", "--save_dir", str(tmp_path / "straight")]) == 0
    assert run_cli(common + ["--epochs", "2", "--save_dir", str(tmp_path / "split")]) == 0
    assert run_cli(["--resume", str(tmp_path / "split"), "--epochs", "3"]) == 0
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert drop_time(read_metrics(tmp_path / "straight")) == drop_time(read_metrics(tmp_path / "split"))


def test_weighting_uniform_or_by_slices():
    from argparse import Namespace
    from types import SimpleNamespace

    from federated.aggregation import weighted_average
    from federated.strategies.fedavg import FedAvg

    clients = [SimpleNamespace(num_slices=30), SimpleNamespace(num_slices=10)]
    assert FedAvg(Namespace(weighting="uniform")).client_weights(clients) == [1.0, 1.0]
    weights = FedAvg(Namespace(weighting="samples")).client_weights(clients)
    assert weights == [30.0, 10.0]
    states = [{"w": torch.tensor([4.0]), "n": torch.tensor(3)}, {"w": torch.tensor([8.0]), "n": torch.tensor(5)}]
    assert weighted_average(states, weights, ["w", "n"]) == {"w": torch.tensor([5.0]), "n": torch.tensor(4)}
    assert weighted_average(states, [1.0, 1.0], ["w"])["w"].item() == 6.0


def test_test_phase_writes_submission_layout_and_figure(tiny_root, tmp_path):
    run = tmp_path / "run"
    assert run_cli(TINY_RUN + ["--data_root", str(tiny_root), "--save_dir", str(run)]) == 0
    assert run_cli(["--phase", "test", "--checkpoint", str(run / "best.pt"), "--data_root", str(tiny_root),
                    "--save_dir", str(run), "--quiet"]) == 0
    recon_dir = run / "test" / "reconstructions" / "H"
    files = sorted(recon_dir.glob("*.h5"))
    assert files
    with h5py.File(files[0]) as f:
        assert f["reconstruction"].ndim == 3 and f["reconstruction"].shape[1:] == (32, 32)
    assert (run / "test" / "figures" / "H.png").stat().st_size > 0
    rows = list(csv.DictReader(open(run / "test" / "metrics.csv")))
    assert {r["split"] for r in rows} == {"test"}


def test_strategy_list(capsys):
    assert run_cli(["--strategy", "list"]) == 0
    out = capsys.readouterr().out
    assert "fedavg" in out and "mrcm" in out
