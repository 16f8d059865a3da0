"""Per-volume evaluation with fastMRI semantics: a model's predictions of every slice of a volume
are stacked, put back on the original intensity scale by the task, and scored as one volume."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from federated import distributed
from federated.client import make_loader
from federated.tasks.base import Task
from utils.metrics import summarize

Predict = Callable[[tuple[torch.Tensor, ...]], torch.Tensor]  # the task's model inputs -> output


@dataclass
class Volume:
    """One predicted volume on the original scale; arrays are (S, H, W) float32.

    `target` is None for files without a reference (challenge/test files); `baseline` is the task's
    model-free reference (the zero-filled reconstruction). `part` names what of the site it was
    evaluated on, where a task evaluates a site in parts (synthesis: each translation; else "").
    """
    fname: str
    slice_nums: list[int]
    reconstruction: np.ndarray
    target: np.ndarray | None
    baseline: np.ndarray
    part: str = ""


@torch.no_grad()
def reconstruct_volumes(task: Task, dataset: Dataset, predict: Predict | None, batch_size: int,
                        num_workers: int, device: torch.device,
                        loss_sums: list[float] | None = None) -> Iterator[Volume]:
    """Yield the volumes of `dataset` one at a time (memory holds one volume, not the split).

    `predict=None` predicts nothing (baseline only). When `loss_sums` is a list, its two entries
    accumulate the sum of per-slice training losses and the number of slices.
    """
    loader = make_loader(dataset, batch_size, False, None, num_workers, device)
    key, parts = None, []
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
        for i, name in enumerate(zip(task.parts(samples), names)):
            if name != key and parts:
                yield _stack(key, parts)
                parts = []
            key = name
            parts.append((slice_nums[i], vol.reconstruction[i], target[i], vol.baseline[i]))
    if parts:
        yield _stack(key, parts)


def _stack(key: tuple[str, str], parts: list) -> Volume:
    parts.sort(key=lambda p: p[0])
    target = None if parts[0][2] is None else np.stack([p[2] for p in parts])
    return Volume(key[1], [p[0] for p in parts], np.stack([p[1] for p in parts]), target,
                  np.stack([p[3] for p in parts]), key[0])


def evaluate(task: Task, dataset: Dataset, predict: Predict | None, batch_size: int, num_workers: int,
             device: torch.device) -> dict[str, dict[str, float]]:
    """Mean and std over volumes of the metrics of `predict` ("model") and of the task's baseline
    ("baseline"); "model" also carries the mean per-slice training loss as "loss"."""
    parts = evaluate_parts(task, dataset, predict, batch_size, num_workers, device, merged=True)
    return parts[""]


def evaluate_parts(task: Task, dataset: Dataset, predict: Predict | None, batch_size: int, num_workers: int,
                   device: torch.device, merged: bool = False) -> dict[str, dict[str, dict[str, float]]]:
    """`evaluate` for each part of the site that the task scores separately (`Task.parts`:
    synthesis' translations), in order of appearance: part -> {"baseline": ..., "model": ...}; one
    part "" for a task that scores a site as one, or with `merged`. A part's "loss" is the mean
    over all the dataset's slices (batches may hold slices of two parts)."""
    group = distributed.current()
    shard, ordinals = distributed.shard_volumes(group, dataset)
    losses = [0.0, 0]
    records, error = [], None  # (volume ordinal, part, baseline metrics, model metrics or None)
    try:
        for k, vol in enumerate(reconstruct_volumes(task, shard, predict, batch_size, num_workers, device, losses)):
            records.append((ordinals[k] if group.active else k, vol.part,
                            task.volume_metrics(vol.target, vol.baseline),
                            task.volume_metrics(vol.target, vol.reconstruction) if predict is not None else None))
    except Exception as e:
        if not group.active:
            raise
        error = e
    if group.active:
        # Every rank's volumes, in the one-process order, so every rank summarises the same lists.
        gathered = group.gather((records, losses, distributed.describe(error)))
        group.raise_failures([g[2] for g in gathered], error)
        records = sorted((r for g in gathered for r in g[0]), key=lambda r: r[0])
        losses = [sum(g[1][0] for g in gathered), sum(g[1][1] for g in gathered)]
    rows: dict[str, tuple[list, list]] = {"": ([], [])} if merged else {}
    for _, part, baseline_metrics, model_metrics in records:
        baseline, model = rows.setdefault("" if merged else part, ([], []))
        baseline.append(baseline_metrics)
        if model_metrics is not None:
            model.append(model_metrics)
    results = {}
    for part, (baseline, model) in rows.items():
        results[part] = {"baseline": summarize(baseline)}
        if predict is not None:
            results[part]["model"] = {**summarize(model), "loss": losses[0] / max(losses[1], 1)}
    return results
