"""Per-volume reconstruction metrics (the values of ``fastmri.evaluate``) and their summary.

Every metric takes a ground-truth and a predicted volume, numpy ``(S, H, W)`` magnitude images,
and is computed over the whole volume; ``maxval`` (the data range) defaults to the ground truth's
maximum.
"""

from collections.abc import Callable

import numpy as np
from runstats import Statistics
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


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


METRIC_FUNCS: dict[str, Callable[..., float]] = {"nmse": nmse, "psnr": psnr, "ssim": ssim}


def volume_metrics(
    gt: np.ndarray, pred: np.ndarray, maxval: float | None = None
) -> dict[str, float]:
    """All of ``METRIC_FUNCS`` for one volume pair ``(S, H, W)``: ``{"nmse": ..., "psnr": ...,
    "ssim": ...}``; ``maxval`` goes to the metrics that take a data range."""
    return {
        "nmse": nmse(gt, pred),
        "psnr": psnr(gt, pred, maxval),
        "ssim": ssim(gt, pred, maxval),
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
