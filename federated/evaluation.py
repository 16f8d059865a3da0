"""Per-volume evaluation with fastMRI semantics: a model's reconstructions of every slice of a volume
are stacked, put back on the original intensity scale, and scored as one volume."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from federated.client import make_loader
from utils.metrics import summarize, volume_metrics

Predict = Callable[[torch.Tensor], torch.Tensor]  # (B, 1, H, W) normalised input -> (B, 1, H, W)


@dataclass
class Volume:
    """One reconstructed volume on the original scale; arrays are (S, H, W) float32.

    `target` is None for files without a reference (challenge/test files).
    """
    fname: str
    slice_nums: list[int]
    reconstruction: np.ndarray
    target: np.ndarray | None
    zero_filled: np.ndarray


@torch.no_grad()
def reconstruct_volumes(dataset: Dataset, predict: Predict | None, batch_size: int, num_workers: int,
                        device: torch.device, l1_sums: list[float] | None = None) -> Iterator[Volume]:
    """Yield the volumes of `dataset` one at a time (memory holds one volume, not the split).

    `predict=None` reconstructs nothing (zero-filled only). When `l1_sums` is a list, its two entries
    accumulate the sum of per-slice L1 losses in normalised units and the number of slices.
    """
    loader = make_loader(dataset, batch_size, False, None, num_workers, device)
    fname, parts = None, []
    for batch in loader:
        has_target = batch.target.dim() == 3  # files without a reference give a (B, 1) placeholder
        mean = batch.mean[:, None, None]
        std = batch.std[:, None, None]
        if predict is not None:
            out = predict(batch.image.unsqueeze(1).to(device, non_blocking=True)).squeeze(1).float().cpu()
            if l1_sums is not None and has_target:
                l1_sums[0] += (out - batch.target).abs().mean(dim=(1, 2)).sum().item()
                l1_sums[1] += out.shape[0]
            recon = (out * std + mean).numpy()
        else:
            recon = np.zeros(batch.image.shape, dtype=np.float32)
        target = (batch.target * std + mean).numpy() if has_target else [None] * len(batch.fname)
        zero_filled = (batch.image * std + mean).numpy()
        for i, name in enumerate(batch.fname):
            if name != fname and parts:
                yield _stack(fname, parts)
                parts = []
            fname = name
            parts.append((int(batch.slice_num[i]), recon[i], target[i], zero_filled[i]))
    if parts:
        yield _stack(fname, parts)


def _stack(fname: str, parts: list) -> Volume:
    parts.sort(key=lambda p: p[0])
    target = None if parts[0][2] is None else np.stack([p[2] for p in parts])
    return Volume(fname, [p[0] for p in parts], np.stack([p[1] for p in parts]), target,
                  np.stack([p[3] for p in parts]))


def evaluate(dataset: Dataset, predict: Predict | None, batch_size: int, num_workers: int,
             device: torch.device) -> dict[str, dict[str, float]]:
    """Mean and std over volumes of the metrics of `predict` ("model") and of the zero-filled input
    ("zero_filled"); "model" also carries the mean L1 loss in normalised units as "loss"."""
    l1 = [0.0, 0]
    model_rows, zf_rows = [], []
    for vol in reconstruct_volumes(dataset, predict, batch_size, num_workers, device, l1):
        zf_rows.append(volume_metrics(vol.target, vol.zero_filled))
        if predict is not None:
            model_rows.append(volume_metrics(vol.target, vol.reconstruction))
    result = {"zero_filled": summarize(zf_rows)}
    if predict is not None:
        result["model"] = {**summarize(model_rows), "loss": l1[0] / max(l1[1], 1)}
    return result
