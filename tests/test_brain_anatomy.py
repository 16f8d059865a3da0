"""The synthetic brain anatomy: valid fractions, a cortex of realistic thickness with CSF in its
sulci, subjects that differ, determinism, skull-stripping, and contrast at each field strength."""

import numpy as np
import pytest
from scipy import ndimage

from data.anatomy_stats import _thin_slab_subject, cortical_thickness_mm
from data.brain_anatomy import TISSUE_NAMES, sample_anatomy
from data.phantom import TISSUES
from data.synthetic import SITES, _slice_heights

_EXTRACRANIAL = ("scalp", "fat", "bone", "marrow")
N = 96
HEAD = 92.0 / (0.5 * 230.0)  # a 230 mm field of view: 2.4 mm pixels


def _subject(seed: int, **kwargs):
    heights, _ = _slice_heights(8)
    kwargs.setdefault("lesions", False)
    return sample_anatomy(np.random.default_rng(seed), N, heights, HEAD, **kwargs)


@pytest.fixture(scope="module")
def subjects():
    return [_subject(seed) for seed in range(4)]


@pytest.mark.parametrize("kwargs", [{}, {"lesions": True}, {"skull": False}])
def test_fractions_are_shares_that_sum_to_one(kwargs) -> None:
    anatomy = _subject(7, **kwargs)
    assert set(anatomy.fractions) == set(TISSUE_NAMES)
    for name, frac in anatomy.fractions.items():
        assert frac.dtype == np.float32 and frac.shape == (8, N, N)
        assert frac.min() >= -1e-6 and frac.max() <= 1 + 1e-6, name
    np.testing.assert_allclose(sum(anatomy.fractions.values()), 1.0, atol=1e-5)
    for name in ("gm", "wm", "csf", "deep_gm"):
        assert anatomy.fractions[name].max() > 0.9, name  # every brain tissue has pure voxels
    if kwargs.get("lesions"):
        assert anatomy.fractions["oedema"].sum() > 0


@pytest.fixture(scope="module")
def thin():
    """A subject on 1.2 mm voxels (thin slices), as the thickness estimate needs."""
    return _thin_slab_subject(3)


def test_partial_volume_at_tissue_borders(thin) -> None:
    gm = thin[0].fractions["gm"]
    mixed = (gm > 0.1) & (gm < 0.9)
    assert 0.2 < mixed.sum() / (gm > 0.1).sum() < 0.9  # a 2.5 mm ribbon in 1.2 mm voxels


def test_cortex_ribbon_has_realistic_thickness(thin) -> None:
    # Fischl & Dale 2000: 2.5 mm on average; the estimator counts touching banks as thicker.
    assert 2.0 < cortical_thickness_mm(*thin) < 3.6


def test_sulci_hold_csf_inside_the_brain(subjects) -> None:
    for anatomy in subjects:
        f = anatomy.fractions
        parenchyma = (f["gm"] + f["wm"] + f["deep_gm"] + f["csf"]) > 0.5
        # 5-15 mm below the brain surface, in-plane: the cortical shell, outside the ventricles.
        depth = np.stack([ndimage.distance_transform_edt(s) for s in parenchyma]) * 2.4
        shell = (depth > 5.0) & (depth < 15.0)
        csf_in_shell = f["csf"][shell]
        assert csf_in_shell.mean() > 0.02
        # The CSF there sits in clefts lined by grey matter, not in white matter.
        clefts = shell & (f["csf"] > 0.2)
        assert f["gm"][clefts].mean() > 3 * f["wm"][clefts].mean()
        assert f["wm"][clefts].mean() < 0.5 * f["wm"][shell].mean()


def test_subjects_differ_in_size_ventricles_and_folding(subjects) -> None:
    brain = [float((a.fractions["gm"] + a.fractions["wm"]).sum()) for a in subjects]
    csf = [float(a.fractions["csf"][a.brain].sum()) for a in subjects]
    assert np.std(brain) / np.mean(brain) > 0.02
    assert np.std(csf) / np.mean(csf) > 0.1
    gm = [a.fractions["gm"] for a in subjects]
    for i in range(len(gm)):
        for j in range(i + 1, len(gm)):
            assert np.abs(gm[i] - gm[j]).mean() > 0.05


def test_same_seed_same_subject() -> None:
    a, b = _subject(11, lesions=True), _subject(11, lesions=True)
    for name in TISSUE_NAMES:
        np.testing.assert_array_equal(a.fractions[name], b.fractions[name])
    np.testing.assert_array_equal(a.brain, b.brain)
    np.testing.assert_array_equal(a.coarse, b.coarse)


def test_neighbouring_slices_change_smoothly() -> None:
    heights = np.linspace(0.1, 0.14, 5, dtype=np.float32)  # 0.75 mm apart
    anatomy = sample_anatomy(np.random.default_rng(5), N, heights, HEAD, lesions=False)
    gm = anatomy.fractions["gm"]
    step = np.abs(np.diff(gm, axis=0)).mean()
    other = np.abs(gm[0] - _subject(6).fractions["gm"][4]).mean()
    assert step < 0.3 * other


def test_skull_stripped_variant_has_no_skull_or_scalp() -> None:
    with_skull, stripped = _subject(9), _subject(9, skull=False)
    for name in _EXTRACRANIAL:
        assert with_skull.fractions[name].sum() > 10, name
        assert stripped.fractions[name].max() == 0.0, name
    assert (stripped.fractions["air"][~stripped.brain] > 0.5).all()
    np.testing.assert_array_equal(with_skull.brain, stripped.brain)
    inside = stripped.brain
    np.testing.assert_allclose(stripped.fractions["wm"][inside], with_skull.fractions["wm"][inside], atol=1e-6)


def test_every_site_sees_brain_contrast_at_its_field_strength() -> None:
    for site, spec in SITES.items():
        if spec.anatomy != "head":
            continue
        table = TISSUES[spec.field_strength_t]
        signal = lambda name, seq: spec.sequences[seq].signal(table[name].pd, table[name].t1, table[name].t2)  # noqa: E731
        t1 = {name: signal(name, "T1") for name in ("wm", "gm", "csf")}
        t2 = {name: signal(name, "T2") for name in ("wm", "gm", "csf")}
        assert t1["wm"] > t1["gm"] > t1["csf"], site
        assert t2["csf"] > t2["gm"] > t2["wm"], site
    for name in ("gm", "wm"):
        assert TISSUES[3.0][name].t1 > TISSUES[1.5][name].t1  # T1 lengthens with field strength
