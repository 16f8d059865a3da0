"""MRAugment (Fabian, Heckel, Soltanolkotabi; ICML 2021): physics-aware augmentation of training slices.

The fully sampled complex image of every coil is transformed (one random transform shared by all
coils), k-space is re-simulated from the augmented images by the centred orthonormal FFT, and the
target is recomputed from them (root-sum-of-squares over coils for multicoil, magnitude for
singlecoil and image sites); only then does the task's own transform mask and normalise the slice.
So the network always sees measurements that the scanner could have produced.

Transforms, in this order, each firing with probability ``weight_i * p(t)``:

- pixel preserving: horizontal flip (``fliph``, the width axis), vertical flip (``flipv``),
  rotation by k x 90 degrees (``rot90``, k in {1, 2, 3}), integer translation (``translation``,
  reflect padded as MRAugment does);
- interpolating, merged into one affine map ``rotation @ shearing @ scaling`` (the paper's form:
  an angle, one shear parameter along x, and independent scale factors along x and y, which spans
  every orientation-preserving linear map), resampled once by ``grid_sample`` (bilinear, order 1,
  or bicubic, order 3) with reflection padding on the real and imaginary parts, optionally on an
  image upsampled by ``upsample_factor`` first.

Differences from MRAugment's code (z-fabian/MRAugment 5c14e77), where it is wrong or cannot express
the paper:

- its affine has one isotropic scale and shears along x and y (torchvision's form); here one shear
  and scaling along x and y, as the paper. MRAugment's ``--aug_max_shearing_y`` therefore has no
  counterpart.
- ``--aug_interpolation_order`` is honoured (MRAugment always used bilinear).
- ``--aug_max_translation_x`` is a fraction of the width and ``_y`` of the height, as its help says
  (its code scales x by the height).
- draws come from a generator keyed by the dataset's per-slice, per-epoch seed, not from a
  per-worker ``RandomState``: the same for any ``--num_workers``, and reproducible after a resume.
- the schedule time lives in shared memory, so persistent DataLoader workers see ``set_time``.
- after an odd rot90 of non-square k-space the header padding is recomputed (see
  ``AugmentedTransform``) instead of cutting columns off the rotated k-space.
- slices without a target (test data) pass through; validation and test are never augmented.
- interpolation pads by reflection about the border (``grid_sample``'s reflection, numpy's
  "symmetric"); MRAugment reflect-pads excluding the border pixel. Translation is as MRAugment's.
"""
from __future__ import annotations

import argparse
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from data.subsample import Seed
from data.transforms import center_crop, fft2c, ifft2c, rss
from utils.errors import UserError

SCHEDULES = ("constant", "ramp", "exp")
# The paper's experiment configs (MRAugment's mraugment_examples/experiments/*.yaml).
PAPER_WEIGHTS = {"translation": 1.0, "rotation": 0.5, "shearing": 1.0, "scaling": 1.0,
                 "rot90": 0.5, "fliph": 0.5, "flipv": 0.5}
INTERPOLATION = {1: "bilinear", 3: "bicubic"}


def schedule_p(t: float, total: int, *, schedule: str, strength: float, delay: int,
               exp_decay: float) -> float:
    """MRAugment's p(t): the probability scale at time ``t`` (0-based) of ``total`` planned steps.

    ``p = 0`` for ``t < delay``; after it, with ``s = (t - delay) / (total - delay)``:
    constant ``strength``; ramp ``s * strength``; exp
    ``strength * (1 - exp(-exp_decay * s)) / (1 - exp(-exp_decay))``.
    """
    if t < delay:
        return 0.0
    if schedule == "constant":
        return strength
    s = (t - delay) / (total - delay)
    if schedule == "ramp":
        return s * strength
    if schedule == "exp":
        return strength * (1.0 - math.exp(-exp_decay * s)) / (1.0 - math.exp(-exp_decay))
    raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")


def schedule_length(opts: argparse.Namespace, per_epoch: bool) -> int:
    """T, the planned number of schedule steps: rounds (``--epochs``) for federated strategies, where
    every client follows the global round; epochs (``--epochs x --local_ep``) when ``per_epoch``
    (central and local training, which exchange nothing and so follow MRAugment's own per-epoch
    schedule; see ``Strategy.schedule_per_epoch``)."""
    return opts.epochs * opts.local_ep if per_epoch else opts.epochs


@dataclass(frozen=True)
class AugmentConfig:
    """What MRAugment draws from; the defaults are the paper's experiment configs.

    Attributes:
        strength: p_max of the schedule, in [0, 1].
        schedule: one of ``SCHEDULES``. delay: steps without augmentation. exp_decay: the exp
            schedule's rate (1 is close to linear, 10 close to a step).
        weights: per-transform factor of p(t) (``PAPER_WEIGHTS`` keys).
        max_translation: (x, y) as fractions of the width and the height.
        max_rotation: degrees. max_shearing: degrees, of the one shear along x.
        max_scaling: each scale factor is drawn from [1 - max_scaling, 1 + max_scaling].
        interpolation_order: 1 bilinear, 3 bicubic.
        upsample: resample the affine on an image upsampled by ``upsample_factor`` (interpolated
            with ``upsample_order``), then resize back.
        max_train_resolution: (h, w): augmented images larger than this are centre-cropped.
    """
    strength: float = 0.55
    schedule: str = "exp"
    delay: int = 0
    exp_decay: float = 5.0
    weights: Mapping[str, float] = field(default_factory=lambda: dict(PAPER_WEIGHTS))
    max_translation: tuple[float, float] = (0.125, 0.08)
    max_rotation: float = 180.0
    max_shearing: float = 15.0
    max_scaling: float = 0.25
    interpolation_order: int = 1
    upsample: bool = False
    upsample_factor: int = 2
    upsample_order: int = 1
    max_train_resolution: tuple[int, int] | None = None

    @classmethod
    def from_options(cls, opts: argparse.Namespace) -> AugmentConfig:
        """The configuration of ``add_augment_arguments``' flags (checked by ``check_augment_options``)."""
        return cls(
            strength=opts.aug_strength, schedule=opts.aug_schedule, delay=opts.aug_delay,
            exp_decay=opts.aug_exp_decay,
            weights={name: getattr(opts, f"aug_weight_{name}") for name in PAPER_WEIGHTS},
            max_translation=(opts.aug_max_translation_x, opts.aug_max_translation_y),
            max_rotation=opts.aug_max_rotation, max_shearing=opts.aug_max_shearing_x,
            max_scaling=opts.aug_max_scaling, interpolation_order=opts.aug_interpolation_order,
            upsample=opts.aug_upsample, upsample_factor=opts.aug_upsample_factor,
            upsample_order=opts.aug_upsample_order,
            max_train_resolution=(tuple(opts.max_train_resolution)
                                  if opts.max_train_resolution is not None else None),
        )


class AugmentParams(NamedTuple):
    """One slice's drawn transform.

    Attributes:
        fliph, flipv: flip the width (columns) / height (rows) axis.
        rot90: k of ``torch.rot90(dims=(-2, -1))``, 0 when it does not fire.
        translation: (rows, columns) by which the content moves down and right.
        affine: 2 x 2 float64 map of centred pixel coordinates (x = column, y = row) from input to
            output, or None when no interpolating transform fires.
    """
    fliph: bool
    flipv: bool
    rot90: int
    translation: tuple[int, int]
    affine: torch.Tensor | None

    @property
    def fired(self) -> bool:
        return self.fliph or self.flipv or self.rot90 != 0 or self.translation != (0, 0) \
            or self.affine is not None


def affine_matrix(angle: float = 0.0, shear: float = 0.0, scale: tuple[float, float] = (1.0, 1.0)
                  ) -> torch.Tensor:
    """``R(angle) @ [[1, tan(shear)], [0, 1]] @ diag(scale_x, scale_y)`` (degrees), float64 (2, 2).

    Coordinates are (x = column, y = row downwards): a positive angle turns the image
    counter-clockwise as displayed with row 0 at the top.
    """
    a, s = math.radians(angle), math.radians(shear)
    rotation = torch.tensor([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]], dtype=torch.float64)
    shearing = torch.tensor([[1.0, math.tan(s)], [0.0, 1.0]], dtype=torch.float64)
    return rotation @ shearing @ torch.diag(torch.tensor(scale, dtype=torch.float64))


def augment_generator(seed: Seed | None) -> torch.Generator | None:
    """The generator of one slice's draws, keyed by the dataset's per-slice seed ``(epoch seed,
    slice, *file name)``; None (torch's global generator) when the dataset has no epoch seed.

    A digest of the seed, so that it is the same in every process and independent of the mask's
    ``RandomState`` stream drawn from the same seed.
    """
    if seed is None:
        return None
    key = seed if isinstance(seed, tuple) else (seed,)
    digest = hashlib.blake2b(repr(("mraugment",) + key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


class MRAugment:
    """Draws and applies MRAugment's transforms on complex images ``(..., H, W)`` (all coils alike)."""

    def __init__(self, config: AugmentConfig):
        self.config = config

    def draw(self, p: float, shape: Sequence[int], generator: torch.Generator | None) -> AugmentParams:
        """Draw the transform of one slice of image size ``shape = (H, W)`` at probability scale p.

        Always the same 14 uniforms in the same order, so a larger p only adds transforms to
        the same draws.
        """
        c, w = self.config, self.config.weights
        u = torch.rand(14, generator=generator, dtype=torch.float64).tolist()

        def fires(name: str, i: int) -> bool:
            return u[i] < w[name] * p

        rot90 = 1 + min(int(u[3] * 3), 2) if fires("rot90", 2) else 0
        height, width = (shape[-1], shape[-2]) if rot90 % 2 else (shape[-2], shape[-1])
        translation = (0, 0)
        if fires("translation", 4):
            # int() truncates towards zero as MRAugment; reflect padding needs |shift| < size.
            dx = int((2 * u[5] - 1) * c.max_translation[0] * width)
            dy = int((2 * u[6] - 1) * c.max_translation[1] * height)
            translation = (max(-(height - 1), min(height - 1, dy)), max(-(width - 1), min(width - 1, dx)))
        angle = (2 * u[8] - 1) * c.max_rotation if fires("rotation", 7) else 0.0
        shear = (2 * u[10] - 1) * c.max_shearing if fires("shearing", 9) else 0.0
        scale = ((1 + (2 * u[12] - 1) * c.max_scaling, 1 + (2 * u[13] - 1) * c.max_scaling)
                 if fires("scaling", 11) else (1.0, 1.0))
        interpolating = fires("rotation", 7) or fires("shearing", 9) or fires("scaling", 11)
        return AugmentParams(
            fliph=fires("fliph", 0), flipv=fires("flipv", 1), rot90=rot90, translation=translation,
            affine=affine_matrix(angle, shear, scale) if interpolating else None,
        )

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Complex ``(H, W)`` or ``(C, H, W)`` -> the same shape, with H and W swapped by an odd rot90."""
        lead = images.shape[:-2]
        x = torch.view_as_real(images).movedim(-1, -3)  # (..., 2, H, W)
        x = x.reshape(1, -1, *images.shape[-2:])  # real and imaginary parts of every coil as channels
        if params.fliph:
            x = x.flip(-1)
        if params.flipv:
            x = x.flip(-2)
        if params.rot90:
            x = torch.rot90(x, params.rot90, dims=(-2, -1))
        if params.translation != (0, 0):
            x = translate(x, params.translation)
        if params.affine is not None:
            c = self.config
            x = warp_affine(x, params.affine, c.interpolation_order,
                            c.upsample_factor if c.upsample else 1, c.upsample_order)
        x = x.reshape(*lead, 2, *x.shape[-2:]).movedim(-3, -1).contiguous()
        return torch.view_as_complex(x)


def translate(x: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    """Move the content of ``x`` (N, C, H, W) down by ``shift[0]`` rows and right by ``shift[1]``
    columns, filling from the reflect-padded image (border pixel not repeated); |shift| < size."""
    dy, dx = shift
    height, width = x.shape[-2:]
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="reflect")
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top:top + height, left:left + width]


def warp_affine(x: torch.Tensor, matrix: torch.Tensor, order: int, upsample_factor: int = 1,
                upsample_order: int = 1) -> torch.Tensor:
    """Resample ``x`` (N, C, H, W) real under the centred pixel map ``matrix`` (2, 2, input ->
    output), reflection padded, interpolation ``order`` 1 or 3; upsampled by ``upsample_factor``
    (with ``upsample_order``) before and resized back after when it is above 1."""
    height, width = x.shape[-2:]
    if upsample_factor > 1:
        x = F.interpolate(x, size=(height * upsample_factor, width * upsample_factor),
                          mode=INTERPOLATION[upsample_order], align_corners=False)
    # affine_grid maps output to input in coordinates normalised to [-1, 1] per axis: scale the
    # inverse pixel map by the half sizes so that non-square images are not distorted.
    half = torch.tensor([x.shape[-1] / 2, x.shape[-2] / 2], dtype=torch.float64)
    theta = torch.linalg.inv(matrix) * half[None, :] / half[:, None]
    theta = torch.cat([theta, torch.zeros(2, 1, dtype=torch.float64)], dim=1)
    grid = F.affine_grid(theta[None].to(x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode=INTERPOLATION[order], padding_mode="reflection", align_corners=False)
    if upsample_factor > 1:
        x = F.interpolate(x, size=(height, width), mode=INTERPOLATION[upsample_order], align_corners=False)
    return x


def check_max_train_resolution(size: Sequence[int] | None, shape: Sequence[int], where: str) -> None:
    """Raise ``UserError`` when ``--max_train_resolution`` is larger than the images ``shape`` (H, W)
    of ``where`` (a file or site name)."""
    if size is not None and (size[0] > shape[-2] or size[1] > shape[-1]):
        raise UserError(f"--max_train_resolution {size[0]} {size[1]}: larger than the {shape[-2]} x "
                        f"{shape[-1]} images of {where}; give at most {shape[-2]} {shape[-1]} or leave it out")


class AugmentedTransform:
    """A ``SliceDataset`` transform that MRAugments each slice before the task's transform ``inner``.

    Called as every transform, ``(kspace, mask, target, attrs, fname, slice_num, seed)``: k-space
    complex64 (H, W) singlecoil or (C, H, W) multicoil (image sites: the k-space of the magnitude).
    With p(t) > 0 it rebuilds the coil images (``ifft2c``), augments them, re-simulates k-space
    (``fft2c``), recomputes the target (RSS of the coil images, or the magnitude) centre-cropped to
    the original target's size (or the augmented size, if smaller), and calls ``inner`` with them.
    A slice on which no transform fires (and that ``max_train_resolution`` does not crop) reaches
    ``inner`` untouched, so p = 0 gives exactly the un-augmented samples.

    Time: ``set_time(t, total)`` before each schedule step: t = the round (0-based) of ``total``
    rounds for federated strategies, the epoch of ``--epochs x --local_ep`` for central and local
    (``schedule_length``). It is held in shared memory, so DataLoader workers started earlier
    (persistent workers) read the new value.

    Header padding: ``attrs["padding_left"/"padding_right"]`` is the acquired column range of the
    k-space width. It is mirrored by a horizontal flip (and rot90 by 180 degrees); after an odd
    rot90 the columns are the former readout rows, all acquired, so it becomes (0, new width);
    a ``max_train_resolution`` crop of the width scales it about the centre. Non-square slices
    rotated by an odd rot90 come out with H and W swapped (batch them with others of their shape, as
    MRAugment's batch size 1 did). The file's stored ``mask`` is dropped when the width changes.
    ``attrs["max"]`` stays the original volume's, as MRAugment.
    """

    def __init__(self, inner: Any, augmentor: MRAugment):
        self.inner = inner
        self.augmentor = augmentor
        self._time = torch.full((2,), math.nan, dtype=torch.float64).share_memory_()

    def set_time(self, t: int, total: int) -> None:
        """Set the schedule time: step ``t`` (0-based) of ``total`` planned steps."""
        if total < 1 or not 0 <= t:
            raise ValueError(f"schedule time needs 0 <= t and total >= 1, got t={t}, total={total}")
        self._time[0], self._time[1] = float(t), float(total)

    def probability(self) -> float:
        """p(t) at the time last set."""
        t, total = self._time.tolist()
        if math.isnan(t):
            raise RuntimeError("AugmentedTransform.set_time(t, total) must be called before the first slice")
        c = self.augmentor.config
        return schedule_p(t, int(total), schedule=c.schedule, strength=c.strength, delay=c.delay,
                          exp_decay=c.exp_decay)

    def __call__(self, kspace: np.ndarray, mask: np.ndarray | None, target: np.ndarray | None,
                 attrs: Mapping[str, Any], fname: str, slice_num: int, seed: Seed | None = None) -> Any:
        crop = self.augmentor.config.max_train_resolution
        check_max_train_resolution(crop, kspace.shape, fname)
        p = self.probability()
        params = self.augmentor.draw(p, kspace.shape[-2:], augment_generator(seed)) if p > 0 else None
        crops = crop is not None and tuple(kspace.shape[-2:]) != tuple(crop)
        if not crops and (params is None or not params.fired):
            return self.inner(kspace, mask, target, attrs, fname, slice_num, seed)

        images = ifft2c(torch.from_numpy(kspace))
        if params is not None and params.fired:
            images = self.augmentor.apply(images, params)
        if crop is not None:
            images = center_crop(images, (min(crop[0], images.shape[-2]), min(crop[1], images.shape[-1])))
        if target is not None:
            magnitude = rss(images, dim=0) if images.ndim == 3 else images.abs()
            size = (min(target.shape[-2], images.shape[-2]), min(target.shape[-1], images.shape[-1]))
            target = center_crop(magnitude, size).numpy().copy()
        new_attrs = dict(attrs)
        width = kspace.shape[-1]
        if "padding_left" in attrs:
            new_attrs["padding_left"], new_attrs["padding_right"] = acquired_columns(
                attrs["padding_left"], attrs["padding_right"], width, params, images.shape[-1])
        if images.shape[-1] != width:
            mask = None
        return self.inner(fft2c(images).numpy(), mask, target, new_attrs, fname, slice_num, seed)


def acquired_columns(left: int, right: int, width: int, params: AugmentParams | None,
                     new_width: int) -> tuple[int, int]:
    """The acquired k-space columns ``[left, right)`` of a ``width``-wide slice after ``params`` and
    a centre crop of the image to ``new_width`` columns (see ``AugmentedTransform``)."""
    mirrors = params is not None and (params.fliph != (params.rot90 == 2))
    if params is not None and params.rot90 % 2:
        return 0, new_width
    if mirrors:
        # The centred FFT maps column j of a flipped image to W - j (W even) or W - 1 - j (W odd).
        shift = 1 if width % 2 == 0 else 0
        left, right = max(0, width - right + shift), min(width, width - left + shift)
    if new_width != width:
        centre, new_centre = width // 2, new_width // 2
        left = max(0, new_centre - round((centre - left) * new_width / width))
        right = min(new_width, new_centre + round((right - centre) * new_width / width))
    return left, right


def with_augmentation(transform: Any, opts: argparse.Namespace, train: bool) -> Any:
    """``transform`` wrapped in MRAugment for training sets when ``--aug_on``; otherwise (validation,
    test, or augmentation off) ``transform`` itself."""
    if not (train and opts.aug_on):
        return transform
    return AugmentedTransform(transform, MRAugment(AugmentConfig.from_options(opts)))


def add_augment_arguments(group: argparse._ArgumentGroup) -> None:
    """MRAugment's flags, named as in its code; defaults from the paper's experiment configs."""
    d = AugmentConfig()
    group.add_argument("--aug_on", action="store_true",
                       help="MRAugment the training slices of every client (validation and test never)")
    group.add_argument("--aug_strength", type=float, default=d.strength,
                       help="p_max: the schedule's largest probability scale, in [0, 1]")
    group.add_argument("--aug_schedule", default=d.schedule,
                       help="p(t) after the delay: constant, ramp (linear to p_max at the end) or exp")
    group.add_argument("--aug_delay", type=int, default=d.delay,
                       help="steps without augmentation at the start: rounds, or epochs for "
                            "--strategy central/local")
    group.add_argument("--aug_exp_decay", type=float, default=d.exp_decay,
                       help="rate of the exp schedule: 1 is close to linear, 10 close to a step")
    for name, weight in PAPER_WEIGHTS.items():
        group.add_argument(f"--aug_weight_{name}", type=float, default=weight,
                           help=f"{name} fires with probability this x p(t); 0 turns it off")
    group.add_argument("--aug_max_translation_x", type=float, default=d.max_translation[0],
                       help="largest translation along x, a fraction of the image width")
    group.add_argument("--aug_max_translation_y", type=float, default=d.max_translation[1],
                       help="largest translation along y, a fraction of the image height")
    group.add_argument("--aug_max_rotation", type=float, default=d.max_rotation,
                       help="largest rotation angle, degrees")
    group.add_argument("--aug_max_shearing_x", type=float, default=d.max_shearing,
                       help="largest shear angle (degrees) of the affine's one shear, along x")
    group.add_argument("--aug_max_scaling", type=float, default=d.max_scaling,
                       help="the scale factors along x and y are drawn from [1 - this, 1 + this]")
    group.add_argument("--aug_interpolation_order", type=int, default=d.interpolation_order,
                       help="interpolation of the affine: 1 bilinear, 3 bicubic")
    group.add_argument("--aug_upsample", action="store_true",
                       help="upsample the image before the affine and resize it back afterwards")
    group.add_argument("--aug_upsample_factor", type=int, default=d.upsample_factor,
                       help="upsampling factor of --aug_upsample")
    group.add_argument("--aug_upsample_order", type=int, default=d.upsample_order,
                       help="interpolation of --aug_upsample's resizing: 1 bilinear, 3 bicubic")
    group.add_argument("--max_train_resolution", type=int, nargs=2, default=None, metavar=("H", "W"),
                       help="centre-crop augmented training images larger than H x W")


def check_augment_options(opts: argparse.Namespace, per_epoch: bool = False) -> None:
    """Raise ``UserError`` naming the first bad augmentation flag (data sizes: see
    ``check_max_train_resolution``); ``per_epoch`` as in ``schedule_length``."""
    if not 0.0 <= opts.aug_strength <= 1.0:
        raise UserError(f"--aug_strength {opts.aug_strength}: must be in [0, 1]")
    if opts.aug_schedule not in SCHEDULES:
        raise UserError(f"--aug_schedule {opts.aug_schedule}: unknown; use one of {', '.join(SCHEDULES)}")
    for name in PAPER_WEIGHTS:
        if getattr(opts, f"aug_weight_{name}") < 0:
            raise UserError(f"--aug_weight_{name} {getattr(opts, f'aug_weight_{name}')}: must be 0 or "
                            "more (0 turns the transform off)")
    total = schedule_length(opts, per_epoch)
    unit = "epochs (--epochs x --local_ep)" if per_epoch else "rounds (--epochs)"
    if not 0 <= opts.aug_delay < total:
        raise UserError(f"--aug_delay {opts.aug_delay}: must be 0 or more and below the {total} {unit}, "
                        "or augmentation never starts")
    if not opts.aug_exp_decay > 0:
        raise UserError(f"--aug_exp_decay {opts.aug_exp_decay}: must be positive")
    for axis in "xy":
        value = getattr(opts, f"aug_max_translation_{axis}")
        if not 0.0 <= value < 1.0:
            raise UserError(f"--aug_max_translation_{axis} {value}: must be in [0, 1) (a fraction of the image)")
    if opts.aug_max_rotation < 0:
        raise UserError(f"--aug_max_rotation {opts.aug_max_rotation}: must be 0 or more degrees")
    if not 0 <= opts.aug_max_shearing_x < 90:
        raise UserError(f"--aug_max_shearing_x {opts.aug_max_shearing_x}: must be in [0, 90) degrees")
    if not 0.0 <= opts.aug_max_scaling < 1.0:
        raise UserError(f"--aug_max_scaling {opts.aug_max_scaling}: must be in [0, 1)")
    for flag in ("aug_interpolation_order", "aug_upsample_order"):
        if getattr(opts, flag) not in INTERPOLATION:
            raise UserError(f"--{flag} {getattr(opts, flag)}: use 1 (bilinear) or 3 (bicubic)")
    if opts.aug_upsample_factor < 1:
        raise UserError(f"--aug_upsample_factor {opts.aug_upsample_factor}: must be at least 1")
    if opts.max_train_resolution is not None and min(opts.max_train_resolution) < 1:
        raise UserError(f"--max_train_resolution {' '.join(map(str, opts.max_train_resolution))}: "
                        "sizes must be at least 1")
