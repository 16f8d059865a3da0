"""Per-volume synthesis metrics: PSNR and SSIM of a synthesised against the real target volume,
over the whole image and inside the head.

Both volumes are scaled by the real target's range, (v - min) / (max - min), so the target spans
[0, 1], and scored with data range 1 (pFLSynth scores [0, 1] images with data range 1, whole image,
background included; the head-only values leave out the background that every method, the
identity floor included, gets right for free). SSIM is skimage's 7 x 7 uniform-window SSIM per
slice (as `utils.metrics.ssim`); inside the head it is the mean of the SSIM map over head pixels.
"""
from __future__ import annotations

import numpy as np

from utils.metrics import head_mask, ssim_maps


def unit_range(volume: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``volume`` (S, H, W) scaled by ``reference``'s range: reference min -> 0, max -> 1."""
    lo, hi = float(reference.min()), float(reference.max())
    return ((volume - lo) / (hi - lo if hi > lo else 1.0)).astype(np.float64)


def synthesis_metrics(target: np.ndarray, synthesised: np.ndarray) -> dict[str, float]:
    """``psnr``, ``ssim`` (whole image) and ``psnr_head``, ``ssim_head`` (inside `head_mask`) of one
    volume pair (S, H, W) on any common intensity scale."""
    if target.ndim != 3 or synthesised.shape != target.shape:
        raise ValueError(f"expected two volumes (S, H, W) of one shape, got {target.shape} and {synthesised.shape}")
    gt, pred = unit_range(target, target), unit_range(synthesised, target)
    mask = head_mask(gt)
    means, maps = ssim_maps(gt, pred, 1.0)
    squared_error = (gt - pred) ** 2
    return {
        "psnr": _psnr(squared_error),
        "ssim": float(np.mean(means)),
        "psnr_head": _psnr(squared_error[mask]) if mask.any() else float("nan"),
        "ssim_head": float(maps[mask].mean()) if mask.any() else float("nan"),
    }


def _psnr(squared_error: np.ndarray) -> float:
    """PSNR in dB at data range 1 (skimage's value) from squared errors; inf when they are all 0."""
    mse = float(squared_error.mean())
    return float(10 * np.log10(1.0 / mse)) if mse > 0 else float("inf")
