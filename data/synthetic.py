"""Synthetic multi-site MRI generator: five sites in the file formats the real sites ship.

The brain sites mimic the FL-MRCM setting without any download; K adds fastMRI's knee:

    F  fastMRI-like   singlecoil HDF5 k-space, smooth image phase, sharp, low noise; T1, T2
    H  HPKS-like      singlecoil HDF5 k-space (wider phase-encode matrix), weak phase, blurred,
                      noisier (1.5 T), strong coil shading; T1, T2
    I  IXI-like       NIfTI int16 magnitude with skull, zero phase, Rician noise; T1, T2, PD
    B  BraTS-like     NIfTI float32 magnitude, skull-stripped, with glioma-like lesions, native
                      matrix smaller than R (a reader pads it), extra end slices cut by
                      slice_range; T1, T2, FLAIR (inversion recovery)
    K  fastMRI knee   coronal knee, singlecoil HDF5 emulated from the coil array
                      (`reconstruction_esc`), zero-filled phase-encode edges; PD and
                      fat-saturated PD (PDFS)

Every brain subject is a synthetic head (`data.brain_anatomy`: folded cortex, deep grey nuclei,
ventricles, skull and scalp; tissue PD/T1/T2 at the site's field strength in `data.phantom`), every
knee one from `data.knee_phantom`; intensities come from those tissue parameters through each site's
sequences (`data.sequences`). All contrasts of a subject image the same phantom (registered), and
carry the same file name in every contrast folder. With `SyntheticConfig.multicoil` the HDF5 sites
F, H and K are also written as fastMRI multicoil files (`data.coils`: loop-coil sensitivities, noise
correlated across coils). Layout under the returned root:

    <root>/manifest.json                  parameters and generator version (written last)
    <root>/sites.json                     site registry entries (root, format, challenge, ...)
    <root>/<site>/<sequence>/<split>/<subject>.h5 | .nii.gz
    <root>/multicoil/<site>/<sequence>/<split>/<subject>.h5     (with multicoil only)

Generation is deterministic from `SyntheticConfig.seed`, happens once per parameter set (a folder
per parameter hash under the cache directory) and is atomic (built in a temporary sibling folder,
then renamed). Run `python -m data.synthetic --help` for the command line.
"""

import argparse
import gzip
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
from tqdm import tqdm

from data.brain_anatomy import REFERENCE_HEAD_SEMI_AXIS_MM
from data.coils import (correlated_noise, emulated_single_coil, loop_array, noise_covariance,
                        sensitivity_maps)
from data.knee_phantom import KNEE_TISSUES, knee_slice_positions, sample_knee
from data.phantom import HEAD_HEIGHT_RATIO, TISSUES, sample_head, smooth_field
from data.sequences import InversionRecovery, Sequence, SpinEcho
from data.transforms import center_crop, fft2c_np as fft2c, ifft2c_np as ifft2c
from utils.errors import UserError

__all__ = [
    "GENERATOR_VERSION",
    "SITES",
    "SiteSpec",
    "SyntheticConfig",
    "default_cache_dir",
    "ensure_synthetic_sites",
    "write_synthetic_sites",
]

GENERATOR_VERSION = 5  # bump whenever the generated arrays change for the same parameters


@dataclass(frozen=True)
class SiteSpec:
    """How one synthetic site acquires and ships its images.

    sequences: the site's contrasts, name -> signal model (times in ms).
    fov_mm: in-plane field of view at resolution R (voxel = fov_mm / R); the head is about 185 mm
        long, so a larger FOV gives a smaller head in the image.
    noise: noise std relative to the mean head intensity before the resolution window (complex
        Gaussian in k-space for HDF5 sites; for NIfTI sites complex Gaussian on the image, whose
        magnitude they store, so that its noise is Rician).
    sharpness: k-space cutoff relative to Nyquist (1 = full resolution, smaller = blurrier); the
        window filters signal and noise alike.
    bias: std of the log of the smooth multiplicative intensity (coil shading) field.
    phase: amplitude in radians of the smooth image phase (0 = real, non-negative image).
    skull: whether the skull and scalp are kept (False = skull-stripped, zeros outside the brain).
    lesions: whether subjects carry glioma-like lesions.
    scale: multiplies the stored intensities (the unit of each vendor's files).
    anatomy: "head" (axial brain slices) or "knee" (coronal knee slices).
    acquisitions: sequence -> the file's `acquisition` attribute (default "AX<sequence>").
    """

    description: str
    format: str  # "fastmri_h5" or "nifti"
    sequences: dict[str, Sequence]
    fov_mm: float
    noise: float
    sharpness: float
    bias: float
    phase: float
    skull: bool
    lesions: bool
    scale: float
    field_strength_t: float
    anatomy: str = "head"
    acquisitions: dict[str, str] | None = None


SITES: dict[str, SiteSpec] = {
    "F": SiteSpec(
        description="fastMRI-like: singlecoil HDF5 k-space (readout oversampled 2x), smooth phase",
        format="fastmri_h5", sequences={"T1": SpinEcho(700.0, 10.0), "T2": SpinEcho(4000.0, 100.0)},
        fov_mm=220.0, noise=0.02, sharpness=1.0, bias=0.10, phase=1.5,
        skull=True, lesions=False, scale=5e-4, field_strength_t=3.0,
    ),
    "H": SiteSpec(
        description="HPKS-like: singlecoil HDF5 k-space, wider phase-encode matrix, weak phase, "
                    "blurrier and noisier (1.5 T), strong coil shading",
        format="fastmri_h5", sequences={"T1": SpinEcho(1200.0, 25.0), "T2": SpinEcho(2500.0, 75.0)},
        fov_mm=240.0, noise=0.05, sharpness=0.6, bias=0.30, phase=0.5,
        skull=True, lesions=False, scale=2.0, field_strength_t=1.5,
    ),
    "I": SiteSpec(
        description="IXI-like: NIfTI int16 magnitude with skull, zero phase, Rician noise; "
                    "T1, T2 and PD (PD and T2 from one dual-echo)",
        format="nifti", sequences={"T1": SpinEcho(300.0, 4.0), "T2": SpinEcho(5700.0, 120.0),
                                   "PD": SpinEcho(5700.0, 8.0)},
        fov_mm=240.0, noise=0.04, sharpness=0.75, bias=0.20, phase=0.0,
        skull=True, lesions=False, scale=2500.0, field_strength_t=1.5,
    ),
    "B": SiteSpec(
        description="BraTS-like: NIfTI float32 magnitude, skull-stripped, glioma-like lesions, "
                    "in-plane matrix smaller than R (pad to R), keep slices in slice_range; "
                    "T1, T2 and FLAIR",
        format="nifti", sequences={"T1": SpinEcho(500.0, 15.0), "T2": SpinEcho(2500.0, 90.0),
                                   "FLAIR": InversionRecovery(9000.0, 120.0, 2500.0)},
        fov_mm=240.0, noise=0.015, sharpness=0.7, bias=0.05, phase=0.0,
        skull=False, lesions=True, scale=1000.0, field_strength_t=1.5,
    ),
    "K": SiteSpec(
        description="fastMRI knee-like: coronal PD and fat-saturated PD, singlecoil HDF5 emulated "
                    "from the coils (reconstruction_esc), readout oversampled 2x, zero-filled "
                    "phase-encode edges",
        format="fastmri_h5", sequences={"PD": SpinEcho(2800.0, 30.0),
                                        "PDFS": SpinEcho(2800.0, 30.0, fat_saturation=0.92)},
        fov_mm=140.0, noise=0.03, sharpness=1.0, bias=0.15, phase=1.0,
        skull=False, lesions=False, scale=2e-4, field_strength_t=3.0, anatomy="knee",
        acquisitions={"PD": "CORPD_FBK", "PDFS": "CORPDFS_FBK"},
    ),
}
# Every contrast any site has; its position keys the contrast's random stream.
SEQUENCES = ("T1", "T2", "PD", "FLAIR", "PDFS")
MULTICOIL_FOLDER = "multicoil"

SPLITS = ("train", "val", "test")
_HEAD_SEMI_AXIS_MM = REFERENCE_HEAD_SEMI_AXIS_MM
_SLICE_HEIGHTS = (-0.3, 0.6)  # axial coverage in unit head space (skull base side to vertex side)
_HEAD_COIL_RADIUS_MM = 120.0  # radius of the cylinder the head coil's loops sit on
_KNEE_COIL_RADIUS_MM = 85.0


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate: matrix size R, volumes per split (per site and sequence), slices, seed.

    sequences: the contrasts to write; each site writes those of them it has (see `SITES`).
    multicoil: also write F, H and K as fastMRI multicoil files with `coils` receive channels
        (K's singlecoil files are emulated from `coils` channels either way).
    """

    resolution: int = 128
    train: int = 4
    val: int = 2
    test: int = 2
    slices: int = 16
    seed: int = 0
    sequences: tuple[str, ...] = SEQUENCES
    multicoil: bool = False
    coils: int = 8

    def __post_init__(self) -> None:
        if self.resolution < 32 or self.resolution % 16:
            raise UserError(f"--resolution must be a multiple of 16 and >= 32 (got {self.resolution})")
        if self.train < 1 or self.val < 0 or self.test < 0:
            raise UserError("--train must be >= 1 and --val, --test >= 0 "
                            f"(got {self.train}, {self.val}, {self.test})")
        if self.slices < 1:
            raise UserError(f"--slices must be >= 1 (got {self.slices})")
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0 (got {self.seed})")
        unknown = [s for s in self.sequences if s not in SEQUENCES]
        if unknown or not self.sequences:
            raise UserError(f"sequences must be a non-empty subset of {SEQUENCES} (got {self.sequences})")
        if not 1 <= self.coils <= 64:
            raise UserError(f"--coils must be between 1 and 64 (got {self.coils})")
        object.__setattr__(self, "sequences", tuple(self.sequences))

    def volumes(self, split: str) -> int:
        """Number of volumes in `split` for each site and sequence."""
        return {"train": self.train, "val": self.val, "test": self.test}[split]

    def site_sequences(self, site: str) -> tuple[str, ...]:
        """The contrasts `site` writes: those of `sequences` it has, in the site's order."""
        return tuple(s for s in SITES[site].sequences if s in self.sequences)

    def sites(self) -> tuple[str, ...]:
        """The sites written: those with at least one of `sequences`."""
        return tuple(site for site in SITES if self.site_sequences(site))

    def challenges(self, site: str) -> tuple[str, ...]:
        """The fastMRI challenges `site` is written for (none for image sites)."""
        if SITES[site].format != "fastmri_h5":
            return ()
        return ("singlecoil", "multicoil") if self.multicoil else ("singlecoil",)


def default_cache_dir() -> Path:
    """`$FEDRECON_SYNTHETIC_DIR`, else `$FEDRECON_CACHE/synthetic`, else `~/.cache/fedrecon/synthetic`."""
    if os.environ.get("FEDRECON_SYNTHETIC_DIR"):
        return Path(os.environ["FEDRECON_SYNTHETIC_DIR"]).expanduser()
    if os.environ.get("FEDRECON_CACHE"):
        return Path(os.environ["FEDRECON_CACHE"]).expanduser() / "synthetic"
    return Path.home() / ".cache" / "fedrecon" / "synthetic"


# ---------------------------------------------------------------------------------------------
# Image formation
# ---------------------------------------------------------------------------------------------

def native_size(site: str, resolution: int) -> int:
    """In-plane matrix of a site's stored images: R, or R - R/16 for B (BraTS 240 vs 256)."""
    return resolution - 2 * (resolution // 32) if site == "B" else resolution


def kspace_shape(site: str, resolution: int) -> tuple[int, int]:
    """(H_k, W_k) of an HDF5 site: readout oversampled 2x; H and K also encode R/8 extra columns
    (fastMRI knee: 640 x 368 k-space for a 320 x 320 target)."""
    return 2 * resolution, resolution + (resolution // 8 if site in ("H", "K") else 0)


def acquired_columns(site: str, resolution: int) -> tuple[int, int]:
    """Phase-encode columns `[left, right)` that hold data. K leaves about 5% at each edge
    unacquired (zero), as fastMRI's knee scans do (their headers' padding_left / padding_right)."""
    wk = kspace_shape(site, resolution)[1]
    pad = round(wk * 18 / 368) if SITES[site].anatomy == "knee" else 0
    return pad, wk - pad


def _kspace_window(shape: tuple[int, int], sharpness: float) -> np.ndarray:
    """Isotropic Fermi low-pass `(H, W)` in centred k-space; cutoff = sharpness x Nyquist."""
    fy = np.fft.fftshift(np.fft.fftfreq(shape[0]))[:, None]
    fx = np.fft.fftshift(np.fft.fftfreq(shape[1]))[None, :]
    radius = np.sqrt(fy**2 + fx**2) / (0.5 * sharpness)
    return (1.0 / (1.0 + np.exp((radius - 1.0) / 0.04))).astype(np.float32)


def _lowpass(image: np.ndarray, sharpness: float) -> np.ndarray:
    """Blur `(S, N, N)` images by a k-space window; identity at sharpness >= 1."""
    if sharpness >= 1.0:
        return image
    blurred = ifft2c(fft2c(image) * _kspace_window(image.shape[-2:], sharpness))
    return blurred.real if np.isrealobj(image) else blurred


def _grid(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.float32) - n // 2) * (2.0 / n)


def _bias_field(rng: np.random.Generator, shape: tuple[int, int, int], amplitude: float) -> np.ndarray:
    """Smooth multiplicative shading `(S, N, N)`: exp(amplitude x (random field + a linear ramp))."""
    g = _grid(shape[1])
    z = np.linspace(-0.3, 0.3, shape[0], dtype=np.float32)
    ramp = np.tensordot(rng.standard_normal(2).astype(np.float32) * 0.5,
                        np.stack(np.broadcast_arrays(g[:, None], g[None, :])), axes=1)
    log_bias = smooth_field(rng, z, g, g, 0.7) + ramp[None]
    return np.exp(amplitude * log_bias).astype(np.float32)


def _phase(rng: np.random.Generator, shape: tuple[int, int, int], amplitude: float) -> np.ndarray:
    """Smooth image phase `(S, N, N)` in radians: an off-centre ramp, a B0-like quadratic, a field."""
    g = _grid(shape[1])
    y, x = g[:, None], g[None, :]
    z = np.linspace(-0.3, 0.3, shape[0], dtype=np.float32)
    c = rng.uniform(-1, 1, size=5).astype(np.float32)
    # Small linear terms: a large ramp would move the k-space peak off the centre lines.
    poly = 0.15 * (c[0] * x + c[1] * y) + 0.6 * (c[2] * x * x + c[3] * y * y + c[4] * x * y)
    return amplitude * (poly[None] + 0.5 * smooth_field(rng, z, g, g, 0.4))


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


@dataclass
class _Volume:
    """One generated volume before it is written: either k-space + target, or a magnitude image."""

    subject: str
    sequence: str
    challenge: str = "singlecoil"  # of an HDF5 volume
    kspace: np.ndarray | None = None  # (S, H_k, W_k) singlecoil, (S, C, H_k, W_k) multicoil; complex64
    target: np.ndarray | None = None  # (S, R, R) float32: reconstruction_esc, or _rss for multicoil
    image: np.ndarray | None = None  # (S, N, N) float32 magnitude in the site's unit
    slice_mm: float = 1.0


def _slice_heights(count: int, extra: int = 0) -> tuple[np.ndarray, float]:
    """Heights `(count + 2 * extra,)` in unit head space and their spacing: `count` slices evenly
    over _SLICE_HEIGHTS (one slice: the middle), plus `extra` beyond each end at the same spacing."""
    lo, hi = _SLICE_HEIGHTS
    step = (hi - lo) / (count - 1) if count > 1 else (hi - lo) / 15
    first = lo if count > 1 else 0.5 * (lo + hi)
    return (first + step * np.arange(-extra, count + extra)).astype(np.float32), step


def _extra_slices(site: str, slices: int) -> int:
    """Slices added at each end of a B volume (BraTS ships 155 and FL-MRCM keeps 14-134)."""
    return max(1, slices // 8) if site == "B" else 0


def _to_kspace(images: np.ndarray, site: str, r: int) -> np.ndarray:
    """Images `(..., R, R)` -> the site's k-space `(..., H_k, W_k)` complex64: zero-padded to the
    encoded field of view (the inverse of center_crop), centred FFT."""
    hk, wk = kspace_shape(site, r)
    full = np.zeros(images.shape[:-2] + (hk, wk), np.complex64)
    h0, w0 = (hk - r) // 2, (wk - r) // 2
    full[..., h0:h0 + r, w0:w0 + r] = images
    return fft2c(full)


def _measured(kspace: np.ndarray, noise: np.ndarray, sharpness: float) -> np.ndarray:
    """What a scan keeps of k-space `(..., H_k, W_k)`: signal plus receiver noise, both through the
    site's resolution window. The noise is filtered too: a lower-resolution acquisition records
    no k-space beyond its resolution, so it has no noise there (and less noise per pixel)."""
    return (kspace + noise) * _kspace_window(kspace.shape[-2:], sharpness)


def _acquired(kspace: np.ndarray, site: str, r: int) -> np.ndarray:
    """`kspace` with the phase-encode columns the site does not acquire set to zero."""
    left, right = acquired_columns(site, r)
    if (left, right) != (0, kspace.shape[-1]):
        kspace[..., :left] = 0
        kspace[..., right:] = 0
    return kspace


def _rss_target(kspace: np.ndarray, r: int) -> np.ndarray:
    """`reconstruction_rss` `(S, R, R)` float32 of multicoil k-space `(S, C, H_k, W_k)`."""
    coil_images = center_crop(ifft2c(kspace), (r, r))
    return np.sqrt((np.abs(coil_images) ** 2).sum(axis=1)).astype(np.float32)


def _coils(rng: np.random.Generator, coils: int, ring_radius_mm: float,
           coords_mm: tuple[np.ndarray, np.ndarray, np.ndarray], frame: tuple[int, int, int],
           inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One session's coil maps `(S, C, N, N)` (unit RSS) and noise covariance `(C, C)`."""
    array = loop_array(rng, coils, ring_radius_mm)
    maps, correlation = sensitivity_maps(array, coords_mm, frame, inside)
    return np.moveaxis(maps, 0, 1), noise_covariance(array, correlation)


def _in_plane_mm(n: int, voxel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Row (first row positive) and column positions in mm of an N x N image, centre at N // 2."""
    offsets = (np.arange(n) - n // 2) * voxel_mm
    return -offsets, offsets


def generate_subject(config: SyntheticConfig, site: str, split: str, index: int) -> list[_Volume]:
    """All sequences of one subject of one site: `_Volume`s in the site's sequence order, each
    singlecoil volume followed by its multicoil version when the config asks for one."""
    spec = SITES[site]
    if spec.anatomy == "knee":
        return _knee_subject(config, site, split, index)
    site_key, split_key = list(SITES).index(site), SPLITS.index(split)
    r = config.resolution
    n = native_size(site, r)
    heights, step = _slice_heights(config.slices, _extra_slices(site, config.slices))
    voxel_mm = spec.fov_mm / r
    head = _HEAD_SEMI_AXIS_MM / (0.5 * voxel_mm * n)  # head semi-axis in units of half the FOV

    anatomy_rng = _rng(config.seed, site_key, split_key, index, 0)
    phantom = sample_head(anatomy_rng, n, heights, head, lesions=spec.lesions, skull=spec.skull)
    session_rng = _rng(config.seed, site_key, split_key, index, 1)
    bias = _bias_field(session_rng, phantom.coarse.shape, spec.bias)
    gain = session_rng.uniform(0.8, 1.25)  # scanner receive gain differs per session
    subject = f"synth{site}_{split}_{index:03d}"
    slice_mm = step * HEAD_HEIGHT_RATIO * _HEAD_SEMI_AXIS_MM  # nominal: heads differ in size
    inside = phantom.fractions["air"] < 0.5
    coils = None

    volumes = []
    for sequence in config.site_sequences(site):
        key = SEQUENCES.index(sequence)
        rng = _rng(config.seed, site_key, split_key, index, 2 + key)
        magnitude = phantom.image(spec.sequences[sequence], spec.field_strength_t) * bias
        sigma = spec.noise * float(magnitude[inside].mean())
        volume = _Volume(subject=subject, sequence=sequence, slice_mm=slice_mm)
        if spec.format == "fastmri_h5":
            image = magnitude * np.exp(1j * _phase(rng, magnitude.shape, spec.phase))
            kspace = _to_kspace(image, site, r)
            noise = rng.standard_normal((2, *kspace.shape), dtype=np.float32) * np.float32(sigma)
            kspace = _measured(kspace, noise[0] + 1j * noise[1], spec.sharpness)
            kspace = (kspace * (spec.scale * gain)).astype(np.complex64)
            volume.kspace = kspace
            volume.target = np.abs(center_crop(ifft2c(kspace), (r, r))).astype(np.float32)
            volumes.append(volume)
            if config.multicoil:
                if coils is None:
                    rows_mm, cols_mm = _in_plane_mm(n, voxel_mm)
                    coords = (heights * (HEAD_HEIGHT_RATIO * _HEAD_SEMI_AXIS_MM), rows_mm, cols_mm)
                    coils = _coils(_rng(config.seed, site_key, split_key, index, 10), config.coils,
                                   _HEAD_COIL_RADIUS_MM, coords, (2, 1, 0), inside)
                maps, covariance = coils
                coil_k = _to_kspace(maps * image[:, None], site, r)
                noise_rng = _rng(config.seed, site_key, split_key, index, 20 + key)
                coil_k = _measured(coil_k, correlated_noise(noise_rng, covariance, coil_k.shape, sigma),
                                   spec.sharpness)
                coil_k = (coil_k * (spec.scale * gain)).astype(np.complex64)
                volumes.append(_Volume(subject, sequence, "multicoil", coil_k, _rss_target(coil_k, r),
                                       slice_mm=slice_mm))
            continue
        noise = rng.standard_normal((2, *magnitude.shape), dtype=np.float32) * np.float32(sigma)
        # Rician magnitude of the noisy image seen through the site's resolution window.
        image = np.abs(_lowpass(magnitude + noise[0] + 1j * noise[1], spec.sharpness))
        if not spec.skull:
            image = image * phantom.brain
        volume.image = (image * (spec.scale * gain)).astype(np.float32)
        volumes.append(volume)
    return volumes


def _knee_subject(config: SyntheticConfig, site: str, split: str, index: int) -> list[_Volume]:
    """A knee subject: per sequence the emulated single-coil volume, then the multicoil one.

    The singlecoil k-space is the emulated single coil of the array (fixed weights `w` fitted per
    volume, `data.coils.emulated_single_coil`) with its own noise; the multicoil noise is drawn
    conditioned on that noise, so the singlecoil file is exactly `sum_c w_c` of the multicoil
    file's coils, as fastMRI's singlecoil knee data were derived from the multicoil scans.
    """
    spec = SITES[site]
    site_key, split_key = list(SITES).index(site), SPLITS.index(split)
    r = config.resolution
    voxel_mm = spec.fov_mm / r
    positions, step = knee_slice_positions(config.slices)
    phantom = sample_knee(_rng(config.seed, site_key, split_key, index, 0), r, voxel_mm, positions)
    session_rng = _rng(config.seed, site_key, split_key, index, 1)
    bias = _bias_field(session_rng, phantom.coarse.shape, spec.bias)
    gain = session_rng.uniform(0.8, 1.25)
    inside = phantom.fractions["air"] < 0.5
    rows_mm, cols_mm = _in_plane_mm(r, voxel_mm)
    maps, covariance = _coils(_rng(config.seed, site_key, split_key, index, 10), config.coils,
                              _KNEE_COIL_RADIUS_MM, (positions, rows_mm, cols_mm), (1, 2, 0), inside)
    subject = f"synth{site}_{split}_{index:03d}"
    unit = spec.scale * gain

    volumes = []
    for sequence in config.site_sequences(site):
        key = SEQUENCES.index(sequence)
        rng = _rng(config.seed, site_key, split_key, index, 2 + key)
        protocol = spec.sequences[sequence]
        magnitude = phantom.image(protocol) * bias
        # Same coil, same noise: the level follows the image without fat saturation.
        reference = (phantom.image(replace(protocol, fat_saturation=0.0)) * bias
                     if getattr(protocol, "fat_saturation", 0.0) else magnitude)
        sigma = spec.noise * float(reference[inside].mean())
        image = magnitude * np.exp(1j * _phase(rng, magnitude.shape, spec.phase))
        coil_images = maps * image[:, None]  # (S, C, R, R)
        weights = emulated_single_coil(coil_images, np.abs(image), inside)
        esc_image = np.tensordot(coil_images, weights.astype(np.complex64), axes=([1], [0]))
        a = weights.conj()
        esc_sigma = sigma * float(np.sqrt(np.real(a.conj() @ covariance @ a)))
        kspace = _to_kspace(esc_image, site, r)
        noise = rng.standard_normal((2, *kspace.shape), dtype=np.float32) * np.float32(esc_sigma)
        esc_noise = noise[0] + 1j * noise[1]
        kspace = _measured(kspace, esc_noise, spec.sharpness)
        kspace = _acquired((kspace * unit).astype(np.complex64), site, r)
        volumes.append(_Volume(subject, sequence, "singlecoil", kspace,
                               np.abs(center_crop(ifft2c(kspace), (r, r))).astype(np.float32),
                               slice_mm=step))
        if config.multicoil:
            coil_k = _to_kspace(coil_images, site, r)
            noise = correlated_noise(_rng(config.seed, site_key, split_key, index, 20 + key),
                                     covariance, coil_k.shape, sigma)
            # Condition on sum_c w_c noise_c = esc_noise (a Gaussian conditional).
            gain_vector = (covariance @ a) / np.real(a.conj() @ covariance @ a)
            residual = esc_noise - np.tensordot(noise, weights.astype(np.complex64), axes=([1], [0]))
            noise += gain_vector.astype(np.complex64)[None, :, None, None] * residual[:, None]
            coil_k = _measured(coil_k, noise, spec.sharpness)  # linear: the sum_c w_c relation holds
            coil_k = _acquired((coil_k * unit).astype(np.complex64), site, r)
            volumes.append(_Volume(subject, sequence, "multicoil", coil_k, _rss_target(coil_k, r),
                                   slice_mm=step))
    return volumes


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------

def acquisition(site: str, sequence: str) -> str:
    """The `acquisition` attribute of a site's files: AXT1, AXFLAIR, ..., CORPD_FBK for the knee."""
    return (SITES[site].acquisitions or {}).get(sequence, f"AX{sequence}")


def ismrmrd_header(site: str, config: SyntheticConfig, sequence: str, slices: int, slice_mm: float,
                   coils: int = 1) -> str:
    """ISMRMRD XML for a Cartesian acquisition with `coils` receive channels, with fastMRI's
    encoding conventions (phase-encode padding from kspace_encoding_step_1's centre/maximum)."""
    spec = SITES[site]
    r = config.resolution
    hk, wk = kspace_shape(site, r)
    left, right = acquired_columns(site, r)
    protocol = spec.sequences[sequence]
    inversion = f"\n    <TI>{protocol.ti}</TI>" if isinstance(protocol, InversionRecovery) else ""
    fov = spec.fov_mm
    return f"""<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <measurementInformation>
    <patientPosition>{"FFS" if spec.anatomy == "knee" else "HFS"}</patientPosition>
    <protocolName>{acquisition(site, sequence)}</protocolName>
  </measurementInformation>
  <acquisitionSystemInformation>
    <systemVendor>fedrecon-synthetic</systemVendor>
    <systemModel>site {site}</systemModel>
    <systemFieldStrength_T>{spec.field_strength_t}</systemFieldStrength_T>
    <receiverChannels>{coils}</receiverChannels>
  </acquisitionSystemInformation>
  <experimentalConditions>
    <H1resonanceFrequency_Hz>{int(round(42.577478e6 * spec.field_strength_t))}</H1resonanceFrequency_Hz>
  </experimentalConditions>
  <encoding>
    <encodedSpace>
      <matrixSize><x>{hk}</x><y>{wk}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>{2 * fov:.3f}</x><y>{fov * wk / r:.3f}</y><z>{slice_mm:.3f}</z></fieldOfView_mm>
    </encodedSpace>
    <reconSpace>
      <matrixSize><x>{r}</x><y>{r}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>{fov:.3f}</x><y>{fov:.3f}</y><z>{slice_mm:.3f}</z></fieldOfView_mm>
    </reconSpace>
    <encodingLimits>
      <kspace_encoding_step_1><minimum>0</minimum><maximum>{right - left - 1}</maximum><center>{wk // 2 - left}</center></kspace_encoding_step_1>
      <kspace_encoding_step_2><minimum>0</minimum><maximum>0</maximum><center>0</center></kspace_encoding_step_2>
      <slice><minimum>0</minimum><maximum>{slices - 1}</maximum><center>{slices // 2}</center></slice>
    </encodingLimits>
    <trajectory>cartesian</trajectory>
  </encoding>
  <sequenceParameters>
    <TR>{protocol.tr}</TR>
    <TE>{protocol.te}</TE>{inversion}
    <flipAngle_deg>90.0</flipAngle_deg>
  </sequenceParameters>
</ismrmrdHeader>
"""


def _write_h5(path: Path, volume: _Volume, site: str, config: SyntheticConfig) -> None:
    """fastMRI file: kspace, reconstruction_esc (singlecoil) or reconstruction_rss (multicoil),
    ismrmrd_header and attributes."""
    multicoil = volume.challenge == "multicoil"
    header = ismrmrd_header(site, config, volume.sequence, volume.kspace.shape[0], volume.slice_mm,
                            coils=volume.kspace.shape[1] if multicoil else 1)
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=volume.kspace)
        f.create_dataset("reconstruction_rss" if multicoil else "reconstruction_esc", data=volume.target)
        f.create_dataset("ismrmrd_header", data=np.bytes_(header.encode()))
        f.attrs["acquisition"] = acquisition(site, volume.sequence)
        f.attrs["max"] = float(volume.target.max())
        f.attrs["norm"] = float(np.linalg.norm(volume.target))
        f.attrs["patient_id"] = volume.subject


def _nifti_affine(n: int, voxel_mm: float, slice_mm: float, slices: int) -> np.ndarray:
    """Voxel (row, column, slice) -> RAS mm: rows run anterior to posterior, columns right to left
    (radiological display), slices inferior to superior; the volume centre is at the origin."""
    affine = np.array([[0.0, -voxel_mm, 0.0, 0.0],
                       [-voxel_mm, 0.0, 0.0, 0.0],
                       [0.0, 0.0, slice_mm, 0.0],
                       [0.0, 0.0, 0.0, 1.0]])
    affine[:3, 3] = -affine[:3, :3] @ np.array([n // 2, n // 2, (slices - 1) / 2])
    return affine


def _write_nifti(path: Path, volume: _Volume, site: str, config: SyntheticConfig) -> None:
    """NIfTI-1 `(X, Y, Z)` with slices on the last axis: `data[:, :, k]` is slice k as displayed
    (row 0 anterior). I: int16 (as IXI ships); B: float32. gzip with mtime 0 so bytes repeat."""
    data = np.ascontiguousarray(np.transpose(volume.image, (1, 2, 0)))  # (S, N, N) -> (N, N, S)
    if site == "I":
        data = np.clip(np.rint(data), 0, np.iinfo(np.int16).max).astype(np.int16)
    n = data.shape[0]
    img = nib.Nifti1Image(data, _nifti_affine(n, SITES[site].fov_mm / config.resolution,
                                              volume.slice_mm, data.shape[2]))
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = f"fedrecon synthetic site {site} {volume.sequence}".encode()
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def _sites_json(config: SyntheticConfig) -> dict:
    """Site registry entries (roots relative to the folder holding sites.json) and the image size
    runs on these sites default to."""
    sites = {}
    for name in config.sites():
        spec = SITES[name]
        entry: dict = {"root": name, "format": spec.format}
        if spec.format == "fastmri_h5":
            entry["challenge"] = "singlecoil"
        if "multicoil" in config.challenges(name):
            entry["multicoil_root"] = f"{MULTICOIL_FOLDER}/{name}"
        if spec.anatomy == "knee":  # runs on the brain sites choose their --sequence
            entry["sequence"] = config.site_sequences(name)[0]
        extra = _extra_slices(name, config.slices)
        entry["slice_range"] = [extra, extra + config.slices] if extra else None
        entry["description"] = f"synthetic {spec.description}"
        sites[name] = entry
    return {"resolution": config.resolution, "sites": sites}


def manifest(config: SyntheticConfig) -> dict:
    """Everything the generated arrays depend on, as plain JSON values."""
    content = {
        "generator": "fedrecon data.synthetic",
        "version": GENERATOR_VERSION,
        "config": asdict(config),
        "sites": {name: asdict(spec) for name, spec in SITES.items()},
        "tissues": {f"{field}T": {name: asdict(t) for name, t in table.items()}
                    for field, table in TISSUES.items()},
        "knee_tissues": {name: asdict(t) for name, t in KNEE_TISSUES.items()},
    }
    return json.loads(json.dumps(content))


def config_dirname(config: SyntheticConfig) -> str:
    """Cache subfolder of a parameter set: readable prefix + hash of the manifest."""
    digest = hashlib.sha256(json.dumps(manifest(config), sort_keys=True).encode()).hexdigest()
    return f"v{GENERATOR_VERSION}-r{config.resolution}-seed{config.seed}-{digest[:12]}"


def _generate_into(folder: Path, config: SyntheticConfig, progress: bool) -> None:
    """Write all volumes, sites.json and (last) manifest.json into an empty `folder`.

    Subjects are computed in a few threads (numpy releases the GIL in its array loops) and
    written in order by this thread; every subject has its own seed, so the output is the same.
    """
    sites = config.sites()
    jobs = [(site, split, i) for site in sites for split in SPLITS for i in range(config.volumes(split))]
    total = 0
    for site in sites:
        for root in [Path(site)] + [Path(MULTICOIL_FOLDER, site)] * ("multicoil" in config.challenges(site)):
            for sequence in config.site_sequences(site):
                for split in SPLITS:
                    (folder / root / sequence / split).mkdir(parents=True, exist_ok=True)
                total += sum(config.volumes(split) for split in SPLITS)
    workers = max(1, min(4, os.cpu_count() or 1))
    bar = tqdm(total=total, desc="synthetic sites", unit="vol", disable=None if progress else True)
    with bar, ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for job in jobs + [None] * (2 * workers):
            if job is not None:
                pending.append((job, pool.submit(generate_subject, config, *job)))
            if len(pending) > 2 * workers or (job is None and pending):
                (site, split, _), future = pending.popleft()
                for volume in future.result():
                    root = folder / MULTICOIL_FOLDER if volume.challenge == "multicoil" else folder
                    out = root / site / volume.sequence / split / volume.subject
                    if SITES[site].format == "fastmri_h5":
                        _write_h5(out.with_suffix(".h5"), volume, site, config)
                    else:
                        _write_nifti(out.with_suffix(".nii.gz"), volume, site, config)
                    bar.update()
    (folder / "sites.json").write_text(json.dumps(_sites_json(config), indent=2) + "\n")
    (folder / "manifest.json").write_text(json.dumps(manifest(config), indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Cache: regenerate only when missing or when the parameters change; never leave half a root
# ---------------------------------------------------------------------------------------------

def _matches(root: Path, expected: dict) -> bool:
    try:
        found = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return found == expected and (root / "sites.json").is_file()


def _remove_stale_temporaries(parent: Path, name: str, older_than_s: float = 6 * 3600) -> None:
    """Delete leftovers of generations that were killed (a clean exit removes its own)."""
    now = time.time()
    for path in parent.glob(f".{name}.*-*"):
        try:
            if now - path.stat().st_mtime > older_than_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def write_synthetic_sites(
    config: SyntheticConfig, root: Path, force: bool = False, progress: bool = False
) -> Path:
    """Generate the four sites into exactly `root`, unless its manifest already matches `config`.

    `root` must be missing, empty, or an earlier synthetic root (it has a manifest.json), which
    is then replaced as a whole. Returns `root`. Raises UserError for an unusable folder.
    """
    root = Path(root).expanduser().absolute()
    expected = manifest(config)
    if not force and _matches(root, expected):
        return root
    if root.exists() and (not root.is_dir() or (
            not (root / "manifest.json").exists() and any(root.iterdir()))):
        raise UserError(f"{root} exists and is not a synthetic-sites folder (no manifest.json); "
                        "choose a new or empty folder")
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(root.parent, root.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    except OSError as err:
        raise UserError(f"cannot write synthetic data under {root.parent}: {err.strerror}; "
                        "choose a writable folder (--out or $FEDRECON_SYNTHETIC_DIR)") from err
    try:
        try:
            _generate_into(tmp, config, progress)
        except OSError as err:
            raise UserError(f"cannot write synthetic data to {tmp}: {err.strerror or err}; "
                            "free some space or choose another folder") from err
        try:
            os.rename(tmp, root)  # atomic; also replaces an empty folder
            return root
        except OSError:
            pass
        if not force and _matches(root, expected):
            return root  # another process finished the same parameters first
        old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(root, old)
        os.rename(tmp, root)
        shutil.rmtree(old, ignore_errors=True)
        return root
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_synthetic_sites(
    config: SyntheticConfig = SyntheticConfig(),
    cache_dir: Path | None = None,
    progress: bool = False,
    force: bool = False,
) -> Path:
    """Root of the synthetic sites for `config`, generating them on first use.

    Each parameter set lives in its own subfolder of `cache_dir` (default `default_cache_dir()`),
    so runs with different parameters never touch each other's files. The root holds
    `sites.json`, `manifest.json` and the folders F, H, I, B.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return write_synthetic_sites(config, cache_dir / config_dirname(config), force=force,
                                 progress=progress)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(
        prog="python -m data.synthetic",
        description="Write five synthetic MRI sites (F, H, K: fastMRI HDF5; I, B: NIfTI) with\n"
                    "each site's contrasts in train/val/test splits, plus sites.json for the site\n"
                    "registry; with --multicoil also F, H and K as fastMRI multicoil files.\n"
                    "Nothing is written when the folder already holds the same parameters.\n"
                    "Prints the root folder.",
        epilog="sites:\n" + "".join(f"  {name}  {', '.join(spec.sequences)}: {spec.description}\n"
                                     for name, spec in SITES.items())
               + "\nlayout: ROOT/<site>/<sequence>/<train|val|test>/<subject>.h5|.nii.gz (the same\n"
               "  subject names in every sequence folder of a site); with --multicoil also\n"
               f"  ROOT/{MULTICOIL_FOLDER}/<site>/<sequence>/<split>/<subject>.h5\n"
               f"default ROOT: a per-parameter subfolder of {default_cache_dir()}\n"
               "  ($FEDRECON_SYNTHETIC_DIR, else $FEDRECON_CACHE/synthetic, else "
               "~/.cache/fedrecon/synthetic)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="write the sites into DIR itself (new, empty, or an earlier synthetic "
                             "root, which is replaced when its parameters differ)")
    parser.add_argument("--resolution", type=int, default=defaults.resolution,
                        help="image matrix R (target R x R; multiple of 16) (default: %(default)s)")
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=int, default=defaults.volumes(split),
                            help=f"{split} volumes per site and sequence (default: %(default)s)")
    parser.add_argument("--slices", type=int, default=defaults.slices,
                        help="slices per volume (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="random seed; same seed, same arrays (default: %(default)s)")
    parser.add_argument("--multicoil", action="store_true",
                        help="also write F, H and K as fastMRI multicoil HDF5 (about "
                             "coils x the singlecoil size on disk)")
    parser.add_argument("--coils", type=int, default=defaults.coils,
                        help="receive channels of the coil arrays (multicoil files; K's emulated "
                             "single coil) (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry: generate (or find) the sites and print their root; user errors exit with 2."""
    args = _parser().parse_args(argv)
    try:
        config = SyntheticConfig(resolution=args.resolution, train=args.train, val=args.val,
                                 test=args.test, slices=args.slices, seed=args.seed,
                                 multicoil=args.multicoil, coils=args.coils)
        if args.out is not None:
            root = write_synthetic_sites(config, args.out, force=args.force, progress=not args.quiet)
        else:
            root = ensure_synthetic_sites(config, force=args.force, progress=not args.quiet)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
