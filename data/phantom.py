"""Procedural 3-D head phantoms: tissue fractions per voxel, and their spin-echo signal.

A subject is a deformed ellipsoidal head in "unit head space" (the head surface is the unit sphere):
scalp, skull (two bone tables around marrow), subarachnoid CSF, a folded cortex (sulci of random
depth lined with grey matter), white matter, an interhemispheric fissure, deep grey nuclei,
lateral and third ventricles and, optionally, a glioma-like lesion (oedema, solid tumour, necrosis).
The phantom is sampled on axial slices at given heights, so neighbouring slices change smoothly.

Each tissue class gets a fraction map (partial volume at soft edges), so a subject is computed once
and can be imaged with any sequence: `signal = sum_t fraction_t * S_t * texture_t` with `S_t` the
sequence's signal model (`data.sequences`) for the tissue's PD, T1 and T2.

Image convention: arrays are `(S, N, N)` = (slices, rows, columns); row 0 is anterior, slice 0 the
most inferior. In-plane coordinates are in units of half the field of view (FOV spans [-1, 1)),
with the centre at pixel N // 2 (the centre of a centred FFT).
"""

import math
from dataclasses import dataclass

import numpy as np

from data.sequences import Sequence

__all__ = ["HEAD_HEIGHT_RATIO", "HeadPhantom", "TISSUES", "Tissue", "sample_head", "smooth_field"]


@dataclass(frozen=True)
class Tissue:
    """Relaxation parameters of one tissue class (times in ms) and its texture amplitudes."""

    pd: float
    t1: float
    t2: float
    coarse_texture: float  # relative amplitude of smooth in-tissue variation
    fine_texture: float  # relative amplitude of near-pixel-scale variation


# Roughly 1.5 T values from the MR literature; lesion classes follow glioma appearance.
TISSUES: dict[str, Tissue] = {
    "air": Tissue(pd=0.0, t1=1000.0, t2=1.0, coarse_texture=0.0, fine_texture=0.0),
    "scalp": Tissue(pd=0.90, t1=280.0, t2=80.0, coarse_texture=0.10, fine_texture=0.08),
    "bone": Tissue(pd=0.06, t1=300.0, t2=2.0, coarse_texture=0.20, fine_texture=0.10),
    "marrow": Tissue(pd=0.80, t1=350.0, t2=70.0, coarse_texture=0.15, fine_texture=0.10),
    "csf": Tissue(pd=1.00, t1=4000.0, t2=2000.0, coarse_texture=0.02, fine_texture=0.02),
    "gm": Tissue(pd=0.86, t1=1300.0, t2=95.0, coarse_texture=0.05, fine_texture=0.05),
    "wm": Tissue(pd=0.68, t1=600.0, t2=70.0, coarse_texture=0.04, fine_texture=0.03),
    "deep_gm": Tissue(pd=0.80, t1=1000.0, t2=85.0, coarse_texture=0.05, fine_texture=0.04),
    "oedema": Tissue(pd=0.90, t1=1400.0, t2=220.0, coarse_texture=0.08, fine_texture=0.05),
    "tumour": Tissue(pd=0.85, t1=1050.0, t2=140.0, coarse_texture=0.12, fine_texture=0.08),
    "necrosis": Tissue(pd=0.95, t1=2500.0, t2=700.0, coarse_texture=0.05, fine_texture=0.04),
}

# Layer thicknesses and shapes in unit head space (head radius 1).
_SCALP, _OUTER_TABLE, _MARROW, _INNER_TABLE, _CSF = 0.055, 0.022, 0.018, 0.02, 0.03
HEAD_HEIGHT_RATIO = 0.82  # head height semi-axis relative to the antero-posterior one


@dataclass
class HeadPhantom:
    """One subject sampled on `(S, N, N)` slices.

    fractions: tissue name -> `(S, N, N)` float32 fraction in [0, 1]; they sum to 1 per voxel.
    coarse, fine: `(S, N, N)` float32 zero-mean unit-scale texture fields shared by all tissues.
    brain: `(S, N, N)` bool, the brain mask a skull-stripping tool would output.
    """

    fractions: dict[str, np.ndarray]
    coarse: np.ndarray
    fine: np.ndarray
    brain: np.ndarray

    def image(self, sequence: Sequence) -> np.ndarray:
        """Noise-free magnitude image `(S, N, N)` float32 acquired with `sequence`."""
        out = np.zeros_like(self.coarse)
        for name, frac in self.fractions.items():
            tissue = TISSUES[name]
            s = np.float32(sequence.signal(tissue.pd, tissue.t1, tissue.t2))
            if s == 0:
                continue
            texture = 1.0 + tissue.coarse_texture * self.coarse + tissue.fine_texture * self.fine
            out += frac * (s * texture)
        return np.maximum(out, 0.0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _rbf_basis(coords: np.ndarray, length: float) -> np.ndarray:
    """Gaussian bumps of width `length` every length/2 around `coords`: `(len(coords), K)` float32."""
    lo, hi = float(coords.min()) - 2 * length, float(coords.max()) + 2 * length
    centres = np.arange(lo, hi + 1e-9, length / 2)
    return np.exp(-0.5 * ((coords[:, None] - centres[None, :]) / length) ** 2).astype(np.float32)


def smooth_field(
    rng: np.random.Generator, z: np.ndarray, y: np.ndarray, x: np.ndarray, length: float
) -> np.ndarray:
    """Random smooth field `(len(z), len(y), len(x))`, float32, zero mean, unit std.

    A sum of Gaussian bumps with random weights on a separable grid: cheap (three small tensor
    contractions) and not periodic, unlike FFT filtering. `length` is in the units of the coordinates.
    """
    bz, by, bx = (_rbf_basis(c, length) for c in (z, y, x))
    weights = rng.standard_normal((bz.shape[1], by.shape[1], bx.shape[1])).astype(np.float32)
    # einsum rather than matmul: BLAS threads oversubscribe the cores when subjects run in threads.
    field = np.einsum("abc,wc->abw", weights, bx)
    field = np.einsum("hb,abw->ahw", by, field)
    field = np.einsum("sa,ahw->shw", bz, field)
    field -= field.mean()
    return field / max(float(field.std()), 1e-12)


def fine_field(rng: np.random.Generator, shape: tuple[int, int, int], sigma_px: float) -> np.ndarray:
    """In-plane Gaussian-filtered white noise `(S, N, N)` float32, unit std (texture at pixel scale)."""
    noise = rng.standard_normal(shape).astype(np.float32)
    fy = np.fft.fftfreq(shape[1]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[2]).astype(np.float32)[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (fy**2 + fx**2))
    field = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=shape[1:])
    return (field / max(float(field.std()), 1e-12)).astype(np.float32)


def _angular_table(rng: np.random.Generator, z: np.ndarray, n_theta: int, length_theta: float,
                   length_z: float) -> np.ndarray:
    """Random smooth function of (slice height, polar angle), periodic in angle: `(S, n_theta)`."""
    theta = np.linspace(-np.pi, np.pi, n_theta, endpoint=False)
    centres = np.arange(-np.pi, np.pi, length_theta / 2)
    d = np.angle(np.exp(1j * (theta[:, None] - centres[None, :])))  # wrapped angle difference
    b_theta = np.exp(-0.5 * (d / length_theta) ** 2).astype(np.float32)
    b_z = _rbf_basis(z, length_z)
    weights = rng.standard_normal((b_z.shape[1], len(centres))).astype(np.float32)
    table = np.einsum("sa,at->st", np.einsum("sk,ka->sa", b_z, weights), b_theta.T)
    return (table / max(float(table.std()), 1e-12)).astype(np.float32)


def _lookup(table: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Nearest-neighbour lookup of an `(S, n_theta)` angular table at angles `(S, N, N)`."""
    n = table.shape[1]
    idx = np.rint((theta + np.pi) * (n / (2 * np.pi))).astype(np.int64) % n
    return table[np.arange(table.shape[0])[:, None, None], idx]


def _ellipsoid(p: tuple[np.ndarray, ...], centre: tuple[float, float, float],
               semi: tuple[float, float, float], edge: float) -> np.ndarray:
    """Soft indicator of an ellipsoid; `edge` is the transition width in unit head space."""
    q = sum(((pi - c) / s) ** 2 for pi, c, s in zip(p, centre, semi))
    return _sigmoid((1.0 - np.sqrt(q)) * min(semi) / edge)


class _Painter:
    """Paints tissue classes over each other with soft masks, keeping fractions summing to 1."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.fractions = {name: np.zeros(shape, np.float32) for name in TISSUES}
        self.fractions["air"][:] = 1.0

    def paint(self, name: str, mask: np.ndarray) -> None:
        mask = mask.astype(np.float32)
        keep = 1.0 - mask
        for frac in self.fractions.values():
            frac *= keep
        self.fractions[name] += mask


def sample_head(
    rng: np.random.Generator,
    n: int,
    heights: np.ndarray,
    head_semi_axis: float,
    lesions: bool,
) -> HeadPhantom:
    """Draw one random subject and sample it on axial slices.

    Args:
        rng: source of all randomness for this subject.
        n: in-plane matrix size N.
        heights: `(S,)` slice heights in unit head space (-1 = bottom of the head, 1 = vertex).
        head_semi_axis: antero-posterior head semi-axis in units of half the FOV (head size in image).
        lesions: add a glioma-like lesion (BraTS-like subjects).

    Returns:
        The phantom, arrays `(S, n, n)`.
    """
    s = len(heights)
    shape = (s, n, n)
    grid = (np.arange(n, dtype=np.float32) - n // 2) * (2.0 / n)
    x = grid[None, None, :]
    y = -grid[None, :, None]  # row 0 is anterior

    # Subject pose and size.
    b = head_semi_axis * rng.uniform(0.94, 1.04)
    a = b * rng.uniform(0.78, 0.86)
    c = b * HEAD_HEIGHT_RATIO
    angle = math.radians(rng.uniform(-8, 8))
    tx, ty = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)
    z_phys = heights.astype(np.float32) * c  # slice heights in FOV units, for isotropic fields

    # Python floats keep the arrays float32 (numpy scalars would promote them to float64).
    cos, sin = math.cos(angle), math.sin(angle)
    xr = cos * (x - tx) + sin * (y - ty)
    yr = -sin * (x - tx) + cos * (y - ty)
    warp = 0.03 * b
    xd = xr + warp * smooth_field(rng, z_phys, grid, grid, 0.35)
    yd = yr + warp * smooth_field(rng, z_phys, grid, grid, 0.35)

    py = yd / b
    px = xd / (a * (1.0 - 0.07 * py))  # egg shape: wider at the back
    pz = np.broadcast_to(heights.astype(np.float32)[:, None, None], shape)
    rho = np.sqrt(px**2 + py**2)
    r = np.sqrt(rho**2 + pz**2)
    theta = np.arctan2(py, px)
    edge = 0.7 * (2.0 / n) / b  # soft edge of about 0.7 pixel, in unit head space

    def inside(radius: np.ndarray | float) -> np.ndarray:
        return _sigmoid((radius - r) / edge)

    painter = _Painter(shape)
    # Scalp, skull (outer table, marrow, inner table), then the subarachnoid CSF.
    skull_thick = rng.uniform(0.9, 1.2)
    radius = 1.0
    # Each layer starts `depth` inside the outer surface of the previous one.
    for name, depth in (("scalp", 0.0), ("bone", _SCALP), ("marrow", _OUTER_TABLE * skull_thick),
                        ("bone", _MARROW * skull_thick), ("csf", _INNER_TABLE * skull_thick)):
        radius -= depth
        painter.paint(name, inside(radius))
    r_brain = (radius - _CSF * rng.uniform(0.7, 1.5)) * (
        1.0 + 0.012 * _lookup(_angular_table(rng, z_phys, 512, 0.5, 0.3), theta))
    painter.paint("gm", inside(r_brain))

    # Cortex folding: sulci run inwards from the surface at (warped) regularly spaced angles, with
    # shallower secondary sulci half-way between; grey matter lines each sulcus.
    cortex = rng.uniform(0.045, 0.055)
    n_sulci = int(rng.integers(16, 22))
    spacing = 2 * np.pi / n_sulci
    bent = (theta + 0.2 * smooth_field(rng, z_phys, grid, grid, 0.12)
            + 0.35 * spacing * _lookup(_angular_table(rng, z_phys, 1024, 1.5 * spacing, 0.2), theta))
    u = (bent + np.pi) / spacing
    base_depth = rng.uniform(0.10, 0.15) * (1.0 + 0.25 * _lookup(
        _angular_table(rng, z_phys, 512, 0.4, 0.1), theta))
    primary = np.floor(u + 0.5)
    secondary = np.floor(u)
    in_brain = inside(r_brain)
    half_width = 0.01 + 0.35 * np.maximum(r - (r_brain - 0.05), 0.0)  # sulci open at the surface
    wm_indent = np.zeros(shape, np.float32)
    sulcus = np.zeros(shape, np.float32)
    for index, offset, depths in (
        (primary, u - primary, rng.uniform(0.5, 1.0, n_sulci)),
        (secondary, u - secondary - 0.5, rng.uniform(0.2, 0.6, n_sulci) * (rng.random(n_sulci) < 0.4)),
    ):
        depth = base_depth * depths[index.astype(np.int64) % n_sulci].astype(np.float32)
        dist = np.abs(offset) * spacing * rho
        wm_indent = np.maximum(wm_indent, depth * _sigmoid((half_width + cortex - dist) / edge))
        sulcus = np.maximum(sulcus, _sigmoid((half_width - dist) / edge)
                            * _sigmoid((r - (r_brain - depth)) / edge))
    painter.paint("wm", inside(r_brain - cortex - wm_indent))
    painter.paint("csf", in_brain * sulcus)

    # Interhemispheric fissure with its medial cortex, above and around the corpus callosum.
    midline = xd / a - 0.02 * smooth_field(rng, z_phys, grid, grid, 0.5)
    fissure_region = _sigmoid((np.maximum(np.abs(py) / 0.42, (pz - 0.05) / 0.3) - 1.0) / 0.05)
    painter.paint("gm", in_brain * fissure_region * _sigmoid((cortex - np.abs(midline)) / edge))
    painter.paint("csf", in_brain * fissure_region * _sigmoid((0.012 - np.abs(midline)) / edge))

    # Deep grey nuclei (caudate, putamen, thalamus), then the ventricles over them.
    p = (np.abs(px), py, pz)
    for centre, semi in (((0.17, 0.15, 0.08), (0.06, 0.11, 0.12)),
                         ((0.30, 0.02, -0.02), (0.06, 0.15, 0.11)),
                         ((0.10, -0.13, -0.02), (0.08, 0.11, 0.10))):
        painter.paint("deep_gm", _ellipsoid(p, centre, semi, edge))
    vent = rng.uniform(0.7, 1.6)
    yv = py - 0.02
    # Lateral ventricles: bananas on each side of a thin septum, frontal horns diverging.
    horn = np.maximum(yv, 0.0)
    bend = (np.abs(px) - (0.05 + 0.35 * yv**2 + 0.15 * horn), yv, pz - (0.12 - 0.5 * yv**2))
    painter.paint("csf", _ellipsoid(bend, (0.0, 0.0, 0.0),
                                    (0.055 * vent, 0.30, 0.16 * vent**0.5), edge))
    painter.paint("csf", _ellipsoid((px, py, pz), (0.0, -0.04, -0.10), (0.012 * vent, 0.12, 0.10), edge))

    coarse = smooth_field(rng, z_phys, grid, grid, 0.1)
    fine = fine_field(rng, shape, sigma_px=0.8)

    if lesions:
        for _ in range(1 if rng.random() < 0.7 else 2):
            side = 1.0 if rng.random() < 0.5 else -1.0
            centre = (side * rng.uniform(0.18, 0.42), rng.uniform(-0.45, 0.45),
                      rng.uniform(float(heights.min()) * 0.5 + 0.1, float(heights.max()) * 0.8))
            size = rng.uniform(0.10, 0.22)
            d = np.sqrt((px - centre[0]) ** 2 + (py - centre[1]) ** 2 + (pz - centre[2]) ** 2)
            d = d / size + 0.25 * coarse  # irregular outline
            soft = edge / size
            painter.paint("oedema", in_brain * _sigmoid((1.0 - d) / soft))
            painter.paint("tumour", in_brain * _sigmoid((0.55 - d) / soft))
            if rng.random() < 0.6:
                painter.paint("necrosis", in_brain * _sigmoid((0.3 - d) / soft))

    brain = (r < r_brain + 0.5 * _CSF).astype(bool)
    return HeadPhantom(fractions=painter.fractions, coarse=coarse, fine=fine, brain=brain)
