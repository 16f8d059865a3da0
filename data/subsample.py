"""Cartesian undersampling masks over k-space columns, bit-compatible with fastMRI 0.3.0.

A mask function keeps a dense band of low-frequency columns around the k-space centre and a
subset of the remaining columns chosen by a rule (random, equispaced, or equispaced with the
spacing adjusted so that the total matches the acceleration). Given the same seed and shape,
every class here draws the same random numbers in the same order as ``fastmri.data.subsample``
and so returns the same mask.
"""

from collections.abc import Sequence

import numpy as np
import torch

from utils.errors import UserError

Seed = int | tuple[int, ...]


class MaskFunc:
    """Base class: a centre band plus the columns picked by ``acceleration_columns``.

    Each call chooses one (centre fraction, acceleration) pair: the same random index into both
    lists, or, with ``allow_any_combination``, an independent random choice from each list.
    """

    def __init__(
        self,
        center_fractions: Sequence[float],
        accelerations: Sequence[int],
        allow_any_combination: bool = False,
        seed: int | None = None,
    ):
        """
        Args:
            center_fractions: fractions of the columns kept around the centre, each in (0, 1).
            accelerations: undersampling factors, whole numbers >= 1; paired with
                ``center_fractions`` index by index unless ``allow_any_combination``.
            allow_any_combination: draw the fraction and the acceleration independently.
            seed: seed of the function's own ``np.random.RandomState``.

        Raises:
            UserError: naming the flag (``--center-fractions``, ``--accelerations``) at fault.
        """
        _check_arguments(center_fractions, accelerations, allow_any_combination)
        self.center_fractions = center_fractions
        self.accelerations = accelerations
        self.allow_any_combination = allow_any_combination
        self.rng = np.random.RandomState(seed)

    def __call__(
        self, shape: Sequence[int], offset: int | None = None, seed: Seed | None = None
    ) -> tuple[torch.Tensor, int]:
        """Draw a mask for k-space of ``shape`` (at least 3 dims; columns on dim -2).

        Args:
            shape: k-space shape in fastMRI's real layout, e.g. ``(H, W, 2)`` or ``(C, H, W, 2)``.
            offset: first column of the equispaced pattern; drawn at random when None.
                Ignored by ``RandomMaskFunc``.
            seed: when given, the RNG is seeded with it for this call and its previous state is
                restored afterwards, so seeded calls do not disturb the unseeded sequence.

        Returns:
            ``(mask, num_low_frequencies)``: a float32 0/1 tensor of shape ``(1, ..., 1, W, 1)``
            (same number of dims as ``shape``) and the width of the centre band.
        """
        if len(shape) < 3:
            raise ValueError(f"mask shape needs at least 3 dims (..., H, W, 2), got {tuple(shape)}")
        num_cols = shape[-2]
        saved_state = None
        if seed is not None:
            saved_state = self.rng.get_state()
            self.rng.seed(seed)
        try:
            center_fraction, acceleration = self._choose_acceleration()
            num_low = int(round(num_cols * center_fraction))
            columns = self.acceleration_columns(num_cols, acceleration, offset, num_low)
        finally:
            if saved_state is not None:
                self.rng.set_state(saved_state)
        columns[_center_band(num_cols, num_low)] = 1
        mask_shape = [1] * len(shape)
        mask_shape[-2] = num_cols
        return torch.from_numpy(columns.astype(np.float32, copy=False).reshape(mask_shape)), num_low

    def acceleration_columns(
        self, num_cols: int, acceleration: int, offset: int | None, num_low: int
    ) -> np.ndarray:
        """Return the columns kept outside the centre band as a float32 0/1 array ``(W,)``.

        Subclasses draw from ``self.rng`` here; the centre band is added by ``__call__``.
        """
        raise NotImplementedError

    def _choose_acceleration(self) -> tuple[float, int]:
        if self.allow_any_combination:
            return self.rng.choice(self.center_fractions), self.rng.choice(self.accelerations)
        choice = self.rng.randint(len(self.center_fractions))
        return self.center_fractions[choice], self.accelerations[choice]


class RandomMaskFunc(MaskFunc):
    """Centre band plus columns kept independently with probability
    ``(W / acceleration - num_low) / (W - num_low)``, so that W / acceleration columns are kept on
    average."""

    def acceleration_columns(
        self, num_cols: int, acceleration: int, offset: int | None, num_low: int
    ) -> np.ndarray:
        prob = (num_cols / acceleration - num_low) / (num_cols - num_low)
        return (self.rng.uniform(size=num_cols) < prob).astype(np.float32)


class EquiSpacedMaskFunc(MaskFunc):
    """Centre band plus every ``acceleration``-th column from ``offset``; the total kept is
    therefore above W / acceleration (the centre band is extra)."""

    def acceleration_columns(
        self, num_cols: int, acceleration: int, offset: int | None, num_low: int
    ) -> np.ndarray:
        if offset is None:
            offset = self.rng.randint(0, high=round(acceleration))
        columns = np.zeros(num_cols, dtype=np.float32)
        columns[offset :: int(acceleration)] = 1
        return columns


class EquispacedMaskFractionFunc(MaskFunc):
    """Centre band plus columns at a spacing widened so that about W / acceleration columns are kept
    in total.

    The spacing is fractional and positions are rounded, so the gaps are not all equal; the last
    column is never picked by the pattern. Both quirks are fastMRI's and are kept because the public
    fastMRI multicoil data were masked this way.
    """

    def acceleration_columns(
        self, num_cols: int, acceleration: int, offset: int | None, num_low: int
    ) -> np.ndarray:
        if num_low * acceleration >= num_cols:
            raise UserError(
                f"--center-fractions: a centre band of {num_low} of {num_cols} columns "
                f"already exceeds the 1/{acceleration} of columns that --accelerations "
                f"{acceleration} keeps; use a smaller centre fraction"
            )
        # Solve W / acc = num_low + (W - num_low) / spacing for the spacing.
        spacing = acceleration * (num_low - num_cols) / (num_low * acceleration - num_cols)
        if offset is None:
            offset = self.rng.randint(0, high=round(spacing))
        columns = np.zeros(num_cols, dtype=np.float32)
        columns[np.around(np.arange(offset, num_cols - 1, spacing)).astype(np.uint)] = 1
        return columns


MASK_TYPES: dict[str, type[MaskFunc]] = {
    "random": RandomMaskFunc,
    "equispaced": EquiSpacedMaskFunc,
    "equispaced_fraction": EquispacedMaskFractionFunc,
}


def create_mask_for_mask_type(
    mask_type: str,
    center_fractions: Sequence[float],
    accelerations: Sequence[int],
    seed: int | None = None,
) -> MaskFunc:
    """Build the mask function named ``mask_type`` (a key of ``MASK_TYPES``).

    Raises:
        UserError: for an unknown ``--mask-type`` or invalid fractions/accelerations.
    """
    if mask_type not in MASK_TYPES:
        raise UserError(
            f"--mask-type must be one of {', '.join(MASK_TYPES)} (got {mask_type!r})"
        )
    return MASK_TYPES[mask_type](center_fractions, accelerations, seed=seed)


def _center_band(num_cols: int, num_low: int) -> slice:
    """Columns of the centre band: ``num_low`` columns around ``W // 2`` (one more on the left
    of the centre when ``W - num_low`` is odd)."""
    start = (num_cols - num_low + 1) // 2
    return slice(start, start + num_low)


def _check_arguments(
    center_fractions: Sequence[float], accelerations: Sequence[int], allow_any_combination: bool
) -> None:
    if len(center_fractions) == 0:
        raise UserError("--center-fractions needs at least one value")
    if len(accelerations) == 0:
        raise UserError("--accelerations needs at least one value")
    if not allow_any_combination and len(accelerations) != len(center_fractions):
        raise UserError(
            "--accelerations and --center-fractions must have the same length "
            f"(got {len(accelerations)} and {len(center_fractions)})"
        )
    for fraction in center_fractions:
        if not 0 < fraction < 1:
            raise UserError(f"--center-fractions must lie in (0, 1) (got {fraction})")
    for acceleration in accelerations:
        if acceleration < 1 or not float(acceleration).is_integer():
            raise UserError(f"--accelerations must be whole numbers >= 1 (got {acceleration})")
    pairs = (
        [(f, a) for f in center_fractions for a in accelerations]
        if allow_any_combination
        else list(zip(center_fractions, accelerations))
    )
    for fraction, acceleration in pairs:
        if fraction * acceleration >= 1:
            raise UserError(
                f"--center-fractions {fraction} with --accelerations {acceleration}: the centre "
                f"band alone keeps more than 1/{acceleration} of the columns; use a centre "
                f"fraction below {1 / acceleration:g}"
            )
