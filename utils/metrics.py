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


def ssim_maps(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> tuple[list[float], np.ndarray]:
    """skimage's 2-D SSIM (7 x 7 uniform window) of every slice of volumes ``(S, H, W)``, data range
    ``maxval`` shared by all slices: the S per-slice means (fastMRI's values) and the ``(S, H, W)`` maps."""
    _check_volumes(gt, pred)
    if maxval is None:
        maxval = gt.max()
    per_slice = [structural_similarity(g, p, data_range=maxval, full=True) for g, p in zip(gt, pred)]
    return [mean for mean, _ in per_slice], np.stack([ssim_map for _, ssim_map in per_slice])


def ssim(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> float:
    """Mean over slices of the 2-D SSIM (7 x 7 uniform window) of volumes ``(S, H, W)``, data range
    ``maxval`` shared by all slices."""
    means, _ = ssim_maps(gt, pred, maxval)
    return _mean_ssim(means)


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
    ``gt``; NaN when the volume has no head pixel (then no SSIM is computed)."""
    _check_volumes(gt, pred)
    mask = head_mask(gt)
    if not mask.any():
        return float("nan")
    _, maps = ssim_maps(gt, pred, maxval)
    return float(maps[mask].mean())


def _mean_ssim(means: list[float]) -> float:
    return float(sum(means) / len(means))


def _head_ssim(maps: np.ndarray, mask: np.ndarray) -> float:
    return float(maps[mask].mean()) if mask.any() else float("nan")


METRIC_FUNCS: dict[str, Callable[..., float]] = {"nmse": nmse, "psnr": psnr, "ssim": ssim, "ssim_head": ssim_head}


def volume_metrics(
    gt: np.ndarray, pred: np.ndarray, maxval: float | None = None
) -> dict[str, float]:
    """All of ``METRIC_FUNCS`` for one volume pair ``(S, H, W)``: ``{"nmse": ..., "psnr": ...,
    "ssim": ..., "ssim_head": ...}``; ``maxval`` goes to the metrics that take a data range."""
    means, maps = ssim_maps(gt, pred, maxval)  # once for both SSIMs: the slowest metric by far
    return {
        "nmse": nmse(gt, pred),
        "psnr": psnr(gt, pred, maxval),
        "ssim": _mean_ssim(means),
        "ssim_head": _head_ssim(maps, head_mask(gt)),
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
