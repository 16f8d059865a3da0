"""Synthetic brain anatomy: one subject's tissue fraction maps, sampled on axial slices.

A subject is built in millimetres in its own head frame (x: left-right, y: posterior to anterior,
z: inferior to superior, origin at the centre of the brain), then scaled, turned and warped into
the image. What it contains, and the anatomy each part follows:

- a brain envelope: a deformed, egg-shaped ellipsoid (wider at the back) whose size, width and
  height vary between subjects;
- a folded cortex: sulci are radial sheets grown inwards from the zero lines of a random
  band-limited field on a sphere, which form a labyrinth like the sulcal pattern of a hemisphere
  (gyri every ~15 mm, sulci 6-20 mm deep). Every surface that touches CSF (envelope, sulcal
  clefts, fissures) is lined by a grey-matter ribbon of thickness ~2.5 mm (the mean cortical
  thickness measured by Fischl & Dale 2000, PNAS 97:11050, range 1.5-4.5 mm); gyri have a
  white-matter core; sulci hold a thin CSF cleft that widens with age;
- the interhemispheric fissure down to the corpus callosum (white matter crossing the midline
  between genu and splenium), the insular cistern with the insular cortex, and the Sylvian
  fissure that opens it to the lateral surface;
- deep grey nuclei: caudate (head and body along the lateral ventricle), lentiform nucleus
  (putamen and globus pallidus), thalamus; the white matter left between them is the internal
  capsule;
- lateral ventricles along their C-shaped course (frontal horn, body, atrium, occipital and
  temporal horns) on each side of a thin septum pellucidum, and the third ventricle;
- outside the brain: subarachnoid CSF, the skull (inner table, diploe marrow, outer table),
  subcutaneous fat, and skin with galea and the temporalis muscle;
- optionally a glioma-like lesion (oedema, solid tumour, necrosis).

Subjects vary as adult brains do: head and brain size, head width, pose, a smooth shape warp,
the folding pattern and its density, sulcal depth, cortical thickness, skull and scalp
thickness, and an atrophy level (ageing) that enlarges the ventricles and widens sulcal and
subarachnoid CSF while thinning the cortex. Everything is a function of 3-D position, so
neighbouring slices change smoothly.

Partial volume: each tissue border is a signed distance d (mm) turned into a fraction by a box
filter the size of the voxel (in-plane pixel, through-plane slice spacing) projected onto the
border's normal; thin sheets (sulcal CSF, fissures) are filtered exactly as slabs, so a 1 mm
cleft in a 2 mm voxel has half the CSF it would have with a threshold.

Image convention (the same as `data.phantom`): arrays `(S, N, N)` = (slices, rows, columns), row 0
anterior, slice 0 the most inferior; in-plane coordinates in units of half the field of view,
centre at pixel N // 2.
"""

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "AC_POSITION_MM",
    "Anatomy",
    "HEAD_HEIGHT_RATIO",
    "REFERENCE_HEAD_SEMI_AXIS_MM",
    "TISSUE_NAMES",
    "fine_field",
    "sample_anatomy",
    "smooth_field",
]

TISSUE_NAMES = ("air", "scalp", "fat", "bone", "marrow", "csf", "gm", "wm", "deep_gm",
                "oedema", "tumour", "necrosis")
REFERENCE_HEAD_SEMI_AXIS_MM = 92.0  # antero-posterior half length of an average adult head
HEAD_HEIGHT_RATIO = 0.82  # head height semi-axis relative to the antero-posterior one
# The anterior commissure in the brain-centred frame of an average brain (mm): deep structures
# are placed relative to it with Talairach-like coordinates.
AC_POSITION_MM = (0.0, 14.0, -10.0)
_BRAIN_SEMI_AXES_MM = (64.0, 78.0, 62.0)  # (left-right, antero-posterior, superior-inferior)


@dataclass
class Anatomy:
    """One subject sampled on `(S, N, N)` slices.

    fractions: tissue name (all of TISSUE_NAMES) -> `(S, N, N)` float32 in [0, 1], summing to 1.
    coarse, fine: `(S, N, N)` float32 zero-mean unit-scale texture fields shared by all tissues.
    brain: `(S, N, N)` bool, the brain mask a skull-stripping tool would output.
    """

    fractions: dict[str, np.ndarray]
    coarse: np.ndarray
    fine: np.ndarray
    brain: np.ndarray


# ---------------------------------------------------------------------------------------------
# Random fields
# ---------------------------------------------------------------------------------------------

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


def _waves_on_sphere(rng: np.random.Generator, p: tuple[np.ndarray, ...], count: int,
                     wavelength: float, radius: float) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """A random band-limited field on the sphere of `radius` (mm), evaluated at the radial
    projection of the points `p` (3 arrays, mm), and its gradient with respect to `p`.

    The field is a sum of `count` plane waves of about `wavelength` in random 3-D directions, so
    on the sphere its zero lines form a labyrinth with a spacing of about wavelength / 1.4.
    Returns (g, (dg/dx, dg/dy, dg/dz)), float32 arrays, g normalised to unit RMS.
    """
    r = np.sqrt(p[0] ** 2 + p[1] ** 2 + p[2] ** 2) + 1e-3
    unit = tuple(c / r for c in p)
    q = tuple(radius * u for u in unit)
    directions = rng.standard_normal((count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    k = directions * (2 * np.pi / (wavelength * rng.uniform(0.8, 1.25, count)))[:, None]
    phases = rng.uniform(0, 2 * np.pi, count)
    g = np.zeros_like(r)
    grad = [np.zeros_like(r) for _ in range(3)]
    for (kx, ky, kz), phase in zip(k.astype(np.float32).tolist(), phases.tolist()):
        arg = kx * q[0] + ky * q[1] + kz * q[2] + phase
        g += np.cos(arg)
        s = np.sin(arg)
        grad[0] -= kx * s
        grad[1] -= ky * s
        grad[2] -= kz * s
    # Chain rule through the radial projection: keep the tangential part, scale by radius / r.
    radial = grad[0] * unit[0] + grad[1] * unit[1] + grad[2] * unit[2]
    scale = radius / r
    norm = 1.0 / math.sqrt(count / 2.0)
    return g * norm, tuple((gc - radial * uc) * scale * norm for gc, uc in zip(grad, unit))


# ---------------------------------------------------------------------------------------------
# Partial volume
# ---------------------------------------------------------------------------------------------

class _Voxel:
    """Voxel size and the box-filter width of a border along its normal."""

    def __init__(self, dx: float, dz: float, slices: int) -> None:
        self.dx, self.dz, self.slices = dx, dz, slices

    def width(self, nxy: np.ndarray, nz: np.ndarray) -> np.ndarray:
        """Box width (mm) along a unit normal with in-plane length `nxy` and axial part `nz`."""
        return np.sqrt((self.dx * nxy) ** 2 + (self.dz * nz) ** 2) + 1e-3

    def normal_width(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(|grad d|, box width along the normal) of a distance-like field `(S, N, N)` in mm."""
        gy, gx = np.gradient(d, self.dx, axis=(1, 2))
        gxy = np.sqrt(gx**2 + gy**2)
        gz = np.gradient(d, self.dz, axis=0) if self.slices > 1 else np.zeros_like(d)
        norm = np.sqrt(gxy**2 + gz**2) + 1e-6
        return norm, self.width(gxy / norm, np.abs(gz) / norm)

    def fraction(self, d: np.ndarray) -> np.ndarray:
        """Share of each voxel on the positive side of the border d = 0 (d: approximate mm)."""
        norm, width = self.normal_width(d)
        return _ramp(d / (norm * width))


def _ramp(t: np.ndarray) -> np.ndarray:
    return np.clip(t + 0.5, 0.0, 1.0)


def _slab(u: np.ndarray, half: np.ndarray | float, width: np.ndarray) -> np.ndarray:
    """Share of a box of `width` centred at distance `u` >= 0 from the mid-plane of a slab of
    half-thickness `half` that lies inside the slab (exact for a flat slab)."""
    lo = np.maximum(u - 0.5 * width, -half)
    hi = np.minimum(u + 0.5 * width, half)
    return np.clip((hi - lo) / width, 0.0, 1.0)


def _ellipsoid_distance(p: tuple[np.ndarray, ...], centre: tuple[float, float, float],
                        semi: tuple[float, float, float]) -> np.ndarray:
    """Approximate signed distance (mm, positive inside) to an ellipsoid."""
    q = np.sqrt(sum(((pi - c) / s) ** 2 for pi, c, s in zip(p, centre, semi)))
    return (1.0 - q) * min(semi)


class _Painter:
    """Paints tissue classes over each other with soft masks, keeping fractions summing to 1."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.fractions = {name: np.zeros(shape, np.float32) for name in TISSUE_NAMES}
        self.fractions["air"][:] = 1.0
        self._present = {"air"}

    def fill(self, mask: np.ndarray, parts: dict[str, np.ndarray | float],
             where: tuple = np.s_[...]) -> None:
        """Replace the share `mask` of each voxel (in `where`) by the mixture `parts` (summing to 1)."""
        keep = 1.0 - mask
        for name in self._present:
            self.fractions[name][where] *= keep
        for name, part in parts.items():
            self.fractions[name][where] += mask * part
            self._present.add(name)

    def paint(self, name: str, mask: np.ndarray, where: tuple = np.s_[...]) -> None:
        self.fill(mask, {name: 1.0}, where)


# ---------------------------------------------------------------------------------------------
# The subject
# ---------------------------------------------------------------------------------------------

# Deep structures, right side (mirrored to the left), relative to the anterior commissure in an
# average brain (mm): ((x, y, z) centre, (x, y, z) semi-axes). Positions follow the Talairach atlas.
_CAUDATE = (((13.0, 14.0, 8.0), (5.5, 10.0, 9.0)),    # head
            ((15.0, -1.0, 17.0), (3.5, 11.0, 4.5)),   # body
            ((18.0, -16.0, 19.0), (2.5, 8.0, 3.0)))   # body, posterior
_LENTIFORM = (((24.0, 3.0, 1.0), (5.0, 15.0, 9.0)),   # putamen
              ((17.0, -1.0, -1.0), (3.5, 8.0, 6.0)))  # globus pallidus
_THALAMUS = ((10.0, -16.0, 5.0), (8.5, 15.0, 9.0))
# Lateral ventricle: a tube along its C-shaped centreline, points (x, y, z, half-width, half-height);
# x None: against the septum (x = septum offset + half-width), as the frontal horn and the body are.
_VENTRICLE_POINTS = (
    (None, 28.0, 8.0, 2.5, 4.0),    # 0 frontal horn tip
    (None, 18.0, 12.0, 4.5, 7.0),   # 1 frontal horn
    (None, 5.0, 17.0, 5.0, 5.5),    # 2 body, anterior
    (None, -10.0, 20.0, 5.5, 4.5),  # 3 body
    (13.0, -22.0, 19.0, 6.5, 5.5),  # 4 body, posterior
    (19.0, -32.0, 14.0, 8.0, 8.0),  # 5 atrium (trigone)
    (21.0, -50.0, 10.0, 3.0, 3.5),  # 6 occipital horn
    (27.0, -30.0, 2.0, 4.5, 5.0),   # 7 temporal horn
    (30.0, -16.0, -9.0, 3.0, 3.5),  # 8
    (31.0, -2.0, -15.0, 2.0, 2.5),  # 9 temporal horn tip
)
_VENTRICLE_SEGMENTS = ((0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (5, 7), (7, 8), (8, 9))


def _tube_distance(p: tuple[np.ndarray, ...], a: tuple, b: tuple) -> np.ndarray:
    """Approximate signed distance (mm, positive inside) to a tube from a to b whose elliptic
    section (half-width in x and y, half-height in z) tapers linearly; a, b = (x, y, z, w, h)."""
    axis = [bi - ai for ai, bi in zip(a[:3], b[:3])]
    length2 = sum(c * c for c in axis) + 1e-6
    rel = [pi - ai for pi, ai in zip(p, a[:3])]
    t = np.clip(sum(r * c for r, c in zip(rel, axis)) / length2, 0.0, 1.0)
    w = a[3] + t * (b[3] - a[3])
    h = a[4] + t * (b[4] - a[4])
    off = [r - t * c for r, c in zip(rel, axis)]
    q = np.sqrt((off[0] / w) ** 2 + (off[1] / w) ** 2 + (off[2] / h) ** 2)
    return (1.0 - q) * np.minimum(w, h)


def sample_anatomy(
    rng: np.random.Generator,
    n: int,
    heights: np.ndarray,
    head_semi_axis: float,
    lesions: bool,
    skull: bool = True,
) -> Anatomy:
    """Draw one random subject and sample it on axial slices.

    Args:
        rng: source of all randomness for this subject.
        n: in-plane matrix size N.
        heights: `(S,)` slice heights in unit head space (-1 = bottom of the head, 1 = vertex);
            contiguous slices: their spacing is taken as the slice thickness.
        head_semi_axis: antero-posterior semi-axis of an average head (REFERENCE_HEAD_SEMI_AXIS_MM)
            in units of half the FOV; it sets the millimetres per pixel.
        lesions: add a glioma-like lesion (BraTS-like subjects).
        skull: False gives the skull-stripped head: everything outside the brain mask is air.

    Returns:
        The anatomy, arrays `(S, n, n)`.
    """
    s = len(heights)
    shape = (s, n, n)
    mm = REFERENCE_HEAD_SEMI_AXIS_MM / head_semi_axis  # millimetres per half FOV
    dx = 2.0 * mm / n
    grid = ((np.arange(n, dtype=np.float32) - n // 2) * (2.0 / n) * mm).astype(np.float32)
    z_img = (heights.astype(np.float32) * (HEAD_HEIGHT_RATIO * REFERENCE_HEAD_SEMI_AXIS_MM))
    dz = float(np.median(np.diff(z_img))) if s > 1 else dx
    voxel = _Voxel(dx, dz, s)

    # Subject: size, proportions, ageing, pose and a smooth shape warp.
    size = float(np.clip(rng.normal(1.0, 0.045), 0.9, 1.1))
    semi = (_BRAIN_SEMI_AXES_MM[0] * size * rng.uniform(0.92, 1.06),
            _BRAIN_SEMI_AXES_MM[1] * size * rng.uniform(0.97, 1.03),
            _BRAIN_SEMI_AXES_MM[2] * size * rng.uniform(0.95, 1.05))
    atrophy = float(rng.beta(1.6, 3.0))  # 0 = young adult, 1 = marked age-related atrophy
    yaw, pitch = math.radians(rng.uniform(-8, 8)), math.radians(rng.uniform(-6, 6))
    tx, ty, tz = rng.uniform(-4, 4), rng.uniform(-4, 4), rng.uniform(-3, 3)

    x_img, y_img = grid[None, None, :], -grid[None, :, None]  # row 0 is anterior
    zz = z_img[:, None, None] - tz
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    xr = cy * (x_img - tx) + sy * (y_img - ty)
    yr = -sy * (x_img - tx) + cy * (y_img - ty)
    warp = 2.5 * size
    x = xr + warp * smooth_field(rng, z_img, grid, grid, 45.0)
    y = cp * yr - sp * zz + warp * smooth_field(rng, z_img, grid, grid, 45.0)
    z = sp * yr + cp * zz + warp * smooth_field(rng, z_img, grid, grid, 45.0)

    # Brain envelope: an egg-shaped ellipsoid (narrower at the front) with a bumpy surface.
    lr = semi[0] * (1.0 - 0.07 * y / semi[1])
    q = np.sqrt((x / lr) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2)
    grad_q = np.sqrt((x / lr**2) ** 2 + (y / semi[1] ** 2) ** 2 + (z / semi[2] ** 2) ** 2)
    depth = (1.0 - q) * q / (grad_q + 1e-6) + 1.5 * smooth_field(rng, z_img, grid, grid, 30.0)
    env_norm, env_width = voxel.normal_width(depth)
    depth_mm = depth / env_norm  # distance below the pial envelope, negative outside

    painter = _Painter(shape)
    csf_layer = _paint_head(rng, painter, voxel, depth_mm, env_width, (x, y, z), semi, atrophy, z_img, grid)

    # Cortex: CSF clefts (sulci, fissures) and the grey-matter ribbon that lines all CSF.
    thickness = ((rng.normal(2.55, 0.12) - 0.3 * atrophy)
                 * (1.0 + 0.12 * smooth_field(rng, z_img, grid, grid, 30.0))).astype(np.float32)
    clefts = _clefts(rng, voxel, (x, y, z), depth_mm, env_width, size, atrophy, z_img, grid)

    def within(c: np.ndarray | float) -> np.ndarray:
        """Box-filtered share of each voxel closer than c (mm) to CSF (outside the envelope or
        in a cleft); the shares of the parts combine as independent events."""
        away = 1.0 - _ramp((c - depth_mm) / env_width)
        for cleft in clefts:
            away = away * (1.0 - cleft(c))
        return 1.0 - away

    csf = within(0.0)
    near = within(thickness)
    cavity = _ramp((depth_mm + csf_layer) / env_width)  # inside the inner table of the skull
    painter.fill(cavity, {"csf": csf, "gm": near - csf, "wm": 1.0 - near})

    _paint_deep(rng, painter, voxel, (x, y, z), size, atrophy)

    coarse = smooth_field(rng, z_img, grid, grid, 9.0)
    fine = fine_field(rng, shape, sigma_px=0.8)
    if lesions:
        _paint_lesion(rng, painter, voxel, (x, y, z), coarse, z_img, cavity * (1.0 - csf))

    brain = _ramp((depth_mm + 1.0) / env_width) >= 0.5
    if not skull:  # what a skull-stripping tool leaves: the brain mask, air around it
        fractions = painter.fractions
        for name in ("scalp", "fat", "bone", "marrow"):
            fractions["air"] += fractions[name]
            fractions[name][:] = 0.0
        for name, frac in fractions.items():
            frac[~brain] = 1.0 if name == "air" else 0.0
    return Anatomy(fractions=painter.fractions, coarse=coarse, fine=fine, brain=brain)


def _paint_head(rng: np.random.Generator, painter: _Painter, voxel: _Voxel, depth: np.ndarray,
                width: np.ndarray, p: tuple[np.ndarray, ...], semi: tuple[float, float, float],
                atrophy: float, z_img: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Scalp (skin, galea, temporalis), subcutaneous fat and skull (outer table, diploe, inner
    table), as layers outside the brain envelope; thicknesses vary smoothly over the head.
    Returns the thickness (mm) of the CSF layer between the envelope and the inner table."""
    fields = [smooth_field(rng, z_img, grid, grid, 50.0) for _ in range(2)]

    def varying(mean: float, spread: float) -> np.ndarray:
        angle = rng.uniform(0, 2 * np.pi)
        return mean * np.exp(spread * (math.cos(angle) * fields[0] + math.sin(angle) * fields[1]))

    x, y, z = p
    lateral = np.clip((np.abs(x) / semi[0] - 0.55) / 0.3, 0.0, 1.0)
    temporalis = 6.0 * lateral * np.exp(-((z + 12.0) / 22.0) ** 2 - ((y - 5.0) / 40.0) ** 2)
    layers = (  # (tissue, thickness mm) from the brain outwards
        ("csf", 1.6 * (1.0 + 1.5 * atrophy) * varying(1.0, 0.2)),  # subarachnoid CSF and dura
        ("bone", varying(1.4 * rng.uniform(0.8, 1.2), 0.15)),        # inner table
        ("marrow", varying(2.6 * rng.uniform(0.7, 1.4), 0.3)),       # diploe
        ("bone", varying(1.8 * rng.uniform(0.8, 1.2), 0.15)),        # outer table
        ("fat", varying(3.5 * rng.uniform(0.6, 1.4), 0.35)),
        ("scalp", varying(2.2 * rng.uniform(0.8, 1.2), 0.2) + temporalis),
    )
    offsets = []
    for _, thickness in layers:
        offsets.append(thickness if not offsets else offsets[-1] + thickness)
    for (name, _), offset in zip(layers[::-1], offsets[::-1]):
        painter.paint(name, _ramp((depth + offset) / width))
    return offsets[0]


def _clefts(rng: np.random.Generator, voxel: _Voxel, p: tuple[np.ndarray, ...], depth: np.ndarray,
            env_width: np.ndarray, size: float, atrophy: float, z_img: np.ndarray,
            grid: np.ndarray) -> list:
    """The CSF clefts inside the envelope: sulci, interhemispheric fissure, insular cistern and
    Sylvian fissure. Each is a function c -> box-filtered share of the voxel closer than c mm to
    that cleft's CSF."""
    x, y, z = p
    # Sulci: sheets under the zero lines of a folding field on a sphere, bent by a smooth warp so
    # that they curve on their way in, and shallow where the field branches (weak gradient).
    # Computed only in the cortical shell.
    deepest = 24.0 * size
    shell = np.flatnonzero((depth > -4.0) & (depth < deepest + 4.0))
    bend = 4.0 * np.clip(depth, 0.0, 20.0) / 12.0  # radial at the surface, curving deeper in
    bent = (x + bend * smooth_field(rng, z_img, grid, grid, 20.0 * size),
            y + bend * smooth_field(rng, z_img, grid, grid, 20.0 * size), z)
    # Stretched along z: on the lateral convexity more sulci cross axial slices steeply (the
    # central, pre- and postcentral sulci run from the vertex downwards).
    q = [c.reshape(-1)[shell] * s for c, s in zip(np.broadcast_arrays(*bent), (1.0, 1.0, 0.6))]
    wavelength = 15.0 * size * rng.uniform(0.9, 1.1)
    g, grad = _waves_on_sphere(rng, tuple(q), 24, wavelength, 68.0 * size)
    grad = (grad[0], grad[1], grad[2] * 0.6)  # back to unstretched z
    grad_norm = np.sqrt(grad[0] ** 2 + grad[1] ** 2 + grad[2] ** 2) + 1e-6
    typical = (2 * np.pi / wavelength) * math.sqrt(2.0 / 3.0)
    depth_field, _ = _waves_on_sphere(rng, tuple(q), 8, 45.0 * size, 68.0 * size)

    def scatter(values: np.ndarray, background: float) -> np.ndarray:
        out = np.full(depth.shape, background, np.float32)
        out.reshape(-1)[shell] = values
        return out

    u = scatter(np.abs(g) / grad_norm, 1e3)  # distance to the sulcal mid-plane
    width = scatter(voxel.width(np.sqrt(grad[0] ** 2 + grad[1] ** 2) / grad_norm,
                                np.abs(grad[2]) / grad_norm), voxel.dx)
    sulcal_depth = scatter(np.minimum(rng.uniform(16.0, 19.0) * size * np.clip(1.0 + 0.4 * depth_field, 0.3, 1.6)
                                      * np.clip(grad_norm / typical, 0.5, 1.1), deepest), 0.0)
    half = (0.2 + 0.6 * atrophy) + 0.25 * np.maximum(3.0 - depth, 0.0)  # the mouth opens wider

    def sulci(c):
        return _slab(u, half + c, width) * _ramp((sulcal_depth + c - depth) / env_width)

    # Interhemispheric fissure, everywhere but over the corpus callosum and the diencephalon
    # (an ellipse in the mid-sagittal plane from genu to splenium).
    ac = tuple(a * size for a in AC_POSITION_MM)
    midline = x - 1.5 * size * np.tanh((y - ac[1]) / 40.0) * rng.uniform(-1, 1)
    ly, lz = 37.0 * size, 32.0 * size
    ell = np.sqrt(((y - ac[1] + 4.0 * size) / ly) ** 2 + ((z - ac[2] + 8.0 * size) / lz) ** 2)
    beyond = (ell - 1.0) * lz  # ~ mm above/around the callosal arch
    beyond_norm, beyond_width = voxel.normal_width(beyond)
    beyond = beyond / beyond_norm
    mid_width = voxel.width(np.ones_like(x), np.zeros_like(x))
    fissure_half = 0.6 + 1.2 * atrophy

    def fissure(c):
        return _slab(np.abs(midline), fissure_half + c, mid_width) * _ramp((beyond + c) / beyond_width)

    # Insular cistern: a vertical sheet lateral to the insula, bowed outwards; the Sylvian fissure
    # joins it to the lateral surface as an oblique sheet rising backwards.
    yi, zi = y - ac[1], z - ac[2]
    x_insula = (38.0 * size + 0.002 * yi**2 / size) * rng.uniform(0.96, 1.04)
    along = np.maximum(np.abs(yi - 2.0 * size) / (22.0 * size), np.abs(zi - 4.0 * size) / (15.0 * size))
    extent = (1.0 - along) * 15.0 * size  # ~ mm inside the cistern's outline
    cistern_half = 0.5 + 1.0 * atrophy
    slope = math.tan(math.radians(rng.uniform(15, 30)))
    sylvian = (zi - (-2.0 * size + slope * (-yi))) * math.cos(math.atan(slope))
    sylvian_width = voxel.width(np.full_like(x, math.sin(math.atan(slope))),
                                np.full_like(x, math.cos(math.atan(slope))))
    lateral = np.abs(x) - x_insula
    sylvian_extent = np.minimum(lateral, (1.0 - np.abs(yi - 2.0 * size) / (30.0 * size)) * 15.0 * size)

    def insula(c):
        cistern = _slab(np.abs(lateral), cistern_half + c, mid_width) * _ramp((extent + c) / mid_width)
        stem = (_slab(np.abs(sylvian), cistern_half + c, sylvian_width)
                * _ramp((sylvian_extent + c) / mid_width))
        return 1.0 - (1.0 - cistern) * (1.0 - stem)

    return [sulci, fissure, insula]


def _paint_deep(rng: np.random.Generator, painter: _Painter, voxel: _Voxel,
                p: tuple[np.ndarray, ...], size: float, atrophy: float) -> None:
    """Deep grey nuclei, then the ventricles over them (computed in a box around them)."""
    ac = tuple(a * size for a in AC_POSITION_MM)
    near = (np.abs(p[0]) < 50.0 * size) & (np.abs(p[1] - ac[1] + 10.0 * size) < 60.0 * size)
    rows, cols = np.flatnonzero(near.any(axis=(0, 2))), np.flatnonzero(near.any(axis=(0, 1)))
    if not len(rows) or not len(cols):
        return
    box = np.s_[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    x, y, z = (np.broadcast_to(c, near.shape)[box] for c in p)
    pa = (np.abs(x), y - ac[1], z - ac[2])  # both hemispheres at once, relative to the AC

    def scaled(centre, semi_axes):
        return tuple(c * size for c in centre), tuple(a * size for a in semi_axes)

    # Caudate (head and body line the frontal horn and the body of the ventricle; larger
    # ventricles, painted last, take its space as the caudate shrinks with atrophy), lentiform
    # nucleus, and the thalamus: grey matter crossed by many myelinated fibres, half deep grey.
    d_deep = np.full_like(x, -1e3)
    for centre, semi_axes in _CAUDATE + _LENTIFORM:
        d_deep = np.maximum(d_deep, _ellipsoid_distance(pa, *scaled(centre, semi_axes)))
    painter.paint("deep_gm", voxel.fraction(d_deep), box)
    thalamus = voxel.fraction(_ellipsoid_distance(pa, *scaled(*_THALAMUS)))
    painter.fill(thalamus, {"deep_gm": 0.5, "wm": 0.5}, box)

    # Lateral ventricles, on each side of the septum pellucidum, and the third ventricle.
    vent = (0.75 + 1.3 * atrophy) * math.exp(rng.normal(0.0, 0.15))
    septum = 0.8 * size
    d_vent = np.full_like(x, -1e3)
    for sign in (1.0, -1.0):
        grow = vent * math.exp(rng.normal(0.0, 0.06))  # left and right differ a little
        points = []
        for px, py, pz, w, h in _VENTRICLE_POINTS:
            w, h = w * size * grow, h * size * grow**0.7
            px = septum + w if px is None else px * size * (1.0 + 0.15 * (grow - 1.0))
            points.append((px, py * size, pz * size, w, h))
        side = (sign * x, pa[1], pa[2])
        for i, j in _VENTRICLE_SEGMENTS:
            d_vent = np.maximum(d_vent, _tube_distance(side, points[i], points[j]))
    third = _ellipsoid_distance((x, pa[1], pa[2]), (0.0, -8.0 * size, 3.0 * size),
                                (1.5 * size * vent**0.8, 13.0 * size, 8.0 * size))
    painter.paint("csf", voxel.fraction(np.maximum(d_vent, third)), box)


def _paint_lesion(rng: np.random.Generator, painter: _Painter, voxel: _Voxel,
                  p: tuple[np.ndarray, ...], coarse: np.ndarray, z_img: np.ndarray,
                  parenchyma: np.ndarray) -> None:
    """One or two glioma-like lesions: oedema around a solid tumour, often with a necrotic core."""
    x, y, z = p
    lo, hi = float(z_img.min()), float(z_img.max())
    for _ in range(1 if rng.random() < 0.7 else 2):
        side = 1.0 if rng.random() < 0.5 else -1.0
        centre = (side * rng.uniform(16.0, 40.0), rng.uniform(-42.0, 42.0),
                  rng.uniform(lo + 0.3 * (hi - lo), lo + 0.8 * (hi - lo)))
        radius = rng.uniform(9.0, 20.0)
        d = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
        d = d + 0.25 * radius * coarse  # irregular outline
        painter.paint("oedema", parenchyma * voxel.fraction(radius - d))
        painter.paint("tumour", parenchyma * voxel.fraction(0.55 * radius - d))
        if rng.random() < 0.6:
            painter.paint("necrosis", parenchyma * voxel.fraction(0.3 * radius - d))
