"""--phase test on any site: a run's checkpoint (or public fastMRI weights) evaluated on a site that
only a new sites file names, with none of the training sites' data; per-client rows for personalised
methods; one-line errors when the model, the site or its split is missing."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from tests.conftest import TINY_RUN, run_cli


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def nifti_site(tiny_root: Path, folder: Path, split: str = "test") -> Path:
    """A sites file naming only site R, NIfTI volumes written with nibabel from the synthetic I
    site's test volumes (same names, so evaluation draws the same masks as on I)."""
    for src in sorted((tiny_root / "I" / "T1" / "test").glob("*.nii*")):
        image = nib.load(src)
        dest = folder / "R" / "T1" / split / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(image.get_fdata(dtype=np.float32)), image.affine), dest)
    sites = folder / "mine.json"
    sites.write_text(json.dumps({"resolution": 32, "sites": {"R": {"root": "R", "format": "nifti"}}}))
    return sites


@pytest.fixture(scope="module")
def fedavg_run(tiny_root, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fedavg") / "run"
    assert run_cli(TINY_RUN + ["--data_root", str(tiny_root), "--save_dir", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def sites_file(tiny_root, tmp_path_factory) -> Path:
    return nifti_site(tiny_root, tmp_path_factory.mktemp("mine"))


def test_global_model_on_a_site_only_the_new_sites_file_names(fedavg_run, sites_file, tiny_root, tmp_path):
    before = tree_hashes(sites_file.parent)
    out = tmp_path / "out"
    assert run_cli(["--phase", "test", "--checkpoint", str(fedavg_run / "best.pt"), "--sites", str(sites_file),
                    "--test_dataset", "R", "--save_dir", str(out), "--quiet"]) == 0
    rows = read_rows(out / "test" / "metrics.csv")
    assert [(r["model"], r["site"], r["split"]) for r in rows] == [("zero_filled", "R", "test"),
                                                                   ("global", "R", "test")]
    files = sorted((out / "test" / "reconstructions" / "R").glob("*.h5"))
    assert [f.stem for f in files] == [p.name.removesuffix(".nii.gz") for p in
                                       sorted((sites_file.parent / "R" / "T1" / "test").iterdir())]
    with h5py.File(files[0]) as f:
        assert f["reconstruction"].shape[1:] == (32, 32)
    assert (out / "test" / "figures" / "R.png").stat().st_size > 0
    assert tree_hashes(sites_file.parent) == before  # the test site's data is read-only

    # The same volumes under the run's own data root give the same scores: the checkpoint's model is
    # what was evaluated on R, and nothing else of the run's data took part.
    same = tmp_path / "same"
    assert run_cli(["--phase", "test", "--checkpoint", str(fedavg_run / "best.pt"), "--data_root", str(tiny_root),
                    "--test_dataset", "I", "--save_dir", str(same), "--quiet"]) == 0
    theirs = read_rows(same / "test" / "metrics.csv")
    assert [(r["model"], r["psnr"], r["ssim"]) for r in rows] == [(r["model"], r["psnr"], r["ssim"]) for r in theirs]


def test_several_test_sites_are_each_evaluated_as_alone(fedavg_run, tiny_root, tmp_path):
    """--test_dataset HF: one row pair and one figure per site, each site's rows as when tested alone."""
    both, alone = tmp_path / "both", tmp_path / "alone"
    common = ["--phase", "test", "--checkpoint", str(fedavg_run / "best.pt"), "--data_root", str(tiny_root), "--quiet"]
    assert run_cli(common + ["--test_dataset", "HF", "--save_dir", str(both)]) == 0
    assert run_cli(common + ["--test_dataset", "F", "--save_dir", str(alone)]) == 0
    rows = read_rows(both / "test" / "metrics.csv")
    assert [(r["model"], r["site"]) for r in rows] == [("zero_filled", "H"), ("global", "H"),
                                                       ("zero_filled", "F"), ("global", "F")]
    assert rows[2:] == read_rows(alone / "test" / "metrics.csv")
    assert {p.name for p in (both / "test" / "figures").iterdir()} == {"H.png", "F.png"}


def flower_checkpoint(path: Path, dest: Path) -> Path:
    """`path` as a Flower run writes it: the clients' state is on the nodes, only a study id here."""
    ckpt = torch.load(path, weights_only=True)
    ckpt["clients"] = {"flower_study": "study-0"}
    torch.save(ckpt, dest)
    return dest


def test_a_flower_run_of_a_shared_model_method_is_tested_as_its_global_model(fedavg_run, sites_file, tmp_path):
    args = ["--phase", "test", "--sites", str(sites_file), "--test_dataset", "R", "--quiet"]
    assert run_cli(args + ["--checkpoint", str(fedavg_run / "best.pt"), "--save_dir", str(tmp_path / "a")]) == 0
    flower = flower_checkpoint(fedavg_run / "best.pt", tmp_path / "flower.pt")
    assert run_cli(args + ["--checkpoint", str(flower), "--save_dir", str(tmp_path / "b")]) == 0
    assert read_rows(tmp_path / "a" / "test" / "metrics.csv") == read_rows(tmp_path / "b" / "test" / "metrics.csv")


def test_personalised_method_is_tested_per_client(capsys, tiny_root, sites_file, tmp_path):
    run = tmp_path / "run"
    assert run_cli(TINY_RUN + ["--data_root", str(tiny_root), "--save_dir", str(run), "--strategy", "pfl",
                               "--train_dataset", "FH", "--num_users", "4"]) == 0
    test_args = ["--phase", "test", "--sites", str(sites_file), "--test_dataset", "R", "--quiet"]
    assert run_cli(test_args + ["--checkpoint", str(run / "last.pt"), "--save_dir", str(tmp_path / "out")]) == 0
    rows = read_rows(tmp_path / "out" / "test" / "metrics.csv")
    assert [r["model"] for r in rows] == ["zero_filled", "F1", "F2", "H1", "H2"]
    assert {r["site"] for r in rows} == {"R"}
    assert len({r["psnr"] for r in rows[1:]}) == 4  # each client's own weights, not one model four times
    recons = tmp_path / "out" / "test" / "reconstructions"
    assert sorted(p.name for p in recons.iterdir()) == ["F1-on-R", "F2-on-R", "H1-on-R", "H2-on-R"]

    # A checkpoint written before clients recorded their site: the site is read from the names.
    ckpt = torch.load(run / "last.pt", weights_only=True)
    for client in ckpt["clients"].values():
        del client["site"]
    torch.save(ckpt, tmp_path / "old.pt")
    assert run_cli(test_args + ["--checkpoint", str(tmp_path / "old.pt"), "--save_dir", str(tmp_path / "old")]) == 0
    assert read_rows(tmp_path / "old" / "test" / "metrics.csv") == rows

    # Its clients' weights are on the Flower nodes when a Flower run wrote it: refused in one line.
    flower = flower_checkpoint(run / "last.pt", tmp_path / "flower.pt")
    assert run_cli(test_args + ["--checkpoint", str(flower), "--save_dir", str(tmp_path / "flower")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "clients' own weights are on the Flower nodes" in err, err
    assert not (tmp_path / "flower").exists()


def test_fastmri_unet_weights_without_a_run(sites_file, tmp_path):
    FastmriUnet = pytest.importorskip("fastmri.models", reason="fastmri is not installed").Unet
    torch.manual_seed(0)
    unet = FastmriUnet(in_chans=1, out_chans=1, chans=4, num_pool_layers=2, drop_prob=0.0)
    torch.save(unet.state_dict(), tmp_path / "fastmri_unet.pt")
    lightning = {"state_dict": {f"unet.{k}": v for k, v in unet.state_dict().items()}, "epoch": 3}
    torch.save(lightning, tmp_path / "unet.ckpt")
    for weights in ("fastmri_unet.pt", "unet.ckpt"):
        # No --chans / --num_pools: the sizes are read from the weights.
        assert run_cli(["--phase", "test", "--pretrained", str(tmp_path / weights), "--sites", str(sites_file),
                        "--test_dataset", "R", "--save_dir", str(tmp_path / f"out-{weights}"), "--quiet"]) == 0
    rows = read_rows(tmp_path / "out-fastmri_unet.pt" / "test" / "metrics.csv")
    assert [(r["model"], r["site"]) for r in rows] == [("zero_filled", "R"), ("pretrained", "R")]
    assert rows == read_rows(tmp_path / "out-unet.ckpt" / "test" / "metrics.csv")
    assert sorted((tmp_path / "out-fastmri_unet.pt" / "test" / "reconstructions" / "R").glob("*.h5"))

    # Other weights give other reconstructions: the file's weights are the ones evaluated.
    torch.manual_seed(1)
    torch.save(FastmriUnet(1, 1, chans=4, num_pool_layers=2).state_dict(), tmp_path / "other.pt")
    assert run_cli(["--phase", "test", "--pretrained", str(tmp_path / "other.pt"), "--sites", str(sites_file),
                    "--test_dataset", "R", "--save_dir", str(tmp_path / "other"), "--quiet"]) == 0
    assert read_rows(tmp_path / "other" / "test" / "metrics.csv")[1]["psnr"] != rows[1]["psnr"]


def _no_model(run, tmp_path):
    return ["--test_dataset", "R"]


def _missing_checkpoint(run, tmp_path):
    return ["--checkpoint", str(tmp_path / "absent.pt"), "--test_dataset", "R"]


def _corrupt_checkpoint(run, tmp_path):
    data = (run / "best.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    return ["--checkpoint", str(tmp_path / "cut.pt"), "--test_dataset", "R"]


def _incomplete_checkpoint(run, tmp_path):
    ckpt = torch.load(run / "best.pt", weights_only=True)
    del ckpt["options"]
    torch.save(ckpt, tmp_path / "part.pt")
    return ["--checkpoint", str(tmp_path / "part.pt"), "--test_dataset", "R"]


def _missing_weights(run, tmp_path):
    return ["--pretrained", str(tmp_path / "absent.pt"), "--test_dataset", "R"]


def _unknown_site(run, tmp_path):
    return ["--checkpoint", str(run / "best.pt"), "--test_dataset", "Z"]


def _run_target_not_given(run, tmp_path):
    return ["--checkpoint", str(run / "best.pt")]  # the run's target H is not in the sites file


def _weights_without_site(run, tmp_path):
    from models.unet import Unet
    torch.save(Unet(chans=4, num_pool_layers=2).state_dict(), tmp_path / "w.pt")
    return ["--pretrained", str(tmp_path / "w.pt")]


@pytest.mark.parametrize("make, needles", [
    (_no_model, ["--checkpoint FILE", "--pretrained FILE"]),
    (_missing_checkpoint, ["absent.pt: no such checkpoint file", "pass a last.pt or best.pt"]),
    (_corrupt_checkpoint, ["cut.pt: not a PyTorch checkpoint"]),
    (_incomplete_checkpoint, ["part.pt: incomplete checkpoint (no options)"]),
    (_missing_weights, ["absent.pt: cannot read checkpoint", "--pretrained"]),
    (_unknown_site, ["--test_dataset Z: unknown site 'Z'", "known: R"]),
    (_run_target_not_given, ["target site H is not among the sites given", "--test_dataset"]),
    (_weights_without_site, ["--pretrained needs --test_dataset"]),
])
def test_what_is_missing_is_named_in_one_line(capsys, fedavg_run, sites_file, tmp_path, make, needles):
    args = make(fedavg_run, tmp_path)
    out = tmp_path / "out"
    assert run_cli(["--phase", "test", "--sites", str(sites_file), "--save_dir", str(out), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(n in err for n in needles), err
    assert not out.exists()


def test_a_site_without_test_or_val_split_is_named(capsys, fedavg_run, tiny_root, tmp_path):
    sites = nifti_site(tiny_root, tmp_path, split="train")
    out = tmp_path / "out"
    assert run_cli(["--phase", "test", "--checkpoint", str(fedavg_run / "best.pt"), "--sites", str(sites),
                    "--test_dataset", "R", "--save_dir", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "site 'R': no test or val split in" in err
    assert str(tmp_path / "R" / "T1" / "test") in err
    assert not out.exists()


def test_a_site_with_only_a_val_split_is_tested_on_it(fedavg_run, tiny_root, tmp_path):
    sites = nifti_site(tiny_root, tmp_path, split="val")
    assert run_cli(["--phase", "test", "--checkpoint", str(fedavg_run / "best.pt"), "--sites", str(sites),
                    "--test_dataset", "R", "--save_dir", str(tmp_path / "out"), "--quiet"]) == 0
    rows = read_rows(tmp_path / "out" / "test" / "metrics.csv")
    assert {(r["model"], r["split"]) for r in rows} == {("zero_filled", "val"), ("global", "val")}
