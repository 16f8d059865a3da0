"""How far apart two sites' latents are: the squared maximum mean discrepancy (MMD^2) between
pooled bottleneck latents, with a Gaussian kernel whose width is the median pairwise distance, so
the figure does not depend on the latents' overall scale."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from federated.client import make_loader
from federated.tasks.base import Task
from models.discriminator import pool_latent


@torch.no_grad()
def pooled_latents(task: Task, model: nn.Module, dataset: Dataset, device: torch.device, max_slices: int,
                   batch_size: int = 8) -> torch.Tensor:
    """(N, 4C) pooled latents of the first `max_slices` slices of `dataset` (encoder only)."""
    model.eval()
    vectors, seen = [], 0
    for samples in make_loader(dataset, batch_size, False, None, 0, device):
        vectors.append(pool_latent(task.encode(model, task.to_device(samples, device).inputs)).float())
        seen += len(samples.fname)
        if seen >= max_slices:
            break
    return torch.cat(vectors)[:max_slices]


def mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Biased MMD^2 between samples x (N, D) and y (M, D); 0 when the two samples coincide."""
    z = torch.cat([x, y]).double()
    d2 = torch.cdist(z, z).square()
    width = d2[d2 > 0].median() if (d2 > 0).any() else torch.tensor(1.0, dtype=z.dtype)
    k = torch.exp(-d2 / width)
    n = len(x)
    return float(k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean())
