"""Synthetic multicoil sites (F, H, K) and the knee site: fastMRI reads them, --challenge picks them."""

import json
import re
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from data import synthetic
from data.mri_data import SliceDataset
from data.sites import registry_for
from data.synthetic import SyntheticConfig, write_synthetic_sites
from federated.experiment import with_challenge
from tests.helpers_data import write_fastmri
from utils.errors import DataError

MC = SyntheticConfig(resolution=32, train=2, val=1, test=0, slices=3, seed=1, multicoil=True, coils=4)
FOLDERS = [("F", "T1"), ("H", "T2"), ("K", "PD"), ("K", "PDFS")]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_sites(MC, tmp_path_factory.mktemp("mc") / "sites")


def _ifft2c(kspace: np.ndarray) -> np.ndarray:
    shifted = np.fft.ifftshift(kspace, axes=(-2, -1))
    return np.fft.fftshift(np.fft.ifft2(shifted, norm="ortho"), axes=(-2, -1))


def _crop(x: np.ndarray, size: int) -> np.ndarray:
    h0, w0 = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., h0:h0 + size, w0:w0 + size]


def _multicoil_files(root: Path, site: str, sequence: str, split: str = "train") -> list[Path]:
    return sorted((root / "multicoil" / site / sequence / split).glob("*.h5"))


@pytest.mark.parametrize("site, sequence", FOLDERS)
def test_fastmri_slice_dataset_opens_multicoil_files(root: Path, site: str, sequence: str) -> None:
    fastmri_data = pytest.importorskip("fastmri.data")
    folder = root / "multicoil" / site / sequence / "train"
    theirs = fastmri_data.SliceDataset(folder, transform=None, challenge="multicoil")
    ours = SliceDataset(_multicoil_files(root, site, sequence), lambda *a: a, fmt="fastmri_h5",
                        challenge="multicoil")
    assert len(theirs) == len(ours) == MC.train * MC.slices
    kspace, _, target, attrs, _, _ = theirs[1]
    hk, wk = synthetic.kspace_shape(site, MC.resolution)
    assert kspace.shape == (MC.coils, hk, wk) and kspace.dtype == np.complex64
    assert target.shape == (MC.resolution, MC.resolution)
    assert attrs["encoding_size"] == (hk, wk, 1)
    assert attrs["recon_size"] == (MC.resolution, MC.resolution, 1)
    assert (attrs["padding_left"], attrs["padding_right"]) == synthetic.acquired_columns(site, MC.resolution)
    np.testing.assert_array_equal(ours[1][0], kspace)
    transforms = pytest.importorskip("fastmri.data.transforms")
    subsample = pytest.importorskip("fastmri.data.subsample")
    sample = transforms.VarNetDataTransform(subsample.RandomMaskFunc([0.08], [4]))(*theirs[1])
    assert sample.masked_kspace.shape == (MC.coils, hk, wk, 2)


@pytest.mark.parametrize("site, sequence", FOLDERS)
def test_multicoil_file_contents(root: Path, site: str, sequence: str) -> None:
    r = MC.resolution
    for path in _multicoil_files(root, site, sequence):
        with h5py.File(path, "r") as f:
            assert set(f.keys()) == {"kspace", "reconstruction_rss", "ismrmrd_header"}
            kspace, rss = f["kspace"][()], f["reconstruction_rss"][()]
            header = f["ismrmrd_header"][()].decode()
            attrs = dict(f.attrs)
        coil_images = _crop(_ifft2c(kspace.astype(np.complex128)), r)
        np.testing.assert_allclose(np.sqrt((np.abs(coil_images) ** 2).sum(1)), rss, atol=1e-5 * rss.max())
        assert attrs["max"] == pytest.approx(float(rss.max()), rel=1e-6)
        assert re.search(r"<receiverChannels>(\d+)</receiverChannels>", header).group(1) == str(MC.coils)
        assert attrs["acquisition"] == synthetic.acquisition(site, sequence)
        left, right = synthetic.acquired_columns(site, r)
        assert not kspace[..., :left].any() and not kspace[..., right:].any()
        assert np.abs(kspace[..., left:right]).min() > 0
        # Every coil sees the object, each with its own shading.
        power = (np.abs(coil_images) ** 2).sum(axis=(0, 2, 3))
        assert power.min() > 0.02 * power.max()


def test_multicoil_rss_shows_the_same_subject_as_the_singlecoil_file(root: Path) -> None:
    for path in _multicoil_files(root, "F", "T1"):
        with h5py.File(path, "r") as f:
            rss = f["reconstruction_rss"][()]
        with h5py.File(root / "F" / "T1" / "train" / path.name, "r") as f:
            esc = f["reconstruction_esc"][()]
        # Unit-RSS maps: the RSS is the singlecoil image up to noise (independent draws).
        assert np.corrcoef(rss.ravel(), esc.ravel())[0, 1] > 0.95
        assert rss.mean() == pytest.approx(esc.mean(), rel=0.15)


@pytest.mark.parametrize("sequence", ["PD", "PDFS"])
def test_knee_singlecoil_is_the_emulated_single_coil_of_the_multicoil_file(root: Path, sequence: str) -> None:
    for path in _multicoil_files(root, "K", sequence):
        with h5py.File(path, "r") as f:
            coils = f["kspace"][()]
        with h5py.File(root / "K" / sequence / "train" / path.name, "r") as f:
            single = f["kspace"][()]
            assert "reconstruction_esc" in f and f.attrs["acquisition"] == synthetic.acquisition("K", sequence)
        a = np.moveaxis(coils, 1, -1).reshape(-1, MC.coils)
        weights, *_ = np.linalg.lstsq(a, single.reshape(-1), rcond=None)
        residual = np.linalg.norm(a @ weights - single.reshape(-1)) / np.linalg.norm(single)
        assert residual < 1e-5


def test_noise_is_correlated_across_coils(root: Path) -> None:
    # The oversampled readout leaves air at the top and bottom of the field of view.
    samples = []
    for path in _multicoil_files(root, "F", "T1") + _multicoil_files(root, "F", "T2"):
        with h5py.File(path, "r") as f:
            images = _ifft2c(f["kspace"][()])
        samples.append(np.moveaxis(images[:, :, :6, :], 1, 0).reshape(MC.coils, -1))
    noise = np.concatenate(samples, axis=1)
    correlation = np.abs(np.corrcoef(noise))[~np.eye(MC.coils, dtype=bool)]
    assert correlation.mean() > 0.05


def test_singlecoil_files_do_not_depend_on_the_multicoil_flag(root: Path, tmp_path: Path) -> None:
    plain = write_synthetic_sites(replace(MC, multicoil=False), tmp_path / "plain")
    assert not (plain / "multicoil").exists()
    for site, sequence in FOLDERS:
        for path in sorted((plain / site / sequence / "train").glob("*.h5")):
            with h5py.File(path, "r") as a, h5py.File(root / site / sequence / "train" / path.name, "r") as b:
                np.testing.assert_array_equal(a["kspace"][()], b["kspace"][()])


def test_challenge_multicoil_reads_the_multicoil_roots(root: Path) -> None:
    entries = json.loads((root / "sites.json").read_text())["sites"]
    assert {k for k, e in entries.items() if "multicoil_root" in e} == {"F", "H", "K"}
    registry = with_challenge(registry_for(root, None), "multicoil")
    for name in ("F", "H", "K"):
        assert registry[name].challenge == "multicoil"
        assert registry[name].root == root / "multicoil" / name
    assert registry["I"].root == root / "I" and registry["I"].challenge == "singlecoil"
    # K brings its own sequence: a run on T1 still reads knee PD.
    files = registry["K"].files("T1", "train")
    assert files == _multicoil_files(root, "K", "PD")
    dataset = SliceDataset(files, lambda *a: a, fmt="fastmri_h5", challenge="multicoil")
    assert dataset[0][0].shape[0] == MC.coils


def test_cli_challenge_multicoil_trains_on_the_multicoil_files(root: Path, tmp_path: Path) -> None:
    from tests.conftest import TINY_RUN, run_cli

    out = tmp_path / "run"
    code = run_cli(["--data_root", str(root), "--challenge", "multicoil", "--train_dataset", "FK",
                    "--test_dataset", "F", "--resolution", "32", "--save_dir", str(out), *TINY_RUN])
    assert code == 0
    assert (out / "metrics.csv").is_file()


def test_mixed_coil_counts_are_refused_at_indexing(tmp_path: Path) -> None:
    eight = write_fastmri(tmp_path / "a.h5", coils=8)
    write_fastmri(tmp_path / "b.h5", coils=4)
    with pytest.raises(DataError, match=r"b\.h5 has 4 coils but a\.h5 has 8") as err:
        SliceDataset([tmp_path / "a.h5", tmp_path / "b.h5"], lambda *a: a, challenge="multicoil")
    assert len(str(err.value).splitlines()) == 1
    assert eight.shape[1] == 8
    assert len(SliceDataset([tmp_path / "a.h5"], lambda *a: a, challenge="multicoil")) == 3


def test_one_run_trains_on_knee_pd_and_validates_on_brain_t1(root: Path, tmp_path: Path) -> None:
    from tests.conftest import TINY_RUN, run_cli

    out = tmp_path / "run"
    code = run_cli(["--data_root", str(root), "--train_dataset", "K", "--test_dataset", "F",
                    "--sequence", "T1", "--resolution", "32", "--save_dir", str(out), *TINY_RUN])
    assert code == 0
    assert (out / "metrics.csv").read_text().count("\n") > 1
