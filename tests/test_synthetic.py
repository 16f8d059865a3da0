"""The synthetic five-site generator: formats readers depend on, determinism, caching, site shift."""

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from data import synthetic
from data.synthetic import (
    SITES,
    SyntheticConfig,
    default_cache_dir,
    ensure_synthetic_sites,
    write_synthetic_sites,
)
from utils.errors import UserError

SMALL = SyntheticConfig(resolution=64, train=2, val=1, test=1, slices=4, seed=0)
TINY = SyntheticConfig(resolution=32, train=1, val=1, test=0, slices=2, seed=3)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic_sites(SMALL, cache_dir=tmp_path_factory.mktemp("cache"))


def _files(root: Path, site: str, sequence: str = "T1", split: str = "train") -> list[Path]:
    return sorted((root / site / sequence / split).iterdir())


def _ifft2c(kspace: np.ndarray) -> np.ndarray:
    shifted = np.fft.ifftshift(kspace, axes=(-2, -1))
    return np.fft.fftshift(np.fft.ifft2(shifted, norm="ortho"), axes=(-2, -1))


def _crop(x: np.ndarray, size: int) -> np.ndarray:
    h0, w0 = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., h0:h0 + size, w0:w0 + size]


def _load_images(root: Path, site: str, sequence: str, split: str = "train") -> list[np.ndarray]:
    """Volumes as `(S, R, R)` magnitude, the way a reader sees them (B padded, slice_range kept)."""
    entry = json.loads((root / "sites.json").read_text())["sites"][site]
    volumes = []
    for path in _files(root, site, sequence, split):
        if entry["format"] == "fastmri_h5":
            with h5py.File(path, "r") as f:
                volumes.append(f["reconstruction_esc"][()])
            continue
        vol = np.asarray(nib.load(path).dataobj, dtype=np.float32).transpose(2, 0, 1)
        if entry["slice_range"] is not None:
            vol = vol[slice(*entry["slice_range"])]
        pad = (SMALL.resolution - vol.shape[1]) // 2
        volumes.append(np.pad(vol, ((0, 0), (pad, pad), (pad, pad))))
    return volumes


def test_layout_and_sites_json(root: Path) -> None:
    registry = json.loads((root / "sites.json").read_text())["sites"]
    assert set(registry) == {"F", "H", "I", "B", "K"}
    contrasts = {"F": ["T1", "T2"], "H": ["T1", "T2"], "I": ["T1", "T2", "PD"],
                 "B": ["T1", "T2", "FLAIR"], "K": ["PD", "PDFS"]}
    for site, entry in registry.items():
        assert (root / entry["root"]).is_dir()
        assert sorted(p.name for p in (root / entry["root"]).iterdir()) == sorted(contrasts[site])
        assert entry["format"] in ("fastmri_h5", "nifti", "h5_image")
        assert entry["description"]
        assert "multicoil_root" not in entry  # multicoil files only when asked for
        suffix = ".h5" if entry["format"] == "fastmri_h5" else ".nii.gz"
        for split in synthetic.SPLITS:
            names = {sequence: [p.name for p in _files(root, site, sequence, split)]
                     for sequence in contrasts[site]}
            first = names[contrasts[site][0]]
            assert len(first) == SMALL.volumes(split)
            assert all(n.endswith(suffix) for n in first)
            # A subject has the same file name in every contrast folder (synthesis pairs them).
            assert all(found == first for found in names.values())
    assert registry["F"]["challenge"] == registry["H"]["challenge"] == registry["K"]["challenge"] == "singlecoil"
    assert registry["K"]["sequence"] == "PD" and "sequence" not in registry["F"]
    assert registry["I"]["slice_range"] is None
    start, stop = registry["B"]["slice_range"]
    assert stop - start == SMALL.slices and start > 0


def _v2_digest(root: Path) -> str:
    """sha256 over the F, H, I, B T1/T2 files of a root, each named as generator v2 named it
    (`<subject>_<sequence>`): the HDF5 datasets and attributes, the NIfTI files' bytes."""
    h = hashlib.sha256()
    for site in "FHIB":
        for sequence in ("T1", "T2"):
            def v2_name(path: Path) -> str:
                stem, ext = path.name.split(".", 1)
                return str(path.relative_to(root).with_name(f"{stem}_{sequence}.{ext}"))
            for path in sorted((p for p in (root / site / sequence).rglob("*") if p.is_file()), key=v2_name):
                h.update(v2_name(path).encode())
                if path.suffix != ".h5":
                    h.update(path.read_bytes())
                    continue
                with h5py.File(path, "r") as f:
                    for key in sorted(f.keys()):
                        h.update(key.encode())
                        h.update(np.ascontiguousarray(f[key][()]).tobytes())
                    for key in sorted(f.attrs):
                        h.update(key.encode())
                        h.update(repr(f.attrs[key]).encode())
    return h.hexdigest()


def test_brain_singlecoil_files_do_not_depend_on_the_multicoil_files(tmp_path: Path) -> None:
    # Byte for byte (arrays, headers, attributes, compressed NIfTI): writing multicoil files must
    # not disturb the singlecoil ones.
    expected = _v2_digest(write_synthetic_sites(TINY, tmp_path / "plain"))
    multicoil = replace(TINY, multicoil=True, coils=3)
    assert _v2_digest(write_synthetic_sites(multicoil, tmp_path / "multicoil")) == expected


@pytest.mark.parametrize("site, sequence", [("F", "T2"), ("H", "T2"), ("K", "PDFS")])
def test_fastmri_slice_dataset_reads_hdf5(root: Path, site: str, sequence: str) -> None:
    fastmri_data = pytest.importorskip("fastmri.data")
    from fastmri.data import subsample, transforms

    folder = root / site / sequence / "train"
    dataset = fastmri_data.SliceDataset(folder, challenge="singlecoil")
    total = 0
    for path in _files(root, site, sequence):
        with h5py.File(path, "r") as f:
            total += f["kspace"].shape[0]
    assert len(dataset) == total == SMALL.train * SMALL.slices

    hk, wk = synthetic.kspace_shape(site, SMALL.resolution)
    meta = dataset.raw_samples[0].metadata
    assert meta["encoding_size"] == (hk, wk, 1)
    assert meta["recon_size"] == (SMALL.resolution, SMALL.resolution, 1)
    assert (meta["padding_left"], meta["padding_right"]) == synthetic.acquired_columns(site, SMALL.resolution)

    mask = subsample.RandomMaskFunc([0.08], [4])
    sample = transforms.UnetDataTransform("singlecoil", mask_func=mask, use_seed=True)(*dataset[1])
    assert sample.image.shape == sample.target.shape == (SMALL.resolution, SMALL.resolution)
    assert np.isfinite(sample.image.numpy()).all()


@pytest.mark.parametrize("site", ["F", "H", "K"])
def test_hdf5_kspace_reconstructs_target_and_attributes(root: Path, site: str) -> None:
    r = SMALL.resolution
    for sequence in SMALL.site_sequences(site):
        for path in _files(root, site, sequence):
            with h5py.File(path, "r") as f:
                kspace, target = f["kspace"][()], f["reconstruction_esc"][()]
                attrs = dict(f.attrs)
            assert kspace.dtype == np.complex64 and target.dtype == np.float32
            assert kspace.shape == (SMALL.slices, *synthetic.kspace_shape(site, r))
            assert target.shape == (SMALL.slices, r, r)
            image = _crop(_ifft2c(kspace.astype(np.complex128)), r)
            np.testing.assert_allclose(np.abs(image), target, atol=1e-5 * target.max())
            assert attrs["max"] == pytest.approx(float(target.max()), rel=1e-6)
            assert attrs["norm"] == pytest.approx(float(np.linalg.norm(target)), rel=1e-5)
            knee = {"PD": "CORPD_FBK", "PDFS": "CORPDFS_FBK"}
            assert attrs["acquisition"] == (knee[sequence] if site == "K" else f"AX{sequence}")
            assert attrs["patient_id"] == path.stem
            # The k-space peak sits on the centre lines (masks keep the centre band).
            peak = np.unravel_index(np.abs(kspace[SMALL.slices // 2]).argmax(), kspace.shape[1:])
            assert abs(peak[0] - kspace.shape[1] // 2) <= 1 and abs(peak[1] - kspace.shape[2] // 2) <= 1


def test_fastmri_site_has_smooth_nonzero_phase(root: Path) -> None:
    with h5py.File(_files(root, "F")[0], "r") as f:
        kspace, target = f["kspace"][()], f["reconstruction_esc"][()]
    image = _crop(_ifft2c(kspace), SMALL.resolution)
    head = target > 0.3 * target.max()
    phase = np.angle(image[head] * np.exp(-1j * np.angle(image[head].mean())))
    assert phase.std() > 0.2


def test_nifti_volumes_load_as_3d(root: Path) -> None:
    r = SMALL.resolution
    b_size = synthetic.native_size("B", r)
    assert b_size < r
    start, _ = json.loads((root / "sites.json").read_text())["sites"]["B"]["slice_range"]
    for site, shape, dtype in (("I", (r, r, SMALL.slices), np.int16),
                               ("B", (b_size, b_size, SMALL.slices + 2 * start), np.float32)):
        for path in _files(root, site, "T2"):
            img = nib.load(path)
            assert img.shape == shape
            assert img.get_data_dtype() == dtype
            zooms = img.header.get_zooms()
            assert len(zooms) == 3 and all(z > 0 for z in zooms)
            assert np.allclose(np.abs(np.linalg.det(img.affine[:3, :3])), np.prod(zooms))
            data = img.get_fdata()
            assert data.min() >= 0 and data.max() > 0


def test_no_nan_or_inf(root: Path) -> None:
    for site in SITES:
        for sequence in SMALL.site_sequences(site):
            for split in synthetic.SPLITS:
                for volume in _load_images(root, site, sequence, split):
                    assert np.isfinite(volume).all()
    for path in [*(root / "F").rglob("*.h5"), *(root / "K").rglob("*.h5")]:
        with h5py.File(path, "r") as f:
            assert np.isfinite(f["kspace"][()].view(np.float32)).all()


def test_same_seed_gives_identical_arrays_and_other_seed_differs(tmp_path: Path) -> None:
    a = write_synthetic_sites(TINY, tmp_path / "a")
    b = write_synthetic_sites(TINY, tmp_path / "b")
    c = write_synthetic_sites(replace(TINY, seed=4), tmp_path / "c")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix == ".h5":
            with h5py.File(a / rel, "r") as fa, h5py.File(b / rel, "r") as fb:
                for key in ("kspace", "reconstruction_esc"):
                    np.testing.assert_array_equal(fa[key][()], fb[key][()])
        elif rel.name.endswith(".nii.gz"):
            np.testing.assert_array_equal(np.asarray(nib.load(a / rel).dataobj),
                                          np.asarray(nib.load(b / rel).dataobj))
    rel = next(r for r in files if r.suffix == ".h5")
    with h5py.File(a / rel, "r") as fa, h5py.File(c / rel, "r") as fc:
        assert not np.array_equal(fa["kspace"][()], fc["kspace"][()])


def test_cache_reused_when_parameters_match_and_separate_when_they_change(tmp_path: Path) -> None:
    root = ensure_synthetic_sites(TINY, cache_dir=tmp_path)
    probe = next(root.rglob("*.h5"))
    stamps = (probe.stat().st_mtime_ns, (root / "manifest.json").stat().st_mtime_ns)
    assert ensure_synthetic_sites(TINY, cache_dir=tmp_path) == root
    assert (probe.stat().st_mtime_ns, (root / "manifest.json").stat().st_mtime_ns) == stamps

    other = ensure_synthetic_sites(replace(TINY, slices=3), cache_dir=tmp_path)
    assert other != root and other.parent == root.parent
    assert probe.exists() and probe.stat().st_mtime_ns == stamps[0]  # first set untouched
    assert json.loads((other / "manifest.json").read_text())["config"]["slices"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_fixed_root_regenerates_when_parameters_change(tmp_path: Path) -> None:
    root = write_synthetic_sites(TINY, tmp_path / "sites")
    changed = replace(TINY, slices=3)
    assert write_synthetic_sites(changed, root) == root
    assert json.loads((root / "manifest.json").read_text())["config"]["slices"] == 3
    with h5py.File(next(root.rglob("*.h5")), "r") as f:
        assert f["kspace"].shape[0] == 3
    stamp = (root / "manifest.json").stat().st_mtime_ns
    write_synthetic_sites(changed, root, force=True)
    assert (root / "manifest.json").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sites"]


def test_interrupted_generation_leaves_no_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fail_on_third(*args: object) -> list:
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args)

    original = synthetic.generate_subject
    monkeypatch.setattr(synthetic, "generate_subject", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_sites(TINY, tmp_path / "sites")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "scan.h5").write_bytes(b"precious")
    with pytest.raises(UserError, match="no manifest.json"):
        write_synthetic_sites(TINY, tmp_path / "data")
    assert (tmp_path / "data" / "scan.h5").read_bytes() == b"precious"


def test_default_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FEDRECON_SYNTHETIC_DIR", raising=False)
    monkeypatch.delenv("FEDRECON_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "fedrecon" / "synthetic"
    monkeypatch.setenv("FEDRECON_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache" / "synthetic"
    monkeypatch.setenv("FEDRECON_SYNTHETIC_DIR", str(tmp_path / "syn"))
    assert default_cache_dir() == tmp_path / "syn"


def _features(volume: np.ndarray) -> np.ndarray:
    """Scale-free statistics of a `(S, R, R)` volume: head share of the FOV, mean head intensity
    relative to the bright end, the noise in the image corners relative to the head mean, and the
    resolution: the shares of the spectrum's energy beyond 0.3 and 0.4 cycles per pixel (log10)."""
    v = volume / np.percentile(volume, 99.5)
    head = v > 0.15
    corners = np.concatenate([v[:, :6, :6], v[:, :6, -6:], v[:, -6:, :6], v[:, -6:, -6:]])
    power = np.abs(np.fft.fft2(v)) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(v.shape[1]), np.fft.fftfreq(v.shape[2]), indexing="ij")
    radius = np.hypot(fy, fx)
    fine = [np.log10(power[:, radius > cut].sum() / power.sum()) for cut in (0.3, 0.4)]
    return np.array([head.mean(), v[head].mean(), corners.std() / v[head].mean(), *fine])


@pytest.mark.parametrize("sequence", ["T1", "T2"])
def test_sites_differ_more_than_subjects_within_a_site(root: Path, sequence: str) -> None:
    sites = [site for site in SITES if sequence in SITES[site].sequences]
    features = {site: np.stack([_features(v) for split in synthetic.SPLITS
                                for v in _load_images(root, site, sequence, split)])
                for site in sites}
    spread = np.stack([f.std(axis=0) for f in features.values()]).max(axis=0) + 1e-3
    for i, a in enumerate(sites):
        for b in sites[i + 1:]:
            gap = np.abs(features[a].mean(axis=0) - features[b].mean(axis=0)) / spread
            assert gap.max() > 3, f"sites {a} and {b} look alike: {gap}"


def _bright_at_rim(volume: np.ndarray) -> float:
    """Share of the brightest 2% of head voxels that lie in the outer 3-pixel ring of the head.

    On T1 the scalp fat and skull marrow are the brightest tissues, so heads with a skull score high
    and skull-stripped brains (white matter brightest, darker cortex at the edge) score low.
    """
    v = volume / np.percentile(volume, 99.5)
    head = v > 0.2
    inner = head.copy()
    for _ in range(3):
        inner[:, 1:-1, 1:-1] &= (inner[:, :-2, 1:-1] & inner[:, 2:, 1:-1]
                                 & inner[:, 1:-1, :-2] & inner[:, 1:-1, 2:])
    bright = head & (v >= np.percentile(v[head], 98))
    return float((bright & ~inner).sum() / bright.sum())


def test_brats_like_site_is_skull_stripped(root: Path) -> None:
    # H is left out: its strong coil shading makes the brain centre brighter than its scalp.
    for site in ("F", "I"):
        assert min(_bright_at_rim(v) for v in _load_images(root, site, "T1")) > 0.25, site
    # Not zero: at this test's 3.75 mm pixels the 2.5 mm cortex is thinner than a pixel, so
    # bright white matter reaches into the outer ring (measured <= 0.11; F and I >= 0.58).
    assert max(_bright_at_rim(v) for v in _load_images(root, "B", "T1")) < 0.15
    for volume in _load_images(root, "B", "T2"):
        assert (volume == 0).mean() > 0.3  # background exactly zero outside the brain mask


def test_config_rejects_bad_values() -> None:
    for bad in ({"resolution": 40}, {"train": 0}, {"slices": 0}, {"val": -1}, {"sequences": ("DWI",)},
                {"sequences": ()}, {"coils": 0}):
        with pytest.raises(UserError):
            SyntheticConfig(**bad)


def test_cli_writes_then_finds_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--out", str(tmp_path / "s"), "--resolution", "32", "--train", "1", "--val", "0",
            "--test", "0", "--slices", "2", "--quiet"]
    assert synthetic.main(args) == 0
    printed = capsys.readouterr().out.strip()
    assert Path(printed) == (tmp_path / "s").absolute()
    stamp = (tmp_path / "s" / "manifest.json").stat().st_mtime_ns
    assert synthetic.main(args) == 0
    assert capsys.readouterr().out.strip() == printed
    assert (tmp_path / "s" / "manifest.json").stat().st_mtime_ns == stamp

    assert synthetic.main(["--out", str(tmp_path / "t"), "--resolution", "30"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resolution" in err
    assert not (tmp_path / "t").exists()


def test_cli_help_documents_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--resolution", "--train", "--val", "--test", "--slices", "--seed", "--force",
                 "--multicoil", "--coils"):
        assert flag in text
