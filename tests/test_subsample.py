"""Masks are bit-identical to fastMRI 0.3.0's, seeded calls leave the RNG stream alone, and bad
arguments are reported as user errors naming the flag."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data.subsample import MASK_TYPES, create_mask_for_mask_type
from utils.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "masks"


def load_cases(mask_type: str) -> list[tuple[dict, list[np.ndarray]]]:
    """Cases of ``fixtures/masks/<mask_type>.npz`` with their reference masks ``(W,)`` per call."""
    with np.load(FIXTURES / f"{mask_type}.npz") as data:
        meta = json.loads(str(data["meta"]))
        return [
            (case, [data[f"c{i}_{j}"] for j in range(len(case["calls"]))])
            for i, case in enumerate(meta["cases"])
        ]


def build(case: dict, module=None):
    """The case's mask function from our module, or from ``module`` (fastMRI's) when given."""
    if module is None:
        cls = MASK_TYPES[case["mask_type"]]
    else:
        cls = {
            "random": module.RandomMaskFunc,
            "equispaced": module.EquiSpacedMaskFunc,
            "equispaced_fraction": module.EquispacedMaskFractionFunc,
        }[case["mask_type"]]
    return cls(
        case["center_fractions"],
        case["accelerations"],
        allow_any_combination=case["allow_any_combination"],
        seed=case["seed"],
    )


def call(func, spec: dict) -> tuple[torch.Tensor, int]:
    seed = tuple(spec["seed"]) if isinstance(spec["seed"], list) else spec["seed"]
    return func(tuple(spec["shape"]), offset=spec["offset"], seed=seed)


@pytest.mark.parametrize("mask_type", sorted(MASK_TYPES))
def test_masks_match_fastmri_fixtures(mask_type: str) -> None:
    cases = load_cases(mask_type)
    assert len(cases) >= 10
    for case, references in cases:
        func = build(case)
        for spec, reference in zip(case["calls"], references, strict=True):
            mask, num_low = call(func, spec)
            shape = spec["shape"]
            assert mask.dtype == torch.float32
            assert tuple(mask.shape) == (1,) * (len(shape) - 2) + (shape[-2], 1)
            columns = mask.numpy().reshape(-1)
            assert np.array_equal(columns, reference.astype(np.float32)), (case, spec)
            assert num_low == spec["num_low_frequencies"]
            assert isinstance(num_low, int)


@pytest.mark.parametrize("mask_type", sorted(MASK_TYPES))
def test_masks_match_live_fastmri(mask_type: str) -> None:
    fastmri_subsample = pytest.importorskip("fastmri.data.subsample")
    rng = np.random.default_rng(0)
    cases = [case for case, _ in load_cases(mask_type)]
    # Fresh random widths and seeds beyond the stored fixtures.
    for k in range(20):
        width = int(rng.integers(64, 700))
        cases.append(
            {
                "mask_type": mask_type,
                "center_fractions": [0.08, 0.04, 0.06],
                "accelerations": [4, 8, 6],
                "allow_any_combination": bool(k % 2),
                "seed": int(rng.integers(2**31)),
                "calls": [
                    {"shape": [2, 640, width, 2], "seed": None, "offset": None},
                    {"shape": [640, width, 2], "seed": int(rng.integers(2**31)), "offset": None},
                    {"shape": [640, width, 2], "seed": None, "offset": None},
                ],
            }
        )
    for case in cases:
        ours, theirs = build(case), build(case, fastmri_subsample)
        for spec in case["calls"]:
            mask, num_low = call(ours, spec)
            ref_mask, ref_num_low = call(theirs, spec)
            assert torch.equal(mask, ref_mask), (case, spec)
            assert num_low == ref_num_low


@pytest.mark.parametrize("mask_type", sorted(MASK_TYPES))
def test_seeded_call_restores_rng_state(mask_type: str) -> None:
    shape = (1, 368, 2)
    func = create_mask_for_mask_type(mask_type, [0.08, 0.04], [4, 8], seed=3)
    fresh = create_mask_for_mask_type(mask_type, [0.08, 0.04], [4, 8], seed=3)
    seeded, _ = func(shape, seed=tuple(map(ord, "file1.h5")))
    again, _ = func(shape, seed=tuple(map(ord, "file1.h5")))
    assert torch.equal(seeded, again)
    assert torch.equal(func(shape)[0], fresh(shape)[0])
    assert torch.equal(func(shape)[0], fresh(shape)[0])


def test_random_mask_keeps_centre_and_about_one_in_acceleration() -> None:
    func = create_mask_for_mask_type("random", [0.08], [4], seed=0)
    kept = []
    for _ in range(200):
        mask, num_low = func((1, 368, 2))
        columns = mask.reshape(-1)
        start = (368 - num_low + 1) // 2
        assert num_low == round(368 * 0.08)
        assert columns[start : start + num_low].all()
        kept.append(columns.sum().item())
    assert abs(np.mean(kept) - 368 / 4) < 2


def test_equispaced_fraction_keeps_one_in_acceleration() -> None:
    func = create_mask_for_mask_type("equispaced_fraction", [0.08], [4], seed=0)
    for width in (368, 372, 320, 257):
        mask, _ = func((1, width, 2))
        assert abs(mask.sum().item() - width / 4) <= 2


@pytest.mark.parametrize(
    ("center_fractions", "accelerations", "flag", "detail"),
    [
        ([0.08, 0.04], [4], "--accelerations and --center-fractions", "(got 1 and 2)"),
        ([0.08], [0], "--accelerations", "got 0"),
        ([0.08], [2.5], "--accelerations", "got 2.5"),
        ([0.0], [4], "--center-fractions", "(0, 1)"),
        ([1.0], [4], "--center-fractions", "(0, 1)"),
        ([], [], "--center-fractions", "at least one"),
        ([0.08], [16], "--center-fractions 0.08 with --accelerations 16", "below 0.0625"),
    ],
)
def test_bad_arguments_name_the_flag(center_fractions, accelerations, flag, detail) -> None:
    with pytest.raises(UserError) as info:
        create_mask_for_mask_type("random", center_fractions, accelerations)
    assert flag in str(info.value)
    assert detail in str(info.value)


def test_unknown_mask_type_names_the_flag() -> None:
    with pytest.raises(UserError, match="--mask-type must be one of random, equispaced"):
        create_mask_for_mask_type("gaussian", [0.08], [4])


def test_equispaced_fraction_rejects_centre_wider_than_budget() -> None:
    # 0.24 * 4 < 1, but on 11 columns the centre rounds to 3 and 3 * 4 >= 11.
    func = create_mask_for_mask_type("equispaced_fraction", [0.24], [4], seed=0)
    state = func.rng.get_state()
    with pytest.raises(UserError, match="--center-fractions"):
        func((1, 11, 2), seed=5)
    assert np.array_equal(func.rng.get_state()[1], state[1])


def test_shape_needs_three_dims() -> None:
    with pytest.raises(ValueError, match="at least 3 dims"):
        create_mask_for_mask_type("random", [0.08], [4])((368, 2))
