"""Every bad input of the README's table ends in one line naming the flag or file, exit code 2, no
traceback, and nothing written to --save_dir. Input data is never modified."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from tests.conftest import TINY_RUN, run_cli


@pytest.fixture()
def data_copy(tiny_root, tmp_path) -> Path:
    """A copy of the tiny data root that a test may break."""
    return Path(shutil.copytree(tiny_root, tmp_path / "data"))


def first(root: Path, site: str, split: str = "train", pattern: str = "*") -> Path:
    return sorted((root / site / "T1" / split).glob(pattern))[0]


def expect_user_error(capsys, args: list[str], *needles: str, save_dir: Path | None = None) -> str:
    code = run_cli(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    if save_dir is not None:
        assert not save_dir.exists() or not any(save_dir.iterdir()), "something was written to --save_dir"
    return err


def flags(root: Path, save_dir: Path, *extra: str) -> list[str]:
    return TINY_RUN + ["--data_root", str(root), "--save_dir", str(save_dir), *extra]


@pytest.mark.parametrize("extra, needles", [
    (["--train_dataset", "BFXZ"], ["--train_dataset", "'X'"]),
    (["--accelerations", "0"], ["--accelerations"]),
    (["--center-fractions", "1.0"], ["--center-fractions"]),
    (["--accelerations", "4", "8", "--center-fractions", "0.08"], ["--accelerations", "--center-fractions"]),
    (["--num_users", "3"], ["--num_users"]),
    (["--test_dataset", "Q"], ["--test_dataset", "'Q'"]),
    (["--sequence", "T3"], ["T3"]),
    (["--frac", "0"], ["--frac"]),
    (["--strategy", "fedsgd"], ["--strategy"]),
])
def test_bad_flags(capsys, tiny_root, tmp_path, extra, needles):
    expect_user_error(capsys, flags(tiny_root, tmp_path / "run", *extra), *needles, save_dir=tmp_path / "run")


def test_missing_data_root(capsys, tmp_path):
    expect_user_error(capsys, flags(tmp_path / "nowhere", tmp_path / "run"), "--data_root", "nowhere",
                      save_dir=tmp_path / "run")


def test_unwritable_save_dir(capsys, tiny_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    expect_user_error(capsys, flags(tiny_root, blocker / "run"), "--save_dir")


def test_save_dir_holding_another_run(capsys, tiny_root, tmp_path):
    run = tmp_path / "run"
    assert run_cli(flags(tiny_root, run)) == 0
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    expect_user_error(capsys, flags(tiny_root, run, "--seed", "5"), "--save_dir", "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    assert run_cli(flags(tiny_root, run, "--seed", "5", "--overwrite")) == 0


def test_pretrained_weights_of_another_shape(capsys, tiny_root, tmp_path):
    from models.unet import Unet
    torch.save(Unet(chans=8, num_pool_layers=2).state_dict(), tmp_path / "w.pt")
    expect_user_error(capsys, flags(tiny_root, tmp_path / "run", "--pretrained", str(tmp_path / "w.pt")),
                      "w.pt", "--chans 8", save_dir=tmp_path / "run")


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.write_text("hello"), "not a PyTorch checkpoint"),
    (lambda p: torch.save({"x": Payload()}, p), "weights-only"),
    (lambda p: torch.save({"model": {}}, p), "not a fedrecon run checkpoint"),
])
def test_bad_checkpoints(capsys, tiny_root, tmp_path, make, needle):
    path = tmp_path / "bad.pt"
    make(path)
    expect_user_error(capsys, ["--phase", "test", "--checkpoint", str(path), "--data_root", str(tiny_root),
                               "--save_dir", str(tmp_path / "out"), "--quiet"], "bad.pt", needle,
                      save_dir=tmp_path / "out")
    expect_user_error(capsys, flags(tiny_root, tmp_path / "run", "--pretrained", str(path)), "bad.pt",
                      save_dir=tmp_path / "run")


def _without_kspace(path: Path) -> None:
    path.unlink()
    with h5py.File(path, "w") as f:
        f.create_dataset("reconstruction_esc", data=np.zeros((4, 32, 32), np.float32))


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _not_hdf5(path: Path) -> None:
    path.write_text("this is not HDF5")


def _nan_in_val(path: Path) -> None:
    with h5py.File(path, "r+") as f:
        k = f["kspace"][()]
        k[1, 3, 3] = np.nan
        f["kspace"][...] = k


@pytest.mark.parametrize("site, split, pattern, corrupt, needle", [
    ("F", "train", "*.h5", _without_kspace, "kspace"),
    ("H", "train", "*.h5", _truncated, ""),
    ("F", "val", "*.h5", _not_hdf5, ""),
    ("H", "val", "*.h5", _nan_in_val, "NaN"),
])
def test_bad_files(capsys, data_copy, tmp_path, site, split, pattern, corrupt, needle):
    bad = first(data_copy, site, split, pattern)
    corrupt(bad)
    expect_user_error(capsys, flags(data_copy, tmp_path / "run"), bad.name, needle, save_dir=tmp_path / "run")


def test_nifti_that_is_not_3d(capsys, data_copy, tmp_path):
    bad = first(data_copy, "I", "train", "*.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)), bad)
    expect_user_error(capsys, flags(data_copy, tmp_path / "run"), bad.name, "3-D", save_dir=tmp_path / "run")


def test_empty_split(capsys, data_copy, tmp_path):
    folder = data_copy / "B" / "T1" / "val"
    for f in folder.iterdir():
        f.unlink()
    expect_user_error(capsys, flags(data_copy, tmp_path / "run"), str(folder), save_dir=tmp_path / "run")


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_input_data_is_never_modified(data_copy, tmp_path):
    before = tree_hashes(data_copy)
    run = tmp_path / "run"
    assert run_cli(flags(data_copy, run, "--epochs", "2")) == 0
    assert run_cli(["--phase", "test", "--checkpoint", str(run / "last.pt"), "--data_root", str(data_copy),
                    "--save_dir", str(run), "--quiet"]) == 0
    assert tree_hashes(data_copy) == before
