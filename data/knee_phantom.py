"""Procedural 3-D knee phantoms sampled on coronal slices, as fastMRI's knee scans are acquired.

A subject is a knee in extension, built in millimetres from soft shapes: skin, subcutaneous fat,
muscle with intermuscular fat, the infrapatellar (Hoffa), popliteal and notch fat pads; femur
(shaft, metaphysis and two condyles), tibia (plateau with the intercondylar eminence, shaft),
fibular head and patella, each with a cortex around fatty marrow; articular cartilage on the
femoral condyles and trochlea, the tibial plateau and the back of the patella; wedge-shaped
C-shaped medial and lateral menisci; cruciate and collateral ligaments; joint fluid in the joint
space and the suprapatellar recess (effusion varies per subject), sometimes a popliteal cyst.

As `data.phantom` does for heads, each tissue gets a fraction map, so one subject is imaged with
any sequence: `signal = sum_t fraction_t * S_t * texture_t`. Tissues carry a fat share: under fat
saturation it is suppressed, less so far from the isocentre (B0 inhomogeneity), as in real PDFS.

Image convention: arrays `(S, N, N)` = (slices anterior to posterior, rows superior to inferior,
columns across the knee); the centre of the field of view is at pixel N // 2.
Knee frame (mm): x across the knee (lateral positive), y anterior (-) to posterior (+), z along
the leg (superior positive), joint line at z = 0.
"""

import math
from dataclasses import dataclass

import numpy as np

from data.brain_anatomy import fine_field, smooth_field
from data.sequences import Sequence

__all__ = ["KNEE_TISSUES", "KneePhantom", "KneeTissue", "knee_slice_positions", "sample_knee"]


@dataclass(frozen=True)
class KneeTissue:
    """Relaxation parameters (ms), the share of signal from fat protons, texture amplitudes."""

    pd: float
    t1: float
    t2: float
    fat: float
    coarse_texture: float
    fine_texture: float


# Roughly 3 T values; fat T2 is the apparent one of turbo spin echo (J-coupling keeps fat bright).
KNEE_TISSUES: dict[str, KneeTissue] = {
    "air": KneeTissue(pd=0.0, t1=1000.0, t2=1.0, fat=0.0, coarse_texture=0.0, fine_texture=0.0),
    "skin": KneeTissue(pd=0.75, t1=600.0, t2=40.0, fat=0.2, coarse_texture=0.05, fine_texture=0.05),
    "fat": KneeTissue(pd=0.95, t1=370.0, t2=130.0, fat=1.0, coarse_texture=0.05, fine_texture=0.04),
    "muscle": KneeTissue(pd=0.75, t1=1400.0, t2=32.0, fat=0.0, coarse_texture=0.06, fine_texture=0.05),
    "cortex": KneeTissue(pd=0.05, t1=400.0, t2=1.0, fat=0.0, coarse_texture=0.1, fine_texture=0.1),
    "marrow": KneeTissue(pd=0.90, t1=380.0, t2=110.0, fat=0.85, coarse_texture=0.08, fine_texture=0.06),
    "cartilage": KneeTissue(pd=0.80, t1=1200.0, t2=42.0, fat=0.0, coarse_texture=0.05, fine_texture=0.05),
    "meniscus": KneeTissue(pd=0.45, t1=1000.0, t2=8.0, fat=0.0, coarse_texture=0.1, fine_texture=0.1),
    "ligament": KneeTissue(pd=0.40, t1=900.0, t2=6.0, fat=0.0, coarse_texture=0.1, fine_texture=0.1),
    "fluid": KneeTissue(pd=1.00, t1=3000.0, t2=400.0, fat=0.0, coarse_texture=0.02, fine_texture=0.02),
}

_AP_COVERAGE_MM = (-40.0, 36.0)  # coronal stack: front of the patella to the back of the condyles


@dataclass
class KneePhantom:
    """One knee on `(S, N, N)` coronal slices.

    fractions: tissue name -> `(S, N, N)` float32 fraction; they sum to 1 per voxel.
    coarse, fine: `(S, N, N)` float32 unit-scale texture fields shared by all tissues.
    fat_leak: `(S, N, N)` float32 in [0, 1], the share of the fat signal that fat saturation
        fails to suppress (grows towards the edge of the field of view).
    """

    fractions: dict[str, np.ndarray]
    coarse: np.ndarray
    fine: np.ndarray
    fat_leak: np.ndarray

    def image(self, sequence: Sequence) -> np.ndarray:
        """Noise-free magnitude image `(S, N, N)` float32 acquired with `sequence`."""
        out = np.zeros_like(self.coarse)
        for name, frac in self.fractions.items():
            tissue = KNEE_TISSUES[name]
            signal = float(sequence.signal(tissue.pd, tissue.t1, tissue.t2, tissue.fat))
            suppressed = float(sequence.signal(tissue.pd, tissue.t1, tissue.t2)) - signal
            if signal == 0 and suppressed == 0:
                continue
            texture = 1.0 + tissue.coarse_texture * self.coarse + tissue.fine_texture * self.fine
            out += frac * (signal + suppressed * self.fat_leak) * texture
        return np.maximum(out, 0.0)


def knee_slice_positions(count: int) -> tuple[np.ndarray, float]:
    """Antero-posterior positions `(count,)` in mm of a coronal stack, and their spacing."""
    lo, hi = _AP_COVERAGE_MM
    if count == 1:
        return np.array([0.5 * (lo + hi)], np.float32), hi - lo
    step = (hi - lo) / (count - 1)
    return (lo + step * np.arange(count)).astype(np.float32), step


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _ellipsoid_depth(p: tuple[np.ndarray, ...], centre: tuple[float, ...],
                     semi: tuple[float, ...]) -> np.ndarray:
    """Approximate signed distance in mm inside (+) an ellipsoid (first order in the surface)."""
    u = [(pi - c) / s for pi, c, s in zip(p, centre, semi)]
    q = np.sqrt(sum(ui * ui for ui in u)) + 1e-6
    grad = np.sqrt(sum((ui / s) ** 2 for ui, s in zip(u, semi))) / q + 1e-9
    return (1.0 - q) / grad


def _capsule_depth(p: tuple[np.ndarray, ...], a: tuple[float, ...], b: tuple[float, ...],
                   radius: float) -> np.ndarray:
    """Signed distance in mm inside a cylinder of `radius` around the segment a-b, rounded ends."""
    ab = np.subtract(b, a)
    t = sum((pi - ai) * d for pi, ai, d in zip(p, a, ab)) / float(ab @ ab)
    t = np.clip(t, 0.0, 1.0)
    dist2 = sum((pi - (ai + t * d)) ** 2 for pi, ai, d in zip(p, a, ab))
    return radius - np.sqrt(dist2)


def _smooth_max(a: np.ndarray, b: np.ndarray, k: float = 3.0) -> np.ndarray:
    """Union of two depth maps with a fillet of about `k` mm where they meet."""
    m = np.maximum(a, b)
    return m + k * np.log1p(np.exp(-np.abs(a - b) / k))


class _Painter:
    """Paints tissue classes over each other with soft masks, keeping fractions summing to 1."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.fractions = {name: np.zeros(shape, np.float32) for name in KNEE_TISSUES}
        self.fractions["air"][:] = 1.0
        self._painted = {"air"}  # tissues with non-zero fractions so far

    def paint(self, name: str, mask: np.ndarray) -> None:
        mask = np.broadcast_to(mask, self.fractions["air"].shape).astype(np.float32)
        keep = 1.0 - mask
        for painted in self._painted:
            self.fractions[painted] *= keep
        self.fractions[name] += mask
        self._painted.add(name)


def sample_knee(rng: np.random.Generator, n: int, voxel_mm: float, slices_mm: np.ndarray) -> KneePhantom:
    """Draw one random knee and sample it on coronal slices.

    Args:
        rng: source of all randomness for this subject.
        n: in-plane matrix size N.
        voxel_mm: in-plane pixel size in mm.
        slices_mm: `(S,)` antero-posterior slice positions in mm (`knee_slice_positions`).

    Returns:
        The phantom, arrays `(S, n, n)`.
    """
    shape = (len(slices_mm), n, n)
    grid = (np.arange(n, dtype=np.float32) - n // 2) * np.float32(voxel_mm)
    # Python floats keep the arrays float32 (numpy scalars would promote them to float64).
    size = float(rng.uniform(0.9, 1.1))
    side = 1.0 if rng.random() < 0.5 else -1.0  # left or right knee
    tilt = math.radians(rng.uniform(-4, 4))
    shift = [float(v) for v in rng.uniform(-5, 5, size=3)]
    cols, rows = grid[None, None, :], -grid[None, :, None]
    ap = slices_mm.astype(np.float32)[:, None, None] + shift[1]
    cos, sin = math.cos(tilt), math.sin(tilt)
    x = (side * (cos * cols + sin * rows) - shift[0]) / size
    z = (-sin * cols + cos * rows - shift[2]) / size
    y = ap / size
    x, y, z = np.broadcast_arrays(x, y, z)
    p = (x, y, z)
    edge = 0.7 * voxel_mm / size  # soft edges of about 0.7 pixel
    z_coarse = ap[:, 0, 0]

    def soft(depth: np.ndarray) -> np.ndarray:
        return _sigmoid(depth / edge)

    painter = _Painter(shape)
    field = smooth_field(rng, z_coarse / 100.0, grid / 100.0, grid / 100.0, 0.3)

    # Leg outline, skin, subcutaneous fat, muscle with intermuscular fat.
    ax = 54.0 + 0.08 * np.abs(z) + 1.5 * field
    ay = 50.0 + 0.06 * np.abs(z) + 1.5 * field
    leg = (1.0 - np.sqrt((x / ax) ** 2 + ((y - 6.0) / ay) ** 2)) * np.minimum(ax, ay)
    painter.paint("skin", soft(leg))
    fat_thickness = rng.uniform(4.0, 12.0) * (1.0 + 0.3 * field)
    painter.paint("fat", soft(leg - 1.5))
    painter.paint("muscle", soft(leg - 1.5 - fat_thickness))
    marbling = smooth_field(rng, z_coarse / 100.0, grid / 100.0, grid / 100.0, 0.08)
    painter.paint("fat", soft(leg - 1.5 - fat_thickness) * _sigmoid((marbling - 1.1) / 0.15))
    for centre, semi in (((0.0, -24.0, -10.0), (20.0, 10.0, 12.0)),   # infrapatellar (Hoffa)
                         ((0.0, 34.0, 4.0), (18.0, 10.0, 25.0)),      # popliteal
                         ((0.0, 6.0, 8.0), (8.0, 18.0, 10.0))):       # intercondylar notch
        painter.paint("fat", soft(_ellipsoid_depth(p, centre, semi)))

    # Collateral and cruciate ligaments (bones painted later cut their ends).
    painter.paint("ligament", soft(np.minimum(np.minimum(1.5 - np.abs(x + 40.0), 30.0 - np.abs(z + 3.0)),
                                              12.0 - np.abs(y))))
    painter.paint("ligament", soft(_capsule_depth(p, (37.0, 8.0, 20.0), (40.0, 16.0, -18.0), 2.5)))
    painter.paint("ligament", soft(_capsule_depth(p, (9.0, 14.0, 15.0), (2.0, -6.0, -1.0), 4.0)))
    painter.paint("ligament", soft(_capsule_depth(p, (-7.0, 4.0, 16.0), (-1.0, 24.0, -8.0), 4.5)))

    # Joint fluid: the joint space, the suprapatellar recess, sometimes a popliteal cyst.
    effusion = rng.uniform(0.5, 5.0)
    plateau = np.sqrt((x / 38.0) ** 2 + ((y - 4.0) / 26.0) ** 2)
    painter.paint("fluid", soft(np.minimum((1.0 - plateau) * 26.0, 1.0 + effusion - np.abs(z))))
    painter.paint("fluid", soft(_ellipsoid_depth(p, (0.0, -23.5 - effusion / 2, 48.0),
                                                 (24.0, 1.0 + effusion / 2, 20.0))))
    if rng.random() < 0.15:
        painter.paint("fluid", soft(_ellipsoid_depth(p, (-15.0, 40.0, 0.0), (8.0, 6.0, 15.0))))

    # Menisci: wedges on the plateau rim, open towards the intercondylar area.
    plateau_top = -0.3 + 3.5 * np.exp(-(x / 5.0) ** 2 - ((y - 2.0) / 9.0) ** 2)
    for compartment, half_open in ((-1.0, math.radians(35)), (1.0, math.radians(20))):
        cx, cy, outer, base, height = 21.0 * compartment, 5.0, 16.0, 9.0, 6.0
        rho = np.sqrt((x - cx) ** 2 + ((y - cy) / 1.25) ** 2)
        h = (z - plateau_top) / height
        inner = outer - base * (1.0 - h)
        towards_midline = np.arctan2(y - cy, -(x - cx) * compartment)
        opening = _sigmoid((np.abs(towards_midline) - half_open) / 0.1)
        wedge = soft(np.minimum(np.minimum(rho - inner, outer - rho), np.minimum(h, 1.0 - h) * height))
        painter.paint("meniscus", wedge * opening)

    cartilage, cortex = rng.uniform(2.0, 3.0), rng.uniform(1.5, 2.2)

    def paint_bone(outer: np.ndarray, articular: np.ndarray | float, thickness: float) -> None:
        """Cartilage (on the `articular` share of the surface), then cortex, then marrow."""
        bone = outer - thickness * articular
        if thickness:
            painter.paint("cartilage", soft(outer) * articular)
        painter.paint("cortex", soft(bone))
        painter.paint("marrow", soft(bone - cortex))

    # Femur: shaft, metaphysis, medial and lateral condyles; cartilage distally, posteriorly and
    # on the trochlea.
    condyles = []
    for compartment in (-1.0, 1.0):
        semi = (rng.uniform(14.5, 16.5), rng.uniform(25.0, 28.0), rng.uniform(20.0, 22.0))
        centre = (20.0 * compartment, 5.5, 0.3 + semi[2])
        condyles.append(_ellipsoid_depth(p, centre, semi))
    shaft = np.minimum(13.5 - np.sqrt(x * x + (y - 1.0) ** 2), z - 25.0)
    femur = _smooth_max(_smooth_max(shaft, _ellipsoid_depth(p, (0.0, 2.0, 38.0), (34.0, 24.0, 26.0))),
                        np.maximum(*condyles), k=2.0)
    articular = np.maximum(_sigmoid((24.0 - z) / 3.0), _sigmoid((-12.0 - y) / 3.0) * _sigmoid((45.0 - z) / 3.0))
    paint_bone(femur, articular, cartilage)

    # Tibia: plateau with the eminence, narrowing to the shaft; cartilage on the plateau.
    taper = 0.4 + 0.6 * _sigmoid((z + 30.0) / 6.0)
    rim = (1.0 - np.sqrt((x / (38.0 * taper)) ** 2 + ((y - 4.0) / (26.0 * taper)) ** 2)) * 26.0 * taper
    tibia = np.minimum(plateau_top - z, rim)
    on_plateau = _sigmoid((np.abs(x) - 5.0) / 1.5) * _sigmoid((z - plateau_top + 6.0) / 1.0)
    paint_bone(tibia, on_plateau, cartilage)

    # Fibular head and shaft (lateral, posterior), patella with its thick cartilage behind.
    fibula = _smooth_max(_ellipsoid_depth(p, (34.0, 16.0, -22.0), (9.0, 9.0, 10.0)),
                         np.minimum(7.0 - np.sqrt((x - 34.0) ** 2 + (y - 18.0) ** 2), -22.0 - z))
    paint_bone(fibula, 0.0, 0.0)
    patella = _ellipsoid_depth(p, (3.0, -32.5, 30.0), (22.0, 10.0, 19.0))
    paint_bone(patella, _sigmoid((y + 30.5) / 2.0), cartilage + 1.0)

    coarse = smooth_field(rng, z_coarse / 100.0, grid / 100.0, grid / 100.0, 0.1)
    fine = fine_field(rng, shape, sigma_px=0.8)
    radius = np.sqrt(cols ** 2 + rows ** 2 + ap ** 2) / (0.5 * n * voxel_mm)
    leak = np.clip(0.03 + 0.35 * radius ** 4 + 0.03 * field, 0.0, 1.0).astype(np.float32)
    return KneePhantom(fractions=painter.fractions, coarse=coarse, fine=fine, fat_leak=leak)
