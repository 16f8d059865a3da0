"""Metrics equal fastmri.evaluate's, SSIM inside the head leaves the background out, and the summary
over volumes is a mean and a sample std."""

import numpy as np
import pytest

from utils.metrics import METRIC_FUNCS, head_mask, nmse, psnr, ssim, ssim_head, summarize, volume_metrics


def volumes(seed: int, shape=(3, 40, 36)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = rng.random(shape, dtype=np.float32)
    pred = (gt + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return gt, pred


@pytest.mark.parametrize("seed", range(3))
def test_metrics_equal_fastmri(seed: int) -> None:
    evaluate = pytest.importorskip("fastmri.evaluate")
    gt, pred = volumes(seed)
    assert nmse(gt, pred) == pytest.approx(float(evaluate.nmse(gt, pred)), rel=1e-6)
    assert psnr(gt, pred) == pytest.approx(float(evaluate.psnr(gt, pred)), rel=1e-6)
    assert ssim(gt, pred) == pytest.approx(float(evaluate.ssim(gt, pred)[0]), rel=1e-6)
    assert psnr(gt, pred, 2.0) == pytest.approx(float(evaluate.psnr(gt, pred, 2.0)), rel=1e-6)
    assert ssim(gt, pred, 2.0) == pytest.approx(float(evaluate.ssim(gt, pred, 2.0)[0]), rel=1e-6)


def test_metric_values_on_known_inputs() -> None:
    gt = np.ones((2, 16, 16))
    gt[:, :8] = 0.5
    assert nmse(gt, gt) == 0.0
    assert ssim(gt, gt) == pytest.approx(1.0)
    # MSE 0.01 with data range 1: 10 * log10(1 / 0.01) = 20 dB.
    assert psnr(gt, gt + 0.1) == pytest.approx(20.0)
    assert nmse(gt, 2 * gt) == pytest.approx(1.0)


def test_volume_metrics_uses_every_metric() -> None:
    gt, pred = volumes(4)
    row = volume_metrics(gt, pred, maxval=1.5)
    assert set(row) == set(METRIC_FUNCS)
    assert row == {"nmse": nmse(gt, pred), "psnr": psnr(gt, pred, 1.5), "ssim": ssim(gt, pred, 1.5),
                   "ssim_head": ssim_head(gt, pred, 1.5)}


def head_phantom(seed: int = 0) -> np.ndarray:
    """(2, 48, 48): a textured disc with a dark hole (a ventricle) on a noisy background."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1:1:48j, -1:1:48j]
    head = (x**2 + y**2 < 0.6).astype(float) * rng.uniform(0.5, 1.0, (2, 48, 48))
    head[:, 22:26, 22:26] = 0.02
    return head + rng.uniform(0, 0.03, head.shape)


def test_head_mask_is_the_filled_head() -> None:
    mask = head_mask(head_phantom())
    y, x = np.mgrid[-1:1:48j, -1:1:48j]
    disc = x**2 + y**2 < 0.6
    assert (mask == disc).mean() > 0.99 and mask[:, 23, 23].all()


def test_ssim_head_leaves_the_background_out() -> None:
    gt = head_phantom()
    outside = ~head_mask(gt)
    floor_lost = gt.copy()
    floor_lost[outside] = 0.0  # a model that draws a clean background under a noisy target's floor
    assert ssim_head(gt, gt) == pytest.approx(1.0)
    assert ssim(gt, floor_lost) < 0.9 and ssim_head(gt, floor_lost) > 0.999
    flattened = gt.copy()
    flattened[~outside] = gt[~outside].mean()  # the head one grey, the background exact
    assert ssim_head(gt, flattened) < ssim(gt, flattened) - 0.2
    assert ssim_head(gt, gt, 2.0) == pytest.approx(1.0)
    assert np.isnan(ssim_head(np.zeros((1, 16, 16)), np.zeros((1, 16, 16))))


def test_shape_errors() -> None:
    gt, pred = volumes(5)
    with pytest.raises(ValueError, match=r"volumes \(S, H, W\)"):
        ssim(gt[0], pred[0])
    with pytest.raises(ValueError, match="differs from ground truth"):
        psnr(gt, pred[:2])


def test_summarize_is_mean_and_sample_std() -> None:
    rows = [volume_metrics(*volumes(seed)) for seed in range(5)]
    summary = summarize(rows)
    assert summary["volumes"] == 5
    for name in METRIC_FUNCS:
        values = np.array([row[name] for row in rows])
        assert summary[name] == pytest.approx(values.mean(), rel=1e-12)
        # runstats' stddev() defaults to ddof=1, the sample standard deviation.
        assert summary[f"{name}_std"] == pytest.approx(values.std(ddof=1), rel=1e-9)


def test_summarize_single_volume_and_bad_rows() -> None:
    summary = summarize([{"psnr": 30.0}])
    assert summary["psnr"] == 30.0 and np.isnan(summary["psnr_std"]) and summary["volumes"] == 1
    with pytest.raises(ValueError, match="at least one"):
        summarize([])
    with pytest.raises(ValueError, match="disagree"):
        summarize([{"psnr": 30.0}, {"ssim": 0.9}])
