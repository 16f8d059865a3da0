"""The VarNet task through the command line: every strategy runs a round on multicoil sites or
refuses in one line, its bad inputs end with one line and exit 2, and --phase test writes the
fastMRI submission layout."""
from __future__ import annotations

import csv
from pathlib import Path

import h5py
import pytest
import torch

from data.synthetic import SyntheticConfig, ensure_synthetic_sites
from models.varnet import VarNet
from tests.conftest import run_cli

MULTICOIL = SyntheticConfig(resolution=32, train=2, val=1, test=1, slices=3, seed=0, multicoil=True, coils=4)
TINY_VARNET = ["--model", "varnet", "--challenge", "multicoil", "--train_dataset", "FH", "--test_dataset", "H",
               "--num_cascades", "1", "--chans", "2", "--pools", "1", "--sens_chans", "2", "--sens_pools", "1",
               "--epochs", "1", "--local_ep", "1", "--local_bs", "2", "--quiet"]


@pytest.fixture(scope="module")
def multicoil_root(tmp_path_factory) -> Path:
    return ensure_synthetic_sites(MULTICOIL, tmp_path_factory.mktemp("multicoil"))


def val_rows(save_dir: Path) -> list[dict]:
    with open(save_dir / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r["split"] == "val" and r["psnr"]]


@pytest.mark.parametrize("strategy, extra", [("fedavg", []), ("fedprox", []), ("fedbn", ["--norm", "instance_affine"]),
                                             ("fedmri", []), ("local", []), ("pfl", []),
                                             # F and H k-space differ in width: pooled, they batch one by one
                                             ("central", ["--local_bs", "1"])])
def test_every_shared_or_local_strategy_trains_a_varnet_round(multicoil_root, tmp_path, strategy, extra):
    save = tmp_path / "run"
    args = TINY_VARNET + ["--data_root", str(multicoil_root), "--strategy", strategy, "--save_dir", str(save)]
    assert run_cli(args + extra) == 0
    rows = val_rows(save)
    assert {r["model"] for r in rows} >= {"zero_filled"} and len({r["model"] for r in rows}) > 1
    assert {r["site"] for r in rows} == {"F", "H"}


def test_mrcm_refuses_the_varnet_in_one_line(multicoil_root, tmp_path, capsys):
    save = tmp_path / "run"
    args = TINY_VARNET + ["--data_root", str(multicoil_root), "--strategy", "mrcm", "--save_dir", str(save)]
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert "defines none" in err and "\n" not in err
    assert not save.exists()


def test_varnet_on_a_singlecoil_site_is_refused(multicoil_root, tmp_path, capsys):
    save = tmp_path / "run"
    args = TINY_VARNET + ["--data_root", str(multicoil_root), "--challenge", "singlecoil", "--save_dir", str(save)]
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--model varnet needs multicoil k-space" in err and "singlecoil" in err and "\n" not in err
    assert not save.exists()


def test_varnet_on_an_image_only_site_is_refused(multicoil_root, tmp_path, capsys):
    args = TINY_VARNET + ["--data_root", str(multicoil_root), "--train_dataset", "FI", "--save_dir",
                          str(tmp_path / "run")]
    assert run_cli(args) == 2
    assert "site 'I' is image-only" in capsys.readouterr().err


def test_zero_cascades_is_refused(multicoil_root, tmp_path, capsys):
    args = TINY_VARNET + ["--data_root", str(multicoil_root), "--num_cascades", "0", "--save_dir", str(tmp_path / "r")]
    assert run_cli(args) == 2
    assert capsys.readouterr().err.strip().endswith("--num_cascades 0: must be at least 1")


def test_pretrained_varnet_of_another_shape_names_the_flags(multicoil_root, tmp_path, capsys):
    weights = tmp_path / "varnet.pt"
    torch.save(VarNet(num_cascades=2, chans=2, pools=1, sens_chans=2, sens_pools=1).state_dict(), weights)
    args = TINY_VARNET + ["--data_root", str(multicoil_root), "--pretrained", str(weights),
                          "--save_dir", str(tmp_path / "r")]
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert "run with --num_cascades 2" in err and "\n" not in err
    assert not (tmp_path / "r").exists()


def test_test_phase_evaluates_fastmri_varnet_weights_without_a_run(multicoil_root, tmp_path):
    fastmri_models = pytest.importorskip("fastmri.models", reason="fastmri is not installed")
    torch.manual_seed(0)
    varnet = fastmri_models.VarNet(num_cascades=2, sens_chans=2, sens_pools=1, chans=2, pools=1)
    lightning = {"state_dict": {f"varnet.{k}": v for k, v in varnet.state_dict().items()}}
    torch.save(varnet.state_dict(), tmp_path / "varnet.pt")
    torch.save(lightning, tmp_path / "varnet.ckpt")
    for weights in ("varnet.pt", "varnet.ckpt"):
        # No size flags: read from the weights; no run, and only site H's data.
        assert run_cli(["--phase", "test", "--model", "varnet", "--pretrained", str(tmp_path / weights),
                        "--data_root", str(multicoil_root), "--test_dataset", "H", "--save_dir",
                        str(tmp_path / f"out-{weights}"), "--quiet"]) == 0
    rows = [list(csv.DictReader(open(tmp_path / f"out-{w}" / "test" / "metrics.csv"))) for w in ("varnet.pt", "varnet.ckpt")]
    assert [(r["model"], r["site"]) for r in rows[0]] == [("zero_filled", "H"), ("pretrained", "H")]
    assert rows[0] == rows[1]
    assert sorted((tmp_path / "out-varnet.pt" / "test" / "reconstructions" / "H").glob("*.h5"))


def test_test_phase_writes_the_fastmri_submission_layout(multicoil_root, tmp_path):
    save = tmp_path / "run"
    assert run_cli(TINY_VARNET + ["--data_root", str(multicoil_root), "--save_dir", str(save)]) == 0
    assert run_cli(["--phase", "test", "--checkpoint", str(save / "last.pt"), "--data_root", str(multicoil_root),
                    "--save_dir", str(save), "--quiet"]) == 0
    files = sorted((save / "test" / "reconstructions" / "H").glob("*.h5"))
    assert files
    with h5py.File(files[0]) as f:
        recon = f["reconstruction"][()]
    assert recon.ndim == 3 and recon.shape[0] == MULTICOIL.slices


def test_rot90_of_non_square_knee_kspace_in_batches_is_one_line(multicoil_root, tmp_path, capsys):
    save = tmp_path / "r"
    args = TINY_VARNET + ["--data_root", str(multicoil_root), "--train_dataset", "K", "--aug_on",
                          "--save_dir", str(save)]
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "site K's k-space is" in err[0] and "--local_bs 1" in err[0]
    assert not save.exists()
