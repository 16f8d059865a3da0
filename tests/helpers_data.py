"""Writers of tiny volume files (fastMRI HDF5, NIfTI, HDF5 image stacks) for the data tests."""

from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np


def ismrmrd_header(
    encoding: tuple[int, int, int] = (640, 368, 1),
    recon: tuple[int, int, int] = (320, 320, 1),
    center: int = 180,
    maximum: int = 367,
) -> str:
    """A minimal ISMRMRD XML header with the fields fastMRI reads."""
    def size(xyz: tuple[int, int, int]) -> str:
        return "".join(f"<{a}>{v}</{a}>" for a, v in zip("xyz", xyz))

    return (
        '<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><encoding>'
        f"<encodedSpace><matrixSize>{size(encoding)}</matrixSize></encodedSpace>"
        f"<reconSpace><matrixSize>{size(recon)}</matrixSize></reconSpace>"
        "<encodingLimits><kspace_encoding_step_1><minimum>0</minimum>"
        f"<maximum>{maximum}</maximum><center>{center}</center>"
        "</kspace_encoding_step_1></encodingLimits></encoding></ismrmrdHeader>"
    )


def write_fastmri(
    path: Path,
    num_slices: int = 3,
    shape: tuple[int, int] = (16, 12),
    coils: int | None = None,
    target: bool = True,
    header: bool = True,
    mask: bool = False,
    attrs: dict[str, Any] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """A fastMRI-style file; returns its k-space (S, H, W) or (S, C, H, W) complex64.

    The target (``reconstruction_esc`` singlecoil, ``reconstruction_rss`` multicoil) is
    (S, 8, 8) float32 ones times the slice index + 1.
    """
    rng = np.random.default_rng(seed)
    full = (num_slices,) + ((coils,) if coils else ()) + shape
    kspace = (rng.standard_normal(full) + 1j * rng.standard_normal(full)).astype(np.complex64)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as hf:
        hf.create_dataset("kspace", data=kspace)
        if target:
            key = "reconstruction_rss" if coils else "reconstruction_esc"
            values = np.arange(1, num_slices + 1, dtype=np.float32)[:, None, None]
            hf.create_dataset(key, data=values * np.ones((1, 8, 8), np.float32))
        if header:
            hf.create_dataset("ismrmrd_header", data=ismrmrd_header())
        if mask:
            hf.create_dataset("mask", data=np.arange(shape[1]) % 2 == 0)
        hf.attrs.update({"max": float(num_slices), "patient_id": "p1", **(attrs or {})})
    return kspace


def write_nifti(path: Path, volume: np.ndarray) -> None:
    """A NIfTI file (``.nii`` or ``.nii.gz`` from the name) holding ``volume`` as stored."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)


def write_h5_image(path: Path, volume: np.ndarray, key: str = "image") -> None:
    """An HDF5 image stack: ``volume`` (S, H, W) in dataset ``key``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as hf:
        hf.create_dataset(key, data=volume)
        hf.attrs["patient_id"] = "img"


def brain_like_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A float32 (X, Y, Z) volume: positive textured ellipse on a zero background, like a skull-
    stripped brain scan."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    inside = (x / 0.8) ** 2 + (y / 0.9) ** 2 < 1
    volume = rng.uniform(100, 1000, size=shape).astype(np.float32)
    return volume * inside[..., None].astype(np.float32)
