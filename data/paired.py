"""Registered multi-contrast slices for synthesis: the same subject's slice in every contrast a site's
translations need (T1 and T2 for T1 -> T2; T1, T2 and PD for T1 -> T2 plus T2 -> PD).

A site keeps each contrast in its own folder, ``<root>/<contrast>/<split>/<subject>.*`` (the layout
of IXI and BraTS exports). Files are matched by subject: the file name without its suffix and
without a trailing contrast tag (``IXI002-Guys-0828-T1.nii.gz``, ``BraTS20_001_t1.nii.gz`` and
``synthI_train_000_T1.nii.gz`` name subjects ``IXI002-Guys-0828``, ``BraTS20_001`` and
``synthI_train_000``; the tag is matched case-blind after ``_``, ``-`` or ``.``). Subjects that
lack one of the contrasts are skipped and named in `Matching.skipped` for the log. The contrasts
of a subject must be registered: the same number of slices, of the same size.

Slices are read by `data.mri_data.SliceDataset` (NIfTI, HDF5 image stacks, and fastMRI HDF5
through its ``reconstruction_esc`` / ``reconstruction_rss`` target image), padded or cropped to
``resolution`` as reconstruction does.

Intensities follow pFLSynth: its preprocessing saves every slice as an 8-bit image scaled by that
slice's own minimum and maximum, and its loader maps [0, 1] to [-1, 1]. So each slice of each
contrast is min-max scaled to [-1, 1] here (without the 8-bit rounding); its (min, max) travels
with the sample, so that a synthesised slice can be put back on the target's intensity scale and
scored against the real target by that target's range.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch.utils.data

from data.mri_data import H5_SUFFIXES, NIFTI_SUFFIXES, SliceDataset, center_fit
from data.sites import Site
from data.translation import Translation
from utils.errors import DataError, UserError

class Subject(NamedTuple):
    """One subject's volume file in each contrast."""

    name: str
    files: dict[str, Path]  # contrast -> volume file


class Matching(NamedTuple):
    """The subjects of one site and split that have every contrast asked for, and those skipped."""

    subjects: list[Subject]
    skipped: list[str]  # subjects that lack at least one of the contrasts, sorted


class ContrastSlices(NamedTuple):
    """One slice position of one subject in several contrasts, each min-max scaled to [-1, 1]."""

    images: dict[str, np.ndarray]  # contrast -> (H, W) float32
    ranges: dict[str, tuple[float, float]]  # contrast -> (min, max) of its slice, mapped to -1 and 1
    subject: str
    slice_num: int
    seed: tuple[int, ...] | None  # after set_epoch(e): (e, slice_num, *map(ord, subject)), else None


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


def check_contrasts(site: Site, translations: Sequence[Translation]) -> None:
    """``UserError`` when a translation names a contrast the site has no folder for, listing the ones it has."""
    have = site_contrasts(site)
    for task in translations:
        for contrast in task:
            if contrast not in have:
                raise UserError(f"synthesis {task}: site '{site.name}' has no {contrast} folder in {site.root} "
                                f"(its contrasts: {', '.join(have) or 'none'}): pick contrasts it has, or "
                                "another site")


def match_subjects(site: Site, contrasts: Sequence[str], split: str) -> Matching:
    """The subjects whose ``split`` volumes exist in every one of ``contrasts`` at ``site``.

    Call `check_contrasts` first for a line that names the translation. Raises ``DataError`` when
    no subject has all the contrasts, or a folder names a subject twice.
    """
    if len(set(contrasts)) != len(contrasts) or len(contrasts) < 2:
        raise ValueError(f"match_subjects needs two or more different contrasts, got {list(contrasts)}")
    by_contrast = {c: _by_subject(site, c, split) for c in contrasts}
    names = [set(files) for files in by_contrast.values()]
    common = sorted(set.intersection(*names))
    skipped = sorted(set.union(*names) - set(common))
    if not common:
        counts = ", ".join(f"{len(by_contrast[c])} {c}" for c in contrasts)
        example = next(iter(by_contrast[contrasts[0]]))
        raise DataError(f"site '{site.name}': no subject has all of {', '.join(contrasts)} in "
                        f"{site.root}/<contrast>/{split} ({counts} subjects; files are matched by name "
                        f"without the contrast tag, e.g. {example!r}): rename the files to match, or "
                        "pick another site")
    return Matching([Subject(s, {c: by_contrast[c][s] for c in contrasts}) for s in common], skipped)


def _by_subject(site: Site, contrast: str, split: str) -> dict[str, Path]:
    files = dataclasses.replace(site, sequence=None).files(contrast, split)  # not the site's own sequence
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


class ContrastSliceDataset(torch.utils.data.Dataset):
    """Registered slices of subjects in several contrasts: ``dataset[i]`` is
    ``transform(ContrastSlices)`` (the slices themselves without a transform), in subject order,
    then slice order."""

    def __init__(self, site: Site, subjects: Sequence[Subject], contrasts: Sequence[str], *,
                 resolution: int | None = None, transform: Callable[[ContrastSlices], Any] | None = None) -> None:
        """Index the subjects' slices; ``DataError`` for unusable files or unregistered contrasts.

        Args:
            site: the site the files belong to (format, challenge, slice_range).
            subjects: from `match_subjects` (or one client's share of them), each with every contrast.
            contrasts: the contrasts to read.
            resolution: images are centre-padded/cropped to resolution x resolution (None: native).
        """
        if not subjects:
            raise ValueError("ContrastSliceDataset needs at least one subject")
        self.subjects = list(subjects)
        self.contrasts = tuple(contrasts)
        self.resolution = resolution
        self.transform = transform
        self.epoch_seed: int | None = None
        common = dict(fmt=site.format, challenge=site.challenge, resolution=resolution,
                      slice_range=site.slice_range)
        self._datasets = {c: SliceDataset([s.files[c] for s in self.subjects], _slice_image, **common)
                          for c in self.contrasts}
        counts = {c: Counter(path for path, _ in ds.examples) for c, ds in self._datasets.items()}
        first = self.contrasts[0]
        for subject in self.subjects:
            for c in self.contrasts[1:]:
                a, b = subject.files[first], subject.files[c]
                if counts[first][a] != counts[c][b]:
                    raise DataError(f"{a} has {counts[first][a]} slices but {b} has {counts[c][b]}: the contrasts "
                                    f"of subject '{subject.name}' must be registered (same slices); re-register "
                                    "or remove the subject")
        self._names = {s.files[first]: s.name for s in self.subjects}

    def __len__(self) -> int:
        return len(self._datasets[self.contrasts[0]])

    def set_epoch(self, epoch_seed: int | None) -> None:
        """Give every sample the seed ``(epoch_seed, slice_num, *map(ord, subject))`` for what its
        transform draws (a variable-task site's task), or None: the same whatever the workers."""
        self.epoch_seed = epoch_seed

    def set_time(self, t: int, total: int) -> None:
        """The augmentation schedule's time (`SliceDataset.set_time`); synthesis refuses --aug_on, so
        there is nothing to schedule."""

    def _image(self, contrast: str, i: int) -> np.ndarray:
        dataset = self._datasets[contrast]
        image = dataset[i]
        if image is None:
            raise DataError(f"{dataset.examples[i][0]} has no target image (reconstruction_esc / "
                            "reconstruction_rss): synthesis reads a fastMRI file's image; add it or remove the file")
        return center_fit(image, self.resolution)

    def __getitem__(self, i: int) -> Any:
        raw = {c: self._image(c, i) for c in self.contrasts}
        path, slice_num = self._datasets[self.contrasts[0]].examples[i]
        shapes = {c: image.shape for c, image in raw.items()}
        if len(set(shapes.values())) > 1:
            files = ", ".join(f"{self._datasets[c].examples[i][0]} {s[0]}x{s[1]}" for c, s in shapes.items())
            raise DataError(f"slice {slice_num} differs in size across contrasts ({files}): register the "
                            "contrasts to one grid, or set a common resolution")
        scaled = {c: _scale(image) for c, image in raw.items()}
        subject = self._names[path]
        seed = None if self.epoch_seed is None else (self.epoch_seed, slice_num, *map(ord, subject))
        sample = ContrastSlices({c: s[0] for c, s in scaled.items()}, {c: s[1] for c, s in scaled.items()},
                                subject, slice_num, seed)
        return sample if self.transform is None else self.transform(sample)
