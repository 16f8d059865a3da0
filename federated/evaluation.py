"""Per-volume evaluation with fastMRI semantics: a model's predictions of every slice of a volume
are stacked, put back on the original intensity scale by the task, and scored as one volume."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from federated.client import make_loader
from federated.tasks.base import Task
from utils.metrics import summarize

Predict = Callable[[tuple[torch.Tensor, ...]], torch.Tensor]  # the task's model inputs -> output


@dataclass
class Volume:
    """One predicted volume on the original scale; arrays are (S, H, W) float32.

    `target` is None for files without a reference (challenge/test files); `baseline` is the task's
    model-free reference (the zero-filled reconstruction).
    """
    fname: str
    slice_nums: list[int]
    reconstruction: np.ndarray
    target: np.ndarray | None
    baseline: np.ndarray


@torch.no_grad()
def reconstruct_volumes(task: Task, dataset: Dataset, predict: Predict | None, batch_size: int,
                        num_workers: int, device: torch.device,
                        loss_sums: list[float] | None = None) -> Iterator[Volume]:
    """Yield the volumes of `dataset` one at a time (memory holds one volume, not the split).

    `predict=None` predicts nothing (baseline only). When `loss_sums` is a list, its two entries
    accumulate the sum of per-slice training losses and the number of slices.
    """
    loader = make_loader(dataset, batch_size, False, None, num_workers, device)
    fname, parts = None, []
    for samples in loader:
        output = None
        if predict is not None:
            output = predict(task.to_device(samples, device).inputs).float().cpu()
            if loss_sums is not None and task.has_target(samples):
                loss_sums[0] += task.eval_loss_sum(samples, output)
                loss_sums[1] += output.shape[0]
        vol = task.volume_parts(samples, output)
        names, slice_nums = task.names(samples)
        target = vol.target if vol.target is not None else [None] * len(names)
        for i, name in enumerate(names):
            if name != fname and parts:
                yield _stack(fname, parts)
                parts = []
            fname = name
            parts.append((slice_nums[i], vol.reconstruction[i], target[i], vol.baseline[i]))
    if parts:
        yield _stack(fname, parts)


def _stack(fname: str, parts: list) -> Volume:
    parts.sort(key=lambda p: p[0])
    target = None if parts[0][2] is None else np.stack([p[2] for p in parts])
    return Volume(fname, [p[0] for p in parts], np.stack([p[1] for p in parts]), target,
                  np.stack([p[3] for p in parts]))


def evaluate(task: Task, dataset: Dataset, predict: Predict | None, batch_size: int, num_workers: int,
             device: torch.device) -> dict[str, dict[str, float]]:
    """Mean and std over volumes of the metrics of `predict` ("model") and of the task's baseline
    ("baseline"); "model" also carries the mean per-slice training loss as "loss"."""
    losses = [0.0, 0]
    model_rows, baseline_rows = [], []
    for vol in reconstruct_volumes(task, dataset, predict, batch_size, num_workers, device, losses):
        baseline_rows.append(task.volume_metrics(vol.target, vol.baseline))
        if predict is not None:
            model_rows.append(task.volume_metrics(vol.target, vol.reconstruction))
    result = {"baseline": summarize(baseline_rows)}
    if predict is not None:
        result["model"] = {**summarize(model_rows), "loss": losses[0] / max(losses[1], 1)}
    return result
