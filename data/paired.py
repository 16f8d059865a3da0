"""Paired-contrast slices for synthesis: a source-contrast slice and the same subject's target-contrast slice.

A site keeps each contrast in its own folder, ``<root>/<contrast>/<split>/<subject>.*`` (the layout
of IXI and BraTS exports). Files are paired by subject: the file name without its suffix and
without a trailing contrast tag (``IXI002-Guys-0828-T1.nii.gz``, ``BraTS20_001_t1.nii.gz`` and
``synthI_train_000_T1.nii.gz`` name subjects ``IXI002-Guys-0828``, ``BraTS20_001`` and
``synthI_train_000``; the tag is matched case-blind after ``_``, ``-`` or ``.``). Subjects that
have only one of the two contrasts are skipped and named in `Pairing.unpaired` for the log. The
contrasts of a subject must be registered: the same number of slices of the same size.

Slices are read by `data.mri_data.SliceDataset` (NIfTI, HDF5 image stacks, and fastMRI HDF5
through its ``reconstruction_esc`` / ``reconstruction_rss`` target image), padded or cropped to
``resolution`` as reconstruction does.

Intensities follow pFLSynth: its preprocessing saves every slice as an 8-bit image scaled by that
slice's own minimum and maximum, and its loader maps [0, 1] to [-1, 1]. So each slice of each
contrast is min-max scaled to [-1, 1] here (without the 8-bit rounding); its (min, max) travels
with the sample, so that a synthesised slice can be put back on the target's intensity scale and
scored against the real target in [0, 1] by that target's range.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch.utils.data

from data.mri_data import H5_SUFFIXES, NIFTI_SUFFIXES, SliceDataset, center_fit
from data.sites import Site
from utils.errors import DataError, UserError


class SubjectPair(NamedTuple):
    """One subject's source-contrast and target-contrast volume files."""

    subject: str
    source: Path
    target: Path


class Pairing(NamedTuple):
    """The subjects of one site and split that have both contrasts, and those skipped."""

    pairs: list[SubjectPair]
    unpaired: list[str]  # subjects with only one of the two contrasts, sorted


class PairedSlice(NamedTuple):
    """One slice position of one subject in both contrasts, each min-max scaled to [-1, 1]."""

    source: np.ndarray  # (H, W) float32
    target: np.ndarray  # (H, W) float32
    source_range: tuple[float, float]  # (min, max) of the source slice, mapped to -1 and 1
    target_range: tuple[float, float]  # (min, max) of the target slice, mapped to -1 and 1
    subject: str
    slice_num: int


def subject_name(path: Path, contrast: str) -> str:
    """The subject a volume file belongs to: its name without the volume suffix and without a
    trailing ``<sep><contrast>`` tag (sep one of ``_ - .``, contrast matched case-blind)."""
    name = path.name
    for suffix in NIFTI_SUFFIXES[::-1] + H5_SUFFIXES:  # ".nii.gz" before ".nii"
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(rf"[_.-]{re.escape(contrast)}$", "", name, flags=re.IGNORECASE) or name


def site_contrasts(site: Site) -> list[str]:
    """The contrast folders of a site (sorted); DataError when its root is missing."""
    if not site.root.is_dir():
        raise DataError(f"site '{site.name}': data folder {site.root} does not exist: put the site's "
                        "data there, or set its root with --data_root or --sites")
    return sorted(p.name for p in site.root.iterdir() if p.is_dir() and not p.name.startswith("."))


def pair_subjects(site: Site, source: str, target: str, split: str) -> Pairing:
    """Pair the ``split`` volumes of ``source`` and ``target`` contrast at ``site`` by subject.

    Raises ``UserError`` when source equals target or the site lacks one of the contrasts (naming
    the ones it has), ``DataError`` when no subject has both or one folder names a subject twice.
    """
    task = f"synthesis {source} -> {target}"
    if source == target:
        raise UserError(f"{task}: the source and target contrast are the same; synthesis translates "
                        "one contrast into another: pick two different ones")
    have = site_contrasts(site)
    for contrast in (source, target):
        if contrast not in have:
            raise UserError(f"{task}: site '{site.name}' has no {contrast} folder in {site.root} (its "
                            f"contrasts: {', '.join(have) or 'none'}): pick contrasts it has, or another site")
    by_subject = [_by_subject(site, contrast, split) for contrast in (source, target)]
    common = sorted(set(by_subject[0]) & set(by_subject[1]))
    unpaired = sorted(set(by_subject[0]) ^ set(by_subject[1]))
    if not common:
        folders = " and ".join(str(site.root / c / split) for c in (source, target))
        raise DataError(f"site '{site.name}': no subject has both {source} and {target} in {folders} "
                        f"({len(by_subject[0])} and {len(by_subject[1])} subjects; files are paired by "
                        f"name without the contrast tag, e.g. {next(iter(by_subject[0]))!r}): rename "
                        "the files to match or pick another site")
    pairs = [SubjectPair(s, by_subject[0][s], by_subject[1][s]) for s in common]
    return Pairing(pairs, unpaired)


def _by_subject(site: Site, contrast: str, split: str) -> dict[str, Path]:
    files = site.files(contrast, split)
    names = [subject_name(f, contrast) for f in files]
    twice = sorted(n for n, k in Counter(names).items() if k > 1)
    if twice:
        clash = [str(f) for f, n in zip(files, names) if n == twice[0]]
        raise DataError(f"site '{site.name}': files {', '.join(clash)} belong to the same subject "
                        f"'{twice[0]}': keep one volume per subject and contrast")
    return dict(zip(names, files))


def _slice_image(kspace: Any, mask: Any, target: np.ndarray | None, attrs: dict, fname: str,
                 slice_num: int, seed: Any) -> np.ndarray | None:
    """`SliceDataset` transform that keeps only the magnitude image of the slice."""
    return target


def _scale(image: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """(H, W) slice -> min-max scaled to [-1, 1] float32, and its (min, max); a constant slice -> -1."""
    lo, hi = float(image.min()), float(image.max())
    span = hi - lo if hi > lo else 1.0
    return ((image - lo) * (2.0 / span) - 1.0).astype(np.float32), (lo, hi)


class PairedSliceDataset(torch.utils.data.Dataset):
    """Slices of subject pairs: ``dataset[i]`` is ``transform(PairedSlice)`` (the slice itself
    without a transform), in subject order, then slice order."""

    def __init__(self, site: Site, pairs: Sequence[SubjectPair], *, resolution: int | None = None,
                 transform: Callable[[PairedSlice], Any] | None = None) -> None:
        """Index the pairs' slices; ``DataError`` for unusable files or unregistered pairs.

        Args:
            site: the site the files belong to (format, challenge, slice_range).
            pairs: from `pair_subjects` (or a share of them for one client).
            resolution: images are centre-padded/cropped to resolution x resolution (None: native).
        """
        if not pairs:
            raise ValueError("PairedSliceDataset needs at least one subject pair")
        self.pairs = list(pairs)
        self.resolution = resolution
        self.transform = transform
        common = dict(fmt=site.format, challenge=site.challenge, resolution=resolution,
                      slice_range=site.slice_range)
        self._source = SliceDataset([p.source for p in self.pairs], _slice_image, **common)
        self._target = SliceDataset([p.target for p in self.pairs], _slice_image, **common)
        counts = [Counter(path for path, _ in ds.examples) for ds in (self._source, self._target)]
        for pair in self.pairs:
            if counts[0][pair.source] != counts[1][pair.target]:
                raise DataError(f"{pair.source} has {counts[0][pair.source]} slices but {pair.target} "
                                f"has {counts[1][pair.target]}: the contrasts of subject '{pair.subject}' "
                                "must be registered (same slices); re-register or remove the pair")
        self._subjects = {p.source: p.subject for p in self.pairs}

    def __len__(self) -> int:
        return len(self._source)

    def _image(self, dataset: SliceDataset, i: int) -> np.ndarray:
        path, slice_num = dataset.examples[i]
        image = dataset[i]
        if image is None:
            raise DataError(f"{path} has no target image (reconstruction_esc / reconstruction_rss): "
                            "synthesis reads a fastMRI file's image; add it or remove the file")
        return center_fit(image, self.resolution)

    def __getitem__(self, i: int) -> Any:
        source, target = self._image(self._source, i), self._image(self._target, i)
        path, slice_num = self._source.examples[i]
        if source.shape != target.shape:
            raise DataError(f"slice {slice_num}: {path} is {source.shape[0]}x{source.shape[1]} but "
                            f"{self._target.examples[i][0]} is {target.shape[0]}x{target.shape[1]}: register "
                            "the contrasts to one grid, or set a common resolution")
        (source, source_range), (target, target_range) = _scale(source), _scale(target)
        sample = PairedSlice(source, target, source_range, target_range, self._subjects[path], slice_num)
        return sample if self.transform is None else self.transform(sample)
