"""Centred FFTs are unitary inverses, and UnetDataTransform gives fastMRI's samples."""

import numpy as np
import pytest
import torch

from data.subsample import create_mask_for_mask_type
from data.transforms import (
    UnetDataTransform,
    UnetSample,
    center_crop,
    fft2c,
    fft2c_np,
    ifft2c,
    ifft2c_np,
    rss,
)
from utils.errors import DataError, UserError


def complex_randn(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


@pytest.mark.parametrize("shape", [(32, 32), (3, 31, 20), (2, 2, 17, 40)])
def test_fft2c_round_trip_and_parseval(shape: tuple[int, ...]) -> None:
    x = torch.from_numpy(complex_randn(np.random.default_rng(0), shape))
    k = fft2c(x)
    torch.testing.assert_close(ifft2c(k), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fft2c(ifft2c(x)), x, atol=1e-5, rtol=1e-5)
    energy = x.abs().square().sum((-2, -1))
    torch.testing.assert_close(k.abs().square().sum((-2, -1)), energy, rtol=1e-5, atol=0)


def test_fft2c_is_centred() -> None:
    image = torch.ones(6, 7, dtype=torch.complex64)
    k = fft2c(image)
    assert k[3, 3].abs().item() == pytest.approx(np.sqrt(42), rel=1e-6)
    assert k.abs().sum().item() == pytest.approx(np.sqrt(42), rel=1e-6)


def test_numpy_twins_match_torch() -> None:
    x = complex_randn(np.random.default_rng(1), (2, 15, 24))
    np.testing.assert_allclose(fft2c_np(x), fft2c(torch.from_numpy(x)).numpy(), atol=1e-5)
    np.testing.assert_allclose(ifft2c_np(x), ifft2c(torch.from_numpy(x)).numpy(), atol=1e-5)
    assert fft2c_np(x).dtype == np.complex64


def test_fft2c_matches_fastmri() -> None:
    fastmri = pytest.importorskip("fastmri")
    x = torch.from_numpy(complex_randn(np.random.default_rng(2), (3, 21, 16)))
    for ours, theirs in ((fft2c, fastmri.fft2c), (ifft2c, fastmri.ifft2c)):
        ref = torch.view_as_complex(theirs(torch.view_as_real(x).contiguous()).contiguous())
        torch.testing.assert_close(ours(x), ref, atol=1e-5, rtol=1e-5)


def test_center_crop_and_rss() -> None:
    x = torch.arange(7 * 6).reshape(7, 6)
    assert torch.equal(center_crop(x, (3, 4)), x[2:5, 1:5])
    with pytest.raises(ValueError, match="cannot centre-crop"):
        center_crop(x, (8, 2))
    coils = torch.from_numpy(complex_randn(np.random.default_rng(3), (4, 5, 6)))
    expected = coils.abs().square().sum(0).sqrt()
    torch.testing.assert_close(rss(coils, dim=0), expected)
    torch.testing.assert_close(rss(coils.abs(), dim=0), expected)


CASES = [
    # challenge, k-space shape, target shape (None: use recon_size), use_seed
    ("singlecoil", (64, 48), (32, 32), True),
    ("singlecoil", (64, 47), None, True),
    ("singlecoil", (64, 48), (40, 36), False),
    ("multicoil", (4, 64, 48), (32, 32), True),
    ("multicoil", (3, 60, 41), None, False),
    ("multicoil", (4, 64, 30), (32, 32), True),  # narrower than the target: square fallback
]


@pytest.mark.parametrize("mask_type", ["random", "equispaced_fraction"])
@pytest.mark.parametrize(("challenge", "kspace_shape", "target_shape", "use_seed"), CASES)
def test_unet_transform_matches_fastmri(
    mask_type, challenge, kspace_shape, target_shape, use_seed
) -> None:
    fastmri_transforms = pytest.importorskip("fastmri.data.transforms")
    fastmri_subsample = pytest.importorskip("fastmri.data.subsample")
    rng = np.random.default_rng(sum(kspace_shape))
    kspace = complex_randn(rng, kspace_shape)
    target = None if target_shape is None else rng.random(target_shape, dtype=np.float32)
    attrs = {"max": 3.5, "recon_size": (24, 24, 1)}
    fname = "file1000123.h5"

    ref_cls = {
        "random": fastmri_subsample.RandomMaskFunc,
        "equispaced_fraction": fastmri_subsample.EquispacedMaskFractionFunc,
    }[mask_type]
    our_mask = create_mask_for_mask_type(mask_type, [0.08, 0.04], [4, 8], seed=5)
    ours = UnetDataTransform(challenge, our_mask, use_seed)
    their_mask = ref_cls([0.08, 0.04], [4, 8], seed=5)
    theirs = fastmri_transforms.UnetDataTransform(challenge, their_mask, use_seed)

    # Unseeded transforms draw from the stream: compare two consecutive slices.
    for slice_num in range(2):
        sample = ours(kspace, None, target, attrs, fname, slice_num)
        ref = theirs(kspace, None, target, attrs, fname, slice_num)
        assert isinstance(sample, UnetSample)
        assert sample.image.dtype == torch.float32 and sample.image.shape == ref.image.shape
        torch.testing.assert_close(sample.image, ref.image, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sample.target, ref.target, atol=1e-5, rtol=1e-5)
        assert sample.mean.ndim == 0 and sample.std.ndim == 0
        torch.testing.assert_close(sample.mean, ref.mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(sample.std, ref.std, atol=1e-6, rtol=1e-5)
        assert sample[4:] == ref[4:]  # fname, slice_num, max_value


def test_unet_transform_without_mask_func_matches_fastmri() -> None:
    fastmri_transforms = pytest.importorskip("fastmri.data.transforms")
    rng = np.random.default_rng(7)
    kspace = complex_randn(rng, (3, 40, 36))
    target = rng.random((20, 20), dtype=np.float32)
    sample = UnetDataTransform("multicoil")(kspace, None, target, {}, "f.h5", 0)
    ref = fastmri_transforms.UnetDataTransform("multicoil")(kspace, None, target, {}, "f.h5", 0)
    torch.testing.assert_close(sample.image, ref.image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sample.target, ref.target, atol=1e-5, rtol=1e-5)
    assert sample.max_value == 0.0


def test_explicit_seed_and_file_mask() -> None:
    rng = np.random.default_rng(8)
    kspace = complex_randn(rng, (48, 40))
    target = rng.random((24, 24), dtype=np.float32)
    mask_func = create_mask_for_mask_type("random", [0.08], [4], seed=0)
    transform = UnetDataTransform("singlecoil", mask_func)
    by_seed = transform(kspace, None, target, {}, "a.h5", 0, seed=11)
    mask, _ = create_mask_for_mask_type("random", [0.08], [4])((48, 40, 2), seed=11)
    # The file's mask, used when there is no mask function, gives the same sample.
    file_mask = mask.reshape(-1).numpy()
    by_file_mask = UnetDataTransform("singlecoil")(kspace, file_mask, target, {}, "a.h5", 0)
    torch.testing.assert_close(by_seed.image, by_file_mask.image)
    unmasked = UnetDataTransform("singlecoil")(kspace, None, target, {}, "a.h5", 0)
    assert not torch.allclose(by_seed.image, unmasked.image)


def test_crop_size_overrides_target_size() -> None:
    rng = np.random.default_rng(9)
    kspace = complex_randn(rng, (4, 48, 40))
    target = rng.random((32, 32), dtype=np.float32)
    sample = UnetDataTransform("multicoil", crop_size=(16, 20))(kspace, None, target, {}, "a.h5", 0)
    assert sample.image.shape == sample.target.shape == (16, 20)


def test_normalisation_can_be_undone() -> None:
    rng = np.random.default_rng(10)
    kspace = fft2c_np(rng.random((32, 32)).astype(np.complex64))
    attrs = {"recon_size": (32, 32, 1)}
    sample = UnetDataTransform("singlecoil")(kspace, None, None, attrs, "a.h5", 0)
    restored = sample.image * sample.std + sample.mean
    expected = torch.from_numpy(np.abs(ifft2c_np(kspace)))
    torch.testing.assert_close(restored, expected, atol=1e-5, rtol=1e-5)
    assert sample.target.shape == (1,)


def test_bad_inputs_are_user_errors() -> None:
    with pytest.raises(UserError, match="--challenge"):
        UnetDataTransform("dualcoil")
    kspace = np.zeros((2, 16, 16), np.complex64)
    attrs = {"recon_size": (8, 8, 1)}
    with pytest.raises(DataError, match="a.h5: singlecoil k-space"):
        UnetDataTransform("singlecoil")(kspace, None, None, attrs, "a.h5", 0)
    with pytest.raises(DataError, match="a.h5: cannot crop"):
        UnetDataTransform("multicoil")(kspace, None, np.zeros((20, 8), np.float32), {}, "a.h5", 0)
    with pytest.raises(DataError, match="a.h5: mask has shape"):
        UnetDataTransform("multicoil")(kspace, np.ones(15), None, attrs, "a.h5", 0)
