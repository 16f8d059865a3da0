"""Signal models and the procedural knee: anatomy present where it belongs, contrasts as in PD/PDFS."""

import math

import numpy as np
import pytest

from data.knee_phantom import KNEE_TISSUES, knee_slice_positions, sample_knee
from data.phantom import TISSUES
from data.sequences import InversionRecovery, SpinEcho


def test_spin_echo_and_inversion_recovery_formulas() -> None:
    se = SpinEcho(2000.0, 80.0)
    assert se.signal(0.8, 900.0, 100.0) == pytest.approx(0.8 * (1 - math.exp(-2000 / 900)) * math.exp(-0.8))
    ir = InversionRecovery(9000.0, 120.0, 2500.0)
    expected = 0.9 * abs(1 - 2 * math.exp(-2500 / 1400) + math.exp(-9000 / 1400)) * math.exp(-120 / 220)
    assert ir.signal(0.9, 1400.0, 220.0) == pytest.approx(expected)


def test_flair_nulls_csf_and_keeps_lesions_bright() -> None:
    flair = InversionRecovery(9000.0, 120.0, 2500.0)
    tissues = TISSUES[1.5]  # the BraTS-like site's field strength
    s = {name: flair.signal(t.pd, t.t1, t.t2) for name, t in tissues.items() if name != "air"}
    assert s["csf"] < 0.3 * s["wm"]
    assert s["oedema"] > s["gm"] > s["wm"]
    t2 = SpinEcho(2500.0, 90.0)
    assert t2.signal(tissues["csf"].pd, tissues["csf"].t1, tissues["csf"].t2) > t2.signal(
        tissues["wm"].pd, tissues["wm"].t1, tissues["wm"].t2)


def test_fat_saturation_suppresses_only_the_fat_share() -> None:
    pd, pdfs = SpinEcho(2800.0, 30.0), SpinEcho(2800.0, 30.0, fat_saturation=0.9)
    fat, fluid = KNEE_TISSUES["fat"], KNEE_TISSUES["fluid"]
    assert pdfs.signal(fat.pd, fat.t1, fat.t2, fat.fat) == pytest.approx(0.1 * pd.signal(fat.pd, fat.t1, fat.t2))
    assert pdfs.signal(fluid.pd, fluid.t1, fluid.t2, fluid.fat) == pd.signal(fluid.pd, fluid.t1, fluid.t2)


@pytest.fixture(scope="module")
def knee():
    positions, _ = knee_slice_positions(12)
    return positions, sample_knee(np.random.default_rng(3), 96, 140.0 / 96, positions)


def test_fractions_sum_to_one_and_every_tissue_is_there(knee) -> None:
    positions, phantom = knee
    total = sum(phantom.fractions.values())
    np.testing.assert_allclose(total, 1.0, atol=1e-4)
    volume = {name: float(frac.sum()) for name, frac in phantom.fractions.items()}
    for name in KNEE_TISSUES:
        assert volume[name] > 20, f"{name} is missing"
    assert volume["marrow"] > volume["cartilage"] > volume["meniscus"]


def test_anatomy_sits_where_a_coronal_knee_has_it(knee) -> None:
    positions, phantom = knee
    n = phantom.coarse.shape[1]
    middle = int(np.argmin(np.abs(positions - 5.0)))
    marrow = phantom.fractions["marrow"][middle]
    # Femur above the joint line (row n // 2), tibia below, a gap of cartilage, menisci, fluid.
    assert marrow[: n // 2 - 4].sum() > 50 and marrow[n // 2 + 4:].sum() > 50
    joint = slice(n // 2 - 3, n // 2 + 3)
    assert phantom.fractions["cartilage"][middle, joint].sum() > phantom.fractions["marrow"][middle, joint].sum()
    # The patella only in front, menisci only around the joint line.
    patella_rows = slice(0, n // 2 - 8)
    front = int(np.argmin(np.abs(positions + 32.0)))
    assert phantom.fractions["marrow"][front, patella_rows].sum() > 20
    rows = np.nonzero(phantom.fractions["meniscus"].sum(axis=(0, 2)) > 0.5)[0]
    assert np.all(np.abs(rows - n // 2) < 12 / (140.0 / n))


def test_pd_fat_saturated_darkens_marrow_and_fat_not_fluid(knee) -> None:
    _, phantom = knee
    pd = phantom.image(SpinEcho(2800.0, 30.0))
    pdfs = phantom.image(SpinEcho(2800.0, 30.0, fat_saturation=0.92))
    assert pd.dtype == pdfs.dtype == np.float32
    for name, darker in (("marrow", True), ("fat", True), ("fluid", False)):
        where = phantom.fractions[name] > 0.95
        ratio = pdfs[where].mean() / pd[where].mean()
        assert (ratio < 0.5) if darker else (ratio > 0.95), (name, ratio)
    assert pdfs[phantom.fractions["fluid"] > 0.95].mean() > pdfs[phantom.fractions["marrow"] > 0.95].mean()


def test_same_seed_same_knee() -> None:
    positions, _ = knee_slice_positions(4)
    a = sample_knee(np.random.default_rng(5), 32, 140.0 / 32, positions)
    b = sample_knee(np.random.default_rng(5), 32, 140.0 / 32, positions)
    c = sample_knee(np.random.default_rng(6), 32, 140.0 / 32, positions)
    np.testing.assert_array_equal(a.fractions["marrow"], b.fractions["marrow"])
    assert not np.array_equal(a.fractions["marrow"], c.fractions["marrow"])
