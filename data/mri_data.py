"""A slice-level dataset over MRI volume files: fastMRI HDF5, NIfTI images and HDF5 image stacks.

Formats (``fmt``):

- ``fastmri_h5``: fastMRI HDF5. ``kspace`` complex, ``(S, H, W)`` singlecoil or ``(S, C, H, W)``
  multicoil; target ``reconstruction_esc`` (singlecoil) or ``reconstruction_rss`` (multicoil) when
  present; optional ``mask`` (W,) and ``ismrmrd_header``; the file's attributes go into ``attrs``.
- ``nifti``: ``.nii`` / ``.nii.gz`` 3-D magnitude volumes, slices on the last axis (a slice is
  ``volume[:, :, s]``, rows = first axis).
- ``h5_image``: HDF5 magnitude stacks ``(S, H, W)`` in dataset ``image`` (or
  ``reconstruction_esc`` / ``reconstruction_rss``).
- ``auto``: per file, from its suffix and (for HDF5) whether it holds ``kspace``.

Image formats become k-space as in FL-MRCM: the magnitude slice is centre-padded or cropped to
``resolution`` x ``resolution`` and transformed by the centred orthonormal 2-D FFT with zero phase.
Its target is that padded/cropped image and ``attrs["max"]`` is the maximum of the volume as the
experiment sees it (padded/cropped, ``slice_range`` applied), computed once per file per process.

Memory: the dataset holds only an index of ``(file, slice)`` built from headers and dataset shapes.
Each process (DataLoader worker) opens files itself, lazily, and keeps a small LRU of open files and
of decoded ``.nii.gz`` volumes (decompressing is whole-file, so consecutive slices reuse it). The
caches are rebuilt after a fork and left out when the dataset is pickled (spawned workers).

Corrupt-file policy: fail fast. Every file is checked while the index is built (opens as HDF5 or
NIfTI, holds the expected dataset with a usable shape, uncompressed NIfTI not truncated), and any
bad file stops the run with a ``DataError`` naming it: silently dropping one hospital's volume would
change the experiment. Problems only visible in the data (NaN/Inf values, a truncated ``.nii.gz``)
raise ``DataError`` naming the file and slice when that slice is read.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import nibabel as nib
import numpy as np
import torch.utils.data
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from data.transforms import fft2c_np
from utils.errors import DataError

FORMATS = ("fastmri_h5", "nifti", "h5_image", "auto")
CHALLENGES = ("singlecoil", "multicoil")
H5_SUFFIXES = (".h5", ".hdf5")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_KEYS = ("image", "reconstruction_esc", "reconstruction_rss")
TARGET_KEYS = {"singlecoil": "reconstruction_esc", "multicoil": "reconstruction_rss"}

_ISMRMRD_NS = "http://www.ismrm.org/ISMRMRD"
# Every open file pins HDF5 metadata that fragments the heap between the transform's buffers
# (about 4 MiB of peak RSS per open 256 x 256 fastMRI file), and reopening one costs about 0.1 ms:
# keep a few, so that memory stays flat however many volumes a process reads.
_OPEN_FILES_PER_PROCESS = 4
_DECODED_VOLUMES_PER_PROCESS = 2
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError, HeaderDataError)

Transform = Callable[..., Any]


def volume_suffixes(fmt: str) -> tuple[str, ...]:
    """File-name endings of volume files of format ``fmt`` (one of ``FORMATS``)."""
    if fmt in ("fastmri_h5", "h5_image"):
        return H5_SUFFIXES
    if fmt == "nifti":
        return NIFTI_SUFFIXES
    if fmt == "auto":
        return H5_SUFFIXES + NIFTI_SUFFIXES
    raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


def is_volume_file(path: Path, fmt: str = "auto") -> bool:
    """Whether ``path`` is named like a volume file of format ``fmt`` (hidden files are not)."""
    name = path.name.lower()
    return not name.startswith(".") and name.endswith(volume_suffixes(fmt))


def subsample_volumes(files: Sequence[Path], rate: float, seed: int) -> list[Path]:
    """Keep a reproducible fraction ``rate`` of the volume files, chosen by ``seed``.

    At least one volume is kept when ``rate > 0``. The result is sorted, whatever the input order.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    ordered = sorted(Path(f) for f in files)
    if rate == 1.0:
        return ordered
    count = min(len(ordered), max(1, round(rate * len(ordered)))) if rate > 0 else 0
    keep = np.random.default_rng(seed).choice(len(ordered), size=count, replace=False)
    return [ordered[i] for i in sorted(keep)]


def center_fit(image: np.ndarray, size: int | None) -> np.ndarray:
    """Centre-crop or zero-pad the last two axes of ``image`` (..., H, W) to (..., size, size).

    Crops start at ``(n - size) // 2`` as fastMRI's ``center_crop`` does; pads put the image at
    ``(size - n) // 2``, so padding then cropping back gives the original. ``size=None``: unchanged.
    """
    if size is None or image.shape[-2:] == (size, size):
        return image
    src: list[slice] = []
    dst: list[slice] = []
    for n in image.shape[-2:]:
        if n >= size:
            src.append(slice((n - size) // 2, (n - size) // 2 + size))
            dst.append(slice(None))
        else:
            src.append(slice(None))
            dst.append(slice((size - n) // 2, (size - n) // 2 + n))
    out = np.zeros(image.shape[:-2] + (size, size), dtype=image.dtype)
    out[..., dst[0], dst[1]] = image[..., src[0], src[1]]
    return out


def image_to_kspace(image: np.ndarray) -> np.ndarray:
    """Centred orthonormal 2-D FFT of a real image (..., H, W), zero phase -> complex64 k-space."""
    return fft2c_np(image.astype(np.complex64))


class _Volume(NamedTuple):
    """What the index knows about one file, read from its headers and dataset shapes."""

    fmt: str  # resolved format: fastmri_h5, nifti or h5_image
    key: str  # HDF5 dataset holding the slices ("" for nifti)
    target_key: str | None  # fastmri_h5 target dataset, when the file has one
    has_mask: bool
    num_slices: int
    attrs: dict[str, Any]
    coils: int = 1  # receive channels of a multicoil fastMRI file


class _ProcessFiles:
    """One process's open files, decoded volumes and volume maxima; never shared across a fork."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.open: OrderedDict[Path, Any] = OrderedDict()  # h5py.File or nibabel image
        self.decoded: OrderedDict[Path, np.ndarray] = OrderedDict()  # (S, H, W) float32
        self.max: dict[Path, float] = {}


def _remember(cache: OrderedDict, key: Path, value: Any, capacity: int) -> Any:
    """Put ``value`` into the LRU ``cache``, closing (if it can be closed) what falls out."""
    cache[key] = value
    while len(cache) > capacity:
        _, old = cache.popitem(last=False)
        if isinstance(old, h5py.File):
            old.close()
    return value


def _h5_names(hf: h5py.File) -> str:
    return ", ".join(sorted(hf.keys())) or "none"


def _ismrmrd_sizes(path: Path, xml: bytes | str) -> dict[str, Any]:
    """Encoding/recon matrix sizes and phase-encoding padding from an ISMRMRD header, as fastMRI."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as err:
        raise DataError(f"{path}: 'ismrmrd_header' is not valid XML ({err}); re-copy the file or "
                        "delete that dataset from it") from None
    ns = {"m": _ISMRMRD_NS}

    def query(*names: str) -> int:
        element = root.find("." + "".join(f"//m:{n}" for n in names), ns)
        if element is None or element.text is None:
            raise DataError(f"{path}: 'ismrmrd_header' lacks {'/'.join(names)}; re-copy the file "
                            "or delete that dataset from it")
        return int(element.text)

    enc = ("encoding", "encodedSpace", "matrixSize")
    rec = ("encoding", "reconSpace", "matrixSize")
    lims = ("encoding", "encodingLimits", "kspace_encoding_step_1")
    encoding_size = tuple(query(*enc, axis) for axis in "xyz")
    recon_size = tuple(query(*rec, axis) for axis in "xyz")
    padding_left = encoding_size[1] // 2 - query(*lims, "center")
    return {
        "encoding_size": encoding_size,
        "recon_size": recon_size,
        "padding_left": padding_left,
        "padding_right": padding_left + query(*lims, "maximum") + 1,
    }


def _index_h5(path: Path, fmt: str, challenge: str) -> _Volume:
    try:
        hf = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path} cannot be opened as HDF5 ({err}); it is truncated or not an HDF5 "
                        "file: re-copy or remove it") from None
    with hf:
        if fmt == "auto":
            fmt = "fastmri_h5" if "kspace" in hf else "h5_image"
        if fmt == "fastmri_h5":
            return _index_fastmri(path, hf, challenge)
        return _index_h5_image(path, hf, challenge)


def _index_fastmri(path: Path, hf: h5py.File, challenge: str) -> _Volume:
    if "kspace" not in hf:
        raise DataError(f"{path} has no 'kspace' dataset (datasets: {_h5_names(hf)}); a fastMRI "
                        "file needs one: if it holds images, set the site's format to h5_image")
    kspace = hf["kspace"]
    want_ndim = 3 if challenge == "singlecoil" else 4
    if kspace.ndim != want_ndim or kspace.dtype.kind != "c":
        raise DataError(
            f"{path}: 'kspace' is {kspace.dtype} of shape {kspace.shape}, but {challenge} needs "
            f"complex {'(S, H, W)' if challenge == 'singlecoil' else '(S, C, H, W)'}: set the "
            "site's challenge to match the file")
    target_key = TARGET_KEYS[challenge] if TARGET_KEYS[challenge] in hf else None
    if target_key is not None and hf[target_key].shape[0] != kspace.shape[0]:
        raise DataError(f"{path}: '{target_key}' has {hf[target_key].shape[0]} slices but 'kspace' "
                        f"has {kspace.shape[0]}; re-copy or remove the file")
    attrs = dict(hf.attrs)
    if "ismrmrd_header" in hf:
        attrs.update(_ismrmrd_sizes(path, hf["ismrmrd_header"][()]))
    coils = kspace.shape[1] if challenge == "multicoil" else 1
    return _Volume("fastmri_h5", "kspace", target_key, "mask" in hf, kspace.shape[0], attrs, coils)


def _index_h5_image(path: Path, hf: h5py.File, challenge: str) -> _Volume:
    preferred = ("image", TARGET_KEYS[challenge]) + IMAGE_KEYS
    key = next((k for k in preferred if k in hf), None)
    if key is None:
        raise DataError(f"{path} has none of the image datasets {', '.join(IMAGE_KEYS)} (datasets: "
                        f"{_h5_names(hf)}): store the slices (S, H, W) as 'image'")
    if hf[key].ndim != 3 or hf[key].dtype.kind not in "fiu":
        raise DataError(f"{path}: '{key}' is {hf[key].dtype} of shape {hf[key].shape}; an image "
                        "stack must be real (S, H, W): re-export the file")
    return _Volume("h5_image", key, None, False, hf[key].shape[0], dict(hf.attrs))


def _index_nifti(path: Path) -> _Volume:
    try:
        image = nib.load(path)
    except _READ_ERRORS as err:
        problem = f"{path} is not a readable NIfTI file ({err}): re-copy or remove it"
        raise DataError(problem) from None
    if len(image.shape) != 3:
        raise DataError(f"{path} holds a {len(image.shape)}-D image of shape {image.shape}; only "
                        "3-D volumes (slices on the last axis) are read: split it or remove it")
    if not path.name.lower().endswith(".gz"):
        needed = image.dataobj.offset + int(np.prod(image.shape)) * image.dataobj.dtype.itemsize
        if path.stat().st_size < needed:
            raise DataError(f"{path} is truncated ({path.stat().st_size} bytes, its header needs "
                            f"{needed}): re-copy or remove it")
    return _Volume("nifti", "", None, False, image.shape[2], {})


def _index_file(path: Path, fmt: str, challenge: str) -> _Volume:
    """Check one file and read what the index needs, without reading its slices."""
    if not path.is_file():
        raise DataError(f"volume file {path} does not exist: check the site's folder")
    name = path.name.lower()
    if fmt in ("fastmri_h5", "h5_image", "auto") and name.endswith(H5_SUFFIXES):
        return _index_h5(path, fmt, challenge)
    if fmt in ("nifti", "auto") and name.endswith(NIFTI_SUFFIXES):
        return _index_nifti(path)
    raise DataError(f"{path} is not a {fmt} volume file (expected a name ending in "
                    f"{', '.join(volume_suffixes(fmt))}): remove it or set the site's format")


class SliceDataset(torch.utils.data.Dataset):
    """Slices of MRI volume files, each handed to ``transform`` as fastMRI's ``SliceDataset`` does.

    ``dataset[i]`` is ``transform(kspace, mask, target, attrs, fname, slice_num, seed)`` with
    ``kspace`` complex64 (H, W) singlecoil or (C, H, W) multicoil (image formats give a single
    uniform coil, (1, H, W)), ``mask`` the file's stored mask or None, ``target`` float32 (h, w) or
    None, ``attrs`` a fresh dict, ``fname`` the file's base name and ``slice_num`` the slice index
    in the file. ``seed`` is None, or after ``set_epoch(e)`` the tuple ``(e, slice_num, *map(ord,
    fname))``: a fresh mask per slice and epoch that does not depend on the number of workers.
    """

    def __init__(
        self,
        files: Sequence[Path],
        transform: Transform,
        *,
        fmt: str = "auto",
        challenge: str = "singlecoil",
        resolution: int | None = None,
        slice_range: tuple[int, int] | None = None,
    ) -> None:
        """Index the slices of ``files``; raises ``DataError`` naming every file that is unusable.

        Args:
            files: volume files; every one must be usable (see the module's corrupt-file policy).
            transform: called on each slice (see the class docstring).
            fmt: one of ``FORMATS``.
            challenge: "singlecoil" or "multicoil": the k-space shape and target of fastMRI files.
            resolution: image formats are centre-padded/cropped to this size (None: native size).
            slice_range: ``(start, stop)`` with Python slice semantics, applied to every volume.
        """
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
        if challenge not in CHALLENGES:
            raise ValueError(f"unknown challenge {challenge!r}; known: {', '.join(CHALLENGES)}")
        if not files:
            raise ValueError("SliceDataset needs at least one volume file")
        self.transform = transform
        self.challenge = challenge
        self.resolution = resolution
        self.slice_range = slice_range
        self.epoch_seed: int | None = None
        self._volumes, self.examples = _build_index(files, fmt, challenge, slice_range)
        self._process: _ProcessFiles | None = None

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_slices(self) -> int:
        """Number of slices in the dataset (after ``slice_range``)."""
        return len(self.examples)

    def volumes(self) -> list[Path]:
        """The volume files, in index order."""
        return list(self._volumes)

    def set_epoch(self, epoch_seed: int | None) -> None:
        """Seed every slice's mask from ``epoch_seed`` (a non-negative int), or None for no seed."""
        if epoch_seed is not None and not (isinstance(epoch_seed, int) and 0 <= epoch_seed < 2**32):
            raise ValueError(f"epoch_seed must be an int in [0, 2**32) or None, got {epoch_seed!r}")
        self.epoch_seed = epoch_seed

    def set_time(self, t: int, total: int) -> None:
        """Hand the augmentation schedule's time to the transform, when it has one (see
        ``data.augment.AugmentedTransform.set_time``); otherwise nothing to do."""
        if hasattr(self.transform, "set_time"):
            self.transform.set_time(t, total)

    def __getitem__(self, i: int) -> Any:
        path, slice_num = self.examples[i]
        volume = self._volumes[path]
        if volume.fmt == "fastmri_h5":
            kspace, mask, target, attrs = self._read_fastmri(path, volume, slice_num)
        else:
            kspace, target, attrs = self._read_image(path, volume, slice_num)
            mask = None
        seed = None
        if self.epoch_seed is not None:
            seed = (self.epoch_seed, slice_num) + tuple(map(ord, path.name))
        # One slice is too little work for intra-op threads: on one thread the transform is as fast
        # on an idle machine, far faster on a busy one, and gives the same bits as in a DataLoader
        # worker (which runs on one thread), whatever --num_workers is.
        threads = torch.get_num_threads()
        if threads == 1:
            return self.transform(kspace, mask, target, attrs, path.name, slice_num, seed)
        torch.set_num_threads(1)
        try:
            return self.transform(kspace, mask, target, attrs, path.name, slice_num, seed)
        finally:
            torch.set_num_threads(threads)

    def __getstate__(self) -> dict[str, Any]:
        # Open HDF5 handles cannot be pickled; a spawned worker opens its own.
        return {**self.__dict__, "_process": None}

    def _files(self) -> _ProcessFiles:
        if self._process is None or self._process.pid != os.getpid():
            self._process = _ProcessFiles()
        return self._process

    def _open(self, path: Path) -> Any:
        """This process's handle on ``path``: an ``h5py.File`` or a memory-mapped nibabel image."""
        files = self._files()
        if path in files.open:
            files.open.move_to_end(path)
            return files.open[path]
        try:
            if self._volumes[path].fmt == "nifti":
                handle = nib.load(path, mmap=True)
            else:
                handle = h5py.File(path, "r")
        except _READ_ERRORS as err:
            raise DataError(f"{path} can no longer be opened ({err}); it changed after indexing: "
                            "re-copy it or remove it") from None
        return _remember(files.open, path, handle, _OPEN_FILES_PER_PROCESS)

    def _read_fastmri(
        self, path: Path, volume: _Volume, slice_num: int
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, dict[str, Any]]:
        hf = self._open(path)
        try:
            kspace = np.asarray(hf["kspace"][slice_num], dtype=np.complex64)
            target = None
            if volume.target_key is not None:
                target = np.asarray(hf[volume.target_key][slice_num], dtype=np.float32)
            mask = np.asarray(hf["mask"]) if volume.has_mask else None
        except _READ_ERRORS as err:
            raise _unreadable(path, slice_num, err) from None
        _check_finite(path, slice_num, "kspace", kspace)
        if target is not None:
            _check_finite(path, slice_num, volume.target_key, target)
        return kspace, mask, target, dict(volume.attrs)

    def _read_image(
        self, path: Path, volume: _Volume, slice_num: int
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Image-format slice -> (k-space (H, W) or (1, H, W), target (H, W), attrs with max)."""
        try:
            if path.name.lower().endswith(".gz"):
                raw = self._decoded(path)[slice_num]
            elif volume.fmt == "nifti":
                raw = self._open(path).dataobj[:, :, slice_num]
            else:
                raw = self._open(path)[volume.key][slice_num]
        except _READ_ERRORS as err:
            raise _unreadable(path, slice_num, err) from None
        key = volume.key or "image"
        _check_finite(path, slice_num, key, raw)
        image = center_fit(np.abs(np.asarray(raw, dtype=np.float32)), self.resolution)
        kspace = image_to_kspace(image)
        if self.challenge == "multicoil":
            kspace = kspace[None]
        return kspace, image, {**volume.attrs, "max": self._volume_max(path, volume)}

    def _decoded(self, path: Path) -> np.ndarray:
        """The decoded volume (S, H, W) float32 of a compressed NIfTI, via this process's LRU."""
        files = self._files()
        if path in files.decoded:
            files.decoded.move_to_end(path)
            return files.decoded[path]
        data = np.moveaxis(np.asarray(nib.load(path).get_fdata(dtype=np.float32)), -1, 0)
        return _remember(files.decoded, path, data, _DECODED_VOLUMES_PER_PROCESS)

    def _volume_max(self, path: Path, volume: _Volume) -> float:
        """Max of the padded/cropped volume over the kept slices, once per file per process."""
        files = self._files()
        if path not in files.max:
            try:
                if path.name.lower().endswith(".gz"):
                    data = self._decoded(path)
                elif volume.fmt == "nifti":
                    data = np.asarray(self._open(path).dataobj, dtype=np.float32)
                    data = np.moveaxis(data, -1, 0)
                else:
                    data = self._open(path)[volume.key][()]
            except _READ_ERRORS as err:
                raise _unreadable(path, None, err) from None
            kept = _kept_slices(volume.num_slices, self.slice_range)
            data = data[kept.start:kept.stop:kept.step]
            finite = np.isfinite(data).all(axis=(1, 2))
            if not finite.all():
                first = int(np.flatnonzero(~finite)[0])
                raise _non_finite(path, kept[first], volume.key or "image")
            files.max[path] = float(center_fit(np.abs(data), self.resolution).max())
        return files.max[path]


def _build_index(
    files: Sequence[Path], fmt: str, challenge: str, slice_range: tuple[int, int] | None
) -> tuple[dict[Path, _Volume], list[tuple[Path, int]]]:
    """Index every file; one ``DataError`` naming the unusable files (at most 3 in full) if any."""
    volumes: dict[Path, _Volume] = {}
    examples: list[tuple[Path, int]] = []
    problems = []
    first_coils: tuple[Path, int] | None = None  # batches stack slices: one coil count per dataset
    for path in map(Path, files):
        try:
            volume = _index_file(path, fmt, challenge)
        except DataError as err:
            problems.append(str(err))
            continue
        if volume.fmt == "fastmri_h5" and challenge == "multicoil":
            if first_coils is None:
                first_coils = (path, volume.coils)
            elif volume.coils != first_coils[1]:
                problems.append(f"{path} has {volume.coils} coils but {first_coils[0].name} has "
                                f"{first_coils[1]}: a multicoil site needs one coil count; move "
                                "the volumes with other coil counts to a site of their own")
                continue
        kept = _kept_slices(volume.num_slices, slice_range)
        if volume.num_slices == 0:
            problems.append(f"{path} holds no slices: remove it")
            continue
        if not kept:
            problems.append(f"{path} has {volume.num_slices} slices and slice_range {slice_range} "
                            "keeps none: change the site's slice_range or remove the file")
            continue
        volumes[path] = volume
        examples.extend((path, s) for s in kept)
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DataError(f"{len(problems)} of {len(files)} volume files are unusable: "
                        + "; ".join(problems[:3]) + more)
    return volumes, examples


def _kept_slices(num_slices: int, slice_range: tuple[int, int] | None) -> range:
    """Indices of the slices a volume of ``num_slices`` keeps under ``slice_range``."""
    return range(num_slices)[slice(*slice_range)] if slice_range else range(num_slices)


def _non_finite(path: Path, slice_num: int, key: str) -> DataError:
    return DataError(f"{path} slice {slice_num}: '{key}' holds NaN or Inf values; fix the file or "
                     "remove it from the site's folder")


def _check_finite(path: Path, slice_num: int, key: str, array: np.ndarray) -> None:
    if not np.isfinite(array).all():
        raise _non_finite(path, slice_num, key)


def _unreadable(path: Path, slice_num: int | None, err: Exception) -> DataError:
    where = f"slice {slice_num} of {path}" if slice_num is not None else str(path)
    return DataError(f"cannot read {where} ({err}); the file is truncated or corrupt: re-copy or "
                     "remove it")
