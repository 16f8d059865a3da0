"""Statistics of the synthetic anatomy and images, to compare with what is reported for real brains.

    python -m data.anatomy_stats [--subjects 6] [--seed 0]

prints, for subjects drawn as the synthetic sites draw them: tissue volume shares of the
intracranial volume, cortical thickness (measured on thin slices), grey/white and CSF/grey signal
ratios of each site's T1 and T2 images at its field strength, and the slope of the radially averaged
power spectrum of the images (noise-free and as each site stores them). `docs/synthetic_anatomy.md`
sets these numbers beside the literature's.
"""

import argparse
import sys

import numpy as np

from data.brain_anatomy import HEAD_HEIGHT_RATIO, REFERENCE_HEAD_SEMI_AXIS_MM, Anatomy, sample_anatomy
from data.phantom import HeadPhantom, sample_head
from data.sequences import Sequence
from data.synthetic import SITES, SyntheticConfig, _slice_heights, generate_subject, native_size

__all__ = ["contrast_ratios", "cortical_thickness_mm", "radial_power_slope", "volume_shares"]

_BRAIN_TISSUES = ("csf", "gm", "wm", "deep_gm")


def volume_shares(anatomy: Anatomy) -> dict[str, float]:
    """Share of the intracranial volume (CSF + grey + white + deep grey) of each of those tissues."""
    totals = {name: float(anatomy.fractions[name].sum()) for name in _BRAIN_TISSUES}
    icv = sum(totals.values())
    return {name: value / icv for name, value in totals.items()}


def cortical_thickness_mm(anatomy: Anatomy, voxel_mm: float, slice_mm: float) -> float:
    """Mean cortical thickness: cortical grey-matter volume over the mean area of its two
    surfaces (pial, against CSF, and white, against white matter).

    The summed area of both is the integral of |grad f| over the volume for the soft grey-matter
    indicator f (coarea formula); it leaves out the ventricle walls and the deep nuclei. Two banks
    that touch across a sulcal cleft thinner than a voxel count less pial area, which biases the
    estimate up; use thin slices (slice_mm near voxel_mm) to resolve the folds.
    """
    gm = anatomy.fractions["gm"]
    gz, gy, gx = np.gradient(gm, slice_mm, voxel_mm, voxel_mm)
    inner = np.s_[1:-1]  # the first and last slice cut the volume: no surface there
    areas = float(np.sqrt(gx**2 + gy**2 + gz**2)[inner].sum()) * voxel_mm**2 * slice_mm
    volume = float(gm[inner].sum()) * voxel_mm**2 * slice_mm
    return volume / (0.5 * areas)


def contrast_ratios(phantom: HeadPhantom, sequence: Sequence, field_strength_t: float) -> dict[str, float]:
    """GM/WM and CSF/GM ratios of mean signal over voxels at least 90% of one tissue."""
    image = phantom.image(sequence, field_strength_t)
    means = {name: float(image[phantom.fractions[name] > 0.9].mean()) for name in ("gm", "wm", "csf")}
    return {"gm/wm": means["gm"] / means["wm"], "csf/gm": means["csf"] / means["gm"]}


def radial_power_slope(image: np.ndarray, band: tuple[float, float] = (0.02, 0.25)) -> float:
    """Slope of log power against log spatial frequency of an `(N, N)` image (Hann-windowed,
    radially averaged), fitted over `band` in cycles per pixel: about -alpha for 1/f^alpha."""
    n = image.shape[0]
    window = np.outer(np.hanning(n), np.hanning(n))
    power = np.abs(np.fft.fftshift(np.fft.fft2((image - image.mean()) * window))) ** 2
    f = np.fft.fftshift(np.fft.fftfreq(n))
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    edges = np.linspace(band[0], band[1], 25)
    centres, values = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        ring = (radius >= lo) & (radius < hi)
        if ring.any():
            centres.append(0.5 * (lo + hi))
            values.append(power[ring].mean())
    slope, _ = np.polyfit(np.log(centres), np.log(values), 1)
    return float(slope)


def _thin_slab_subject(seed: int) -> tuple[Anatomy, float, float]:
    """A subject on 1.2 mm isotropic voxels over 36 mm around the ventricles, for thickness."""
    n, fov_mm = 192, 230.0
    voxel = fov_mm / n
    slice_mm = 1.2
    step = slice_mm / (HEAD_HEIGHT_RATIO * REFERENCE_HEAD_SEMI_AXIS_MM)
    heights = (0.15 + step * (np.arange(30) - 15)).astype(np.float32)
    anatomy = sample_anatomy(np.random.default_rng(seed), n, heights,
                             REFERENCE_HEAD_SEMI_AXIS_MM / (0.5 * fov_mm), lesions=False)
    return anatomy, voxel, slice_mm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.anatomy_stats", description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=6, help="subjects per statistic (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = parser.parse_args(argv)
    config = SyntheticConfig(seed=args.seed)
    seeds = [args.seed * 1000 + i for i in range(args.subjects)]

    shares, thickness = [], []
    for seed in seeds:
        anatomy, voxel, slice_mm = _thin_slab_subject(seed)
        shares.append(volume_shares(anatomy))
        thickness.append(cortical_thickness_mm(anatomy, voxel, slice_mm))
    print("intracranial volume shares in the ventricle-to-vertex slab (mean +- sd over subjects):")
    for name in _BRAIN_TISSUES:
        values = np.array([s[name] for s in shares])
        print(f"  {name:8s} {values.mean():.3f} +- {values.std():.3f}")
    print(f"cortical thickness (1.2 mm voxels): {np.mean(thickness):.2f} +- {np.std(thickness):.2f} mm")

    heights, _ = _slice_heights(config.slices)
    print("signal ratios over pure-tissue voxels, noise-free (mean over subjects):")
    for site, spec in SITES.items():
        if spec.anatomy != "head":
            continue
        n = native_size(site, config.resolution)
        head = REFERENCE_HEAD_SEMI_AXIS_MM / (0.5 * spec.fov_mm / config.resolution * n)
        phantoms = [sample_head(np.random.default_rng(seed), n, heights, head, lesions=False,
                                skull=spec.skull) for seed in seeds]
        for sequence, protocol in spec.sequences.items():
            ratios = [contrast_ratios(p, protocol, spec.field_strength_t) for p in phantoms]
            slopes = [radial_power_slope(p.image(protocol, spec.field_strength_t)[s])
                      for p in phantoms for s in range(3, len(heights), 4)]
            print(f"  {site} {sequence} {spec.field_strength_t} T {protocol}: "
                  f"GM/WM {np.mean([r['gm/wm'] for r in ratios]):.2f}  "
                  f"CSF/GM {np.mean([r['csf/gm'] for r in ratios]):.2f}  "
                  f"spectral slope (noise-free) {np.mean(slopes):.2f} +- {np.std(slopes):.2f}")

    print("spectral slope of the stored site images (noise, blur, shading; 2 subjects):")
    for site in SITES:
        slopes: dict[str, list[float]] = {}
        for volume in (v for i in range(2) for v in generate_subject(config, site, "train", i)):
            stack = volume.target if volume.target is not None else volume.image
            slopes.setdefault(volume.sequence, []).extend(
                radial_power_slope(stack[s]) for s in range(3, stack.shape[0], 4))
        print("  " + site + "  " + "  ".join(f"{seq} {np.mean(v):.2f} +- {np.std(v):.2f}"
                                           for seq, v in slopes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
