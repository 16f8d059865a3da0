"""Receive coil arrays for the synthetic multicoil sites: loop coils, sensitivities, noise.

An array is a set of circular loops on a cylinder around the object whose axis is along B0, as
head and knee coils are built: one ring for up to 8 elements, two staggered rings above. Each
loop's sensitivity is the transverse part of its Biot-Savart field, `B_a - i B_b` (the field of
a unit current, with a and b the two axes perpendicular to B0), times a random receiver phase per
channel: magnitude falls off away from the loop and the phase varies smoothly, as in measured
maps. The maps are normalised voxel by voxel to unit root-sum-of-squares over the coils, so the
RSS of the coil images is the object's own magnitude: a site's receive shading stays in its bias
field, exactly as in its singlecoil files, and the maps look like the unit-RSS maps that ESPIRiT
or VarNet's sensitivity network estimate.

Noise is correlated across coils: the covariance is `D^1/2 ((1 - k) I + k C) D^1/2`, where C is
the correlation of the loops' fields over the object (overlapping loops pick up the same body
noise), k = 0.5 and D spreads the channels' noise power by +-25%.

Coordinates are in mm in the coil frame `(a, b, axial)`; `sensitivity_maps` maps image axes to it.
"""

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["LoopArray", "correlated_noise", "emulated_single_coil", "loop_array", "noise_covariance",
           "sensitivity_maps"]

_SEGMENTS = 32  # straight pieces per loop in the Biot-Savart sum
_COUPLING = 0.5  # k above: weight of the field overlap in the noise correlation


@dataclass(frozen=True)
class LoopArray:
    """Loop coils: centres `(C, 3)` and unit normals `(C, 3)` in mm in the coil frame, loop radii
    `(C,)` in mm, receiver phases `(C,)` in radians and noise power factors `(C,)`."""

    centres: np.ndarray
    normals: np.ndarray
    radii: np.ndarray
    phases: np.ndarray
    noise_power: np.ndarray

    @property
    def coils(self) -> int:
        return len(self.centres)


def loop_array(rng: np.random.Generator, coils: int, ring_radius_mm: float,
               axial_centre_mm: float = 0.0) -> LoopArray:
    """`coils` loops on a cylinder of radius `ring_radius_mm` around the axial axis.

    Loops are evenly spaced around the cylinder and overlap their neighbours by about 10% of
    their diameter (as overlap-decoupled arrays are built); above 8 coils they form two rings
    staggered by half a spacing, 0.8 loop radii above and below `axial_centre_mm`. The subject's
    position in the coil varies: the array is rotated by up to +-20 degrees and shifted by up to
    5 mm across and 10 mm along the axis.
    """
    if coils < 1:
        raise ValueError(f"coils must be >= 1, got {coils}")
    rings = 1 if coils <= 8 else 2
    per_ring = [coils // rings + (1 if r < coils % rings else 0) for r in range(rings)]
    rotation = rng.uniform(-math.pi / 9, math.pi / 9)
    shift = np.array([*rng.uniform(-5.0, 5.0, 2), axial_centre_mm + rng.uniform(-10.0, 10.0)])
    centres, normals, radii = [], [], []
    for ring, count in enumerate(per_ring):
        radius = 1.1 * math.pi * ring_radius_mm / max(count, 2)
        axial = 0.0 if rings == 1 else (1.6 * ring - 0.8) * radius
        for k in range(count):
            angle = rotation + 2 * math.pi * (k + 0.5 * ring) / count
            normal = np.array([math.cos(angle), math.sin(angle), 0.0])
            centres.append(shift + ring_radius_mm * normal + np.array([0.0, 0.0, axial]))
            normals.append(normal)
            radii.append(radius)
    return LoopArray(np.array(centres), np.array(normals), np.array(radii),
                     rng.uniform(0.0, 2 * math.pi, coils), rng.uniform(0.8, 1.25, coils))


def _transverse_field(centre: np.ndarray, normal: np.ndarray, radius: float,
                      points: np.ndarray) -> np.ndarray:
    """Components (a, b) `(2, P)` of the Biot-Savart field of a unit current in one loop at
    `points` `(P, 3)` (mm), the sum over `_SEGMENTS` straight pieces of `dl x d / |d|^3`."""
    u = np.array([0.0, 0.0, 1.0]) if abs(normal[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    u = u - normal * (u @ normal)
    u /= np.linalg.norm(u)
    v = np.cross(normal, u)
    phi = 2 * math.pi * (np.arange(_SEGMENTS) + 0.5) / _SEGMENTS
    wire = centre + radius * (np.cos(phi)[:, None] * u + np.sin(phi)[:, None] * v)  # (K, 3)
    dl = (2 * math.pi * radius / _SEGMENTS) * (-np.sin(phi)[:, None] * u + np.cos(phi)[:, None] * v)
    dx, dy, dz = (points[:, None, i] - wire[None, :, i] for i in range(3))  # (P, K) each
    inv_r3 = np.maximum(dx * dx + dy * dy + dz * dz, 1.0) ** -1.5
    b_a = ((dl[:, 1] * dz - dl[:, 2] * dy) * inv_r3).sum(axis=1)
    b_b = ((dl[:, 2] * dx - dl[:, 0] * dz) * inv_r3).sum(axis=1)
    return np.stack([b_a, b_b])


def _interpolation_matrix(n: int, nodes: np.ndarray) -> np.ndarray:
    """`(n, len(nodes))` matrix that interpolates values at integer `nodes` linearly to 0..n-1."""
    eye = np.eye(len(nodes))
    return np.stack([np.interp(np.arange(n), nodes, eye[j]) for j in range(len(nodes))], axis=1)


def _nodes(n: int, step: int) -> np.ndarray:
    nodes = np.arange(0, n, step)
    return nodes if nodes[-1] == n - 1 else np.append(nodes, n - 1)


def sensitivity_maps(
    array: LoopArray,
    coords_mm: tuple[np.ndarray, np.ndarray, np.ndarray],
    frame: tuple[int, int, int],
    object_mask: np.ndarray,
    spacing_mm: float = 8.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Unit-RSS coil maps on an image grid, and the coils' field correlation over the object.

    Args:
        array: the coils.
        coords_mm: positions in mm along the image axes (slices `(S,)`, rows `(N,)`, columns `(M,)`).
        frame: the coil-frame axis (0 = a, 1 = b, 2 = axial, along B0) of each image axis.
        object_mask: `(S, N, M)` bool, where the object is (weights the field correlation).
        spacing_mm: the fields are computed on an in-plane grid of about this spacing and
            interpolated linearly (they vary on the scale of centimetres).

    Returns:
        maps: `(C, S, N, M)` complex64 with `sum_c |maps_c|^2 = 1` at every voxel.
        correlation: `(C, C)` complex128 Hermitian, unit diagonal: the normalised overlap
        `sum_v s_i(v) conj(s_j(v))` of the raw fields over the object.
    """
    slices, rows, cols = coords_mm
    pixel_mm = abs(float(cols[1] - cols[0])) if len(cols) > 1 else spacing_mm
    step = max(1, int(round(spacing_mm / pixel_mm)))
    row_nodes, col_nodes = _nodes(len(rows), step), _nodes(len(cols), step)
    grid = np.meshgrid(slices, rows[row_nodes], cols[col_nodes], indexing="ij")
    points = np.zeros(grid[0].shape + (3,))
    for image_axis, frame_axis in enumerate(frame):
        points[..., frame_axis] = grid[image_axis]
    points = points.reshape(-1, 3)
    fields = np.empty((array.coils, points.shape[0]), np.complex128)
    for c in range(array.coils):
        b_a, b_b = _transverse_field(array.centres[c], array.normals[c], array.radii[c], points)
        fields[c] = (b_a - 1j * b_b) * np.exp(1j * array.phases[c])
    coarse = fields.reshape(array.coils, len(slices), len(row_nodes), len(col_nodes))

    weights = object_mask[:, row_nodes][:, :, col_nodes].reshape(-1).astype(np.float64)
    if weights.sum() == 0:
        weights[:] = 1.0
    gram = (fields * weights) @ fields.conj().T
    scale = np.sqrt(np.real(np.diag(gram)))
    correlation = gram / np.outer(scale, scale)

    w_rows = _interpolation_matrix(len(rows), row_nodes)
    w_cols = _interpolation_matrix(len(cols), col_nodes)
    maps = w_rows.astype(np.complex64) @ coarse.astype(np.complex64) @ w_cols.T.astype(np.complex64)
    maps /= np.maximum(np.sqrt((np.abs(maps) ** 2).sum(axis=0)), np.float32(1e-30))
    return maps, correlation


def noise_covariance(array: LoopArray, correlation: np.ndarray) -> np.ndarray:
    """Noise covariance `(C, C)` complex128, Hermitian positive definite, mean diagonal about 1:
    `D^1/2 ((1 - k) I + k correlation) D^1/2` with D the array's noise power factors."""
    mixed = (1.0 - _COUPLING) * np.eye(array.coils) + _COUPLING * correlation
    d = np.sqrt(array.noise_power)
    return d[:, None] * mixed * d[None, :]


def correlated_noise(rng: np.random.Generator, covariance: np.ndarray, shape: tuple[int, ...],
                     sigma: float) -> np.ndarray:
    """Complex noise `shape = (S, C, H, W)` complex64 whose coil vectors have covariance
    `2 sigma^2 covariance` (real and imaginary parts of each coil with std `sigma sqrt(cov_cc)`)."""
    cholesky = np.linalg.cholesky(covariance).astype(np.complex64)
    white = rng.standard_normal((2, *shape), dtype=np.float32) * np.float32(sigma)
    white = white[0] + 1j * white[1]
    out = np.zeros(shape, np.complex64)
    for c in range(shape[1]):
        for d in range(c + 1):
            out[:, c] += cholesky[c, d] * white[:, d]
    return out


def emulated_single_coil(coil_images: np.ndarray, magnitude: np.ndarray,
                         mask: np.ndarray) -> np.ndarray:
    """Weights `(C,)` complex128 of the emulated single coil (ESC) of a volume.

    As fastMRI's singlecoil knee data: one fixed linear combination `sum_c w_c coil_c` of the
    coil responses, fitted by least squares to the magnitude (RSS) image inside the object.
    `coil_images` is `(S, C, N, M)`, `magnitude` and `mask` `(S, N, M)`.
    """
    step = max(1, int(round((mask.sum() / 4096) ** 0.5)))  # about 4096 voxels are enough
    picked = np.zeros_like(mask)
    picked[:, ::step, ::step] = True
    picked &= mask
    a = np.moveaxis(coil_images, 1, -1)[picked].astype(np.complex128)  # (V, C)
    weights, *_ = np.linalg.lstsq(a, magnitude[picked].astype(np.complex128), rcond=None)
    return weights
