"""Per-volume reconstruction metrics (the values of ``fastmri.evaluate``, and SSIM inside the head)
and their summary.

Every metric takes a ground-truth and a predicted volume, numpy ``(S, H, W)`` magnitude images;
``maxval`` (the data range) defaults to the ground truth's maximum. NMSE, PSNR and SSIM are
fastMRI's, over the whole volume. ``ssim_head`` is the same SSIM map averaged over the head only
(`head_mask`), so that a table can tell a model that reconstructs the anatomy better from one that
draws the background differently: the background (half the image or more) counts fully in ``ssim``.
"""

from collections.abc import Callable

import numpy as np
from runstats import Statistics
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

# Fraction of the ground truth's range above which a pixel counts as head before holes are filled.
HEAD_THRESHOLD = 0.1


def nmse(gt: np.ndarray, pred: np.ndarray) -> float:
    """Normalised mean squared error ``||gt - pred||^2 / ||gt||^2`` of volumes ``(S, H, W)``."""
    _check_volumes(gt, pred)
    return float(np.linalg.norm(gt - pred) ** 2 / np.linalg.norm(gt) ** 2)


def psnr(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB of volumes ``(S, H, W)``, data range ``maxval``."""
    _check_volumes(gt, pred)
    if maxval is None:
        maxval = gt.max()
    return float(peak_signal_noise_ratio(gt, pred, data_range=maxval))


def ssim(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> float:
    """Mean over slices of the 2-D SSIM (7 x 7 uniform window) of volumes ``(S, H, W)``, data range
    ``maxval`` shared by all slices."""
    _check_volumes(gt, pred)
    if maxval is None:
        maxval = gt.max()
    total = 0.0
    for gt_slice, pred_slice in zip(gt, pred):
        total += structural_similarity(gt_slice, pred_slice, data_range=maxval)
    return float(total / gt.shape[0])


def head_mask(gt: np.ndarray, threshold: float = HEAD_THRESHOLD) -> np.ndarray:
    """Boolean ``(S, H, W)`` head mask of a volume: per slice, the largest connected region above
    ``threshold`` of the volume's range (above its minimum), with its holes (ventricles, dark CSF,
    lesions) filled."""
    lo, hi = float(gt.min()), float(gt.max())
    scaled = (gt - lo) / (hi - lo if hi > lo else 1.0)
    mask = np.zeros(gt.shape, dtype=bool)
    for s, image in enumerate(scaled):
        labels, count = ndimage.label(image > threshold)
        if count == 0:
            continue
        largest = 1 + int(np.argmax(ndimage.sum_labels(np.ones_like(image), labels, range(1, count + 1))))
        mask[s] = ndimage.binary_fill_holes(labels == largest)
    return mask


def ssim_head(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> float:
    """Mean of the SSIM maps of `ssim` (same window and data range) over the `head_mask` pixels of
    ``gt``; NaN when the volume has no head pixel."""
    _check_volumes(gt, pred)
    if maxval is None:
        maxval = gt.max()
    mask = head_mask(gt)
    if not mask.any():
        return float("nan")
    maps = [structural_similarity(g, p, data_range=maxval, full=True)[1] for g, p in zip(gt, pred)]
    return float(np.stack(maps)[mask].mean())


METRIC_FUNCS: dict[str, Callable[..., float]] = {"nmse": nmse, "psnr": psnr, "ssim": ssim, "ssim_head": ssim_head}


def volume_metrics(
    gt: np.ndarray, pred: np.ndarray, maxval: float | None = None
) -> dict[str, float]:
    """All of ``METRIC_FUNCS`` for one volume pair ``(S, H, W)``: ``{"nmse": ..., "psnr": ...,
    "ssim": ..., "ssim_head": ...}``; ``maxval`` goes to the metrics that take a data range."""
    return {
        "nmse": nmse(gt, pred),
        "psnr": psnr(gt, pred, maxval),
        "ssim": ssim(gt, pred, maxval),
        "ssim_head": ssim_head(gt, pred, maxval),
    }


def summarize(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean and spread over volumes of per-volume metric rows (all with the same keys).

    Returns ``{name: mean, name + "_std": std, ..., "volumes": count}`` for every key of the rows.
    The spread is runstats' default, the *sample* standard deviation (ddof = 1, as printed by
    ``fastmri.evaluate``); it is NaN for a single volume, where it is undefined.
    """
    if not rows:
        raise ValueError("summarize needs at least one volume's metrics")
    names = list(rows[0])
    for row in rows:
        if set(row) != set(names):
            raise ValueError(
                f"metric rows disagree on their keys: {sorted(row)} vs {sorted(names)}"
            )
    summary: dict[str, float] = {}
    for name in names:
        stats = Statistics(row[name] for row in rows)
        summary[name] = stats.mean()
        summary[f"{name}_std"] = stats.stddev() if len(rows) > 1 else float("nan")
    summary["volumes"] = len(rows)
    return summary


def _check_volumes(gt: np.ndarray, pred: np.ndarray) -> None:
    if gt.ndim != 3:
        raise ValueError(f"metrics expect volumes (S, H, W); ground truth has shape {gt.shape}")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
