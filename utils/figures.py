"""Figures of reconstructions: zero-filled input, reconstruction(s), ground truth and error maps."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_recon_grid(path: Path, rows: list[tuple[str, dict[str, np.ndarray], np.ndarray]]) -> None:
    """One row per slice: each named image (H, W), then the ground truth, then |image - truth| maps.

    `rows` holds (row title, {column name: image}, ground truth). Written as PNG, or PDF by suffix.
    """
    ncols = 2 * len(rows[0][1]) + 1
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.2 * ncols, 2.4 * len(rows)), squeeze=False)
    for ax_row, (title, images, truth) in zip(axes, rows):
        vmax = float(truth.max()) or 1.0
        errors = {f"|{name} - truth|": np.abs(img - truth) for name, img in images.items()}
        emax = max(float(e.max()) for e in errors.values()) or 1.0
        panels = [(n, i, "gray", vmax) for n, i in images.items()] + [("ground truth", truth, "gray", vmax)]
        panels += [(n, e, "inferno", emax) for n, e in errors.items()]
        for ax, (name, img, cmap, top) in zip(ax_row, panels):
            ax.imshow(img, cmap=cmap, vmin=0, vmax=top)
            ax.set_title(name, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        ax_row[0].set_ylabel(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
