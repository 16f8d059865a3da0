"""MRAugment (data/augment.py): the p(t) schedules, what each transform does to the target and the
k-space, p = 0 changing nothing, reproducibility across DataLoader workers, header padding, bad flags."""
from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data.augment import (PAPER_WEIGHTS, AugmentConfig, AugmentedTransform, MRAugment, augment_generator,
                          check_augment_options, check_max_train_resolution, schedule_p, with_augmentation)
from data.mri_data import SliceDataset
from data.subsample import RandomMaskFunc
from data.transforms import UnetDataTransform, fft2c, ifft2c, rss
from options import parse_options
from tests.helpers_data import ismrmrd_header
from utils.errors import UserError

EPOCH_SEED = 7


def only(name: str, **config) -> AugmentConfig:
    """Constant p = 1 with every weight 0 but ``name``'s: that transform always fires."""
    weights = {k: float(k == name) for k in PAPER_WEIGHTS}
    return AugmentConfig(strength=1.0, schedule="constant", weights=weights, **config)


def write_volume(path: Path, shape=(16, 16), coils: int | None = 3, slices: int = 2, seed: int = 0,
                 target: bool = True, header=None, columns: tuple[int, int] | None = None) -> None:
    """A fastMRI file whose target is the RSS (or magnitude) of its k-space's images, full size,
    computed as the augmentation computes it. ``columns = (left, right)``: k-space is zero outside."""
    rng = np.random.default_rng(seed)
    full = (slices,) + ((coils,) if coils else ()) + shape
    kspace = (rng.standard_normal(full) + 1j * rng.standard_normal(full)).astype(np.complex64)
    if columns is not None:
        kspace[..., :columns[0]] = 0
        kspace[..., columns[1]:] = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    images = ifft2c(torch.from_numpy(kspace))
    magnitude = (rss(images, dim=1) if coils else images.abs()).numpy()
    torch.set_num_threads(threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as hf:
        hf.create_dataset("kspace", data=kspace)
        if target:
            hf.create_dataset("reconstruction_rss" if coils else "reconstruction_esc", data=magnitude)
        if header is not None:
            hf.create_dataset("ismrmrd_header", data=header)
        hf.attrs["max"] = float(magnitude.max())


def record(*args):
    """An inner transform that returns what it is given."""
    return args


def augmented_dataset(files, config: AugmentConfig, inner=record, challenge="multicoil",
                      t: int = 0, total: int = 10) -> SliceDataset:
    transform = AugmentedTransform(inner, MRAugment(config))
    transform.set_time(t, total)
    dataset = SliceDataset(files, transform, fmt="fastmri_h5", challenge=challenge)
    dataset.set_epoch(EPOCH_SEED)
    return dataset


def drawn(dataset: SliceDataset, i: int, p: float = 1.0):
    """The transform drawn for item ``i`` (the same generator the dataset's seed gives)."""
    path, slice_num = dataset.examples[i]
    seed = (EPOCH_SEED, slice_num) + tuple(map(ord, path.name))
    with h5py.File(path) as hf:
        kspace = hf["kspace"][slice_num]
        key = "reconstruction_rss" if "reconstruction_rss" in hf else "reconstruction_esc"
        target = hf[key][slice_num] if key in hf else None
    params = dataset.transform.augmentor.draw(p, kspace.shape[-2:], augment_generator(seed))
    return params, kspace, target, seed


# --- p(t) -----------------------------------------------------------------------------------------

def test_exp_schedule_matches_the_formula_and_mraugment_values():
    def formula(t, total, delay, p_max, k):
        return p_max * (1 - math.exp(-k * (t - delay) / (total - delay))) / (1 - math.exp(-k))

    for t, expected in [(50, 0.218), (125, 0.395), (250, 0.508), (499, 0.550)]:
        p = schedule_p(t, 500, schedule="exp", strength=0.55, delay=0, exp_decay=5.0)
        assert p == pytest.approx(formula(t, 500, 0, 0.55, 5.0), rel=1e-12)
        assert round(p, 3) == expected
    assert schedule_p(0, 500, schedule="exp", strength=0.55, delay=0, exp_decay=5.0) == 0.0
    assert schedule_p(3, 20, schedule="exp", strength=0.4, delay=4, exp_decay=2.0) == 0.0
    assert schedule_p(9, 20, schedule="exp", strength=0.4, delay=4, exp_decay=2.0) == pytest.approx(
        formula(9, 20, 4, 0.4, 2.0), rel=1e-12)


def test_ramp_and_constant_schedules():
    ramp = dict(schedule="ramp", strength=0.6, delay=2, exp_decay=5.0)
    assert schedule_p(1, 12, **ramp) == 0.0
    assert schedule_p(2, 12, **ramp) == 0.0
    assert schedule_p(7, 12, **ramp) == pytest.approx(0.3)
    assert schedule_p(11, 12, **ramp) == pytest.approx(0.6 * 9 / 10)
    constant = dict(schedule="constant", strength=0.6, delay=2, exp_decay=5.0)
    assert schedule_p(1, 12, **constant) == 0.0
    assert schedule_p(2, 12, **constant) == 0.6 == schedule_p(11, 12, **constant)


def test_set_time_drives_the_probability_and_must_come_first():
    transform = AugmentedTransform(record, MRAugment(AugmentConfig(strength=0.55)))
    with pytest.raises(RuntimeError, match="set_time"):
        transform.probability()
    transform.set_time(125, 500)
    assert transform.probability() == pytest.approx(
        schedule_p(125, 500, schedule="exp", strength=0.55, delay=0, exp_decay=5.0))


# --- what the transforms do -------------------------------------------------------------------------

def reference(name: str, params, image: np.ndarray) -> np.ndarray:
    """The pixel-preserving transform ``name`` with ``params`` on ``image`` (..., H, W), by numpy."""
    if name == "fliph":
        return image[..., ::-1]
    if name == "flipv":
        return image[..., ::-1, :]
    if name == "rot90":
        return np.rot90(image, params.rot90, axes=(-2, -1))
    dy, dx = params.translation
    pad = [(0, 0)] * (image.ndim - 2) + [(max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0))]
    padded = np.pad(image, pad, mode="reflect")
    h, w = image.shape[-2:]
    return padded[..., max(-dy, 0):max(-dy, 0) + h, max(-dx, 0):max(-dx, 0) + w]


@pytest.mark.parametrize("coils", [3, None], ids=["multicoil", "singlecoil"])
@pytest.mark.parametrize("name", ["fliph", "flipv", "rot90", "translation"])
def test_pixel_preserving_transform_moves_target_and_kspace_exactly(tmp_path, name, coils):
    write_volume(tmp_path / "v.h5", shape=(16, 16), coils=coils)
    challenge = "multicoil" if coils else "singlecoil"
    mask_func = RandomMaskFunc([0.25], [2])

    def masking(kspace, mask, target, attrs, fname, slice_num, seed):
        sampled, _ = mask_func(kspace.shape + (2,), seed=seed)
        return torch.from_numpy(kspace) * sampled.squeeze(-1), target

    dataset = augmented_dataset([tmp_path / "v.h5"], only(name, max_translation=(0.4, 0.4)), masking,
                                challenge)
    for i in range(len(dataset)):
        params, kspace, target, seed = drawn(dataset, i)
        assert params.fired and params.affine is None
        masked, new_target = dataset[i]
        assert np.array_equal(new_target, reference(name, params, target))
        images = reference(name, params, ifft2c(torch.from_numpy(kspace)).numpy())
        mask, _ = mask_func(images.shape + (2,), seed=seed)
        expected = fft2c(torch.from_numpy(images.copy())) * mask.squeeze(-1)
        torch.testing.assert_close(masked, expected, rtol=0, atol=1e-5)


def smooth(shape: tuple[int, int], points: np.ndarray | None = None) -> np.ndarray:
    """Two Gaussian blobs well inside the image, at pixel coordinates (x, y) about the centre."""
    h, w = shape
    if points is None:
        y, x = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
        points = np.stack([x, y])
    x, y = points
    return (np.exp(-((x - 4) ** 2 + (y + 3) ** 2) / 18) + 0.6 * np.exp(-((x + 5) ** 2 + (y - 4) ** 2) / 10))


@pytest.mark.parametrize("upsample", [False, True], ids=["plain", "upsampled"])
def test_affine_matches_the_analytic_transform_within_interpolation_error(tmp_path, upsample):
    """Singlecoil image of smooth blobs, zero phase: the target after a forced rotation + shear +
    anisotropic scale is the blob function at the mapped coordinates, bicubic closer than bilinear."""
    shape = (40, 48)
    kspace = fft2c(torch.from_numpy(smooth(shape).astype(np.complex64)))[None].numpy()
    with h5py.File(tmp_path / "v.h5", "w") as hf:
        hf.create_dataset("kspace", data=kspace)
        hf.create_dataset("reconstruction_esc", data=ifft2c(torch.from_numpy(kspace)).abs().numpy())
    errors = {}
    for order in (1, 3):
        weights = {k: float(k in ("rotation", "shearing", "scaling")) for k in PAPER_WEIGHTS}
        config = AugmentConfig(strength=1.0, schedule="constant", weights=weights, max_rotation=60,
                               max_shearing=20, max_scaling=0.2, interpolation_order=order,
                               upsample=upsample, upsample_factor=2, upsample_order=order)
        dataset = augmented_dataset([tmp_path / "v.h5"], config, challenge="singlecoil")
        params, _, _, _ = drawn(dataset, 0)
        assert params.affine is not None and params.rot90 == 0
        new_target = dataset[0][2]
        h, w = shape
        y, x = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
        source = np.linalg.inv(params.affine.numpy()) @ np.stack([x.ravel(), y.ravel()])
        expected = smooth(shape, source).reshape(shape)
        errors[order] = np.abs(new_target - expected).max() / expected.max()
    assert errors[1] < 0.05
    assert errors[3] < errors[1]


def test_affine_target_and_kspace_come_from_the_same_augmented_coil_images(tmp_path):
    write_volume(tmp_path / "v.h5", shape=(24, 20), coils=4)
    dataset = augmented_dataset([tmp_path / "v.h5"], only("rotation", interpolation_order=3))
    kspace, _, target, _, _, _, _ = dataset[1]
    _, original, stored, _ = drawn(dataset, 1)
    assert kspace.shape == original.shape and not np.allclose(target, stored)
    recomputed = rss(ifft2c(torch.from_numpy(kspace)), dim=0).numpy()
    np.testing.assert_allclose(target, recomputed, rtol=1e-4, atol=1e-5)


def test_strength_zero_gives_the_same_samples_bit_for_bit(tmp_path):
    write_volume(tmp_path / "a.h5", coils=3, slices=3)
    inner = UnetDataTransform("multicoil", RandomMaskFunc([0.125], [4]), use_seed=False)
    plain = SliceDataset([tmp_path / "a.h5"], inner, fmt="fastmri_h5", challenge="multicoil")
    plain.set_epoch(EPOCH_SEED)
    strength0 = AugmentConfig(strength=0.0, schedule="constant")
    no_weights = AugmentConfig(strength=1.0, schedule="constant", weights={k: 0.0 for k in PAPER_WEIGHTS})
    forced = only("fliph")
    batches = lambda ds: list(DataLoader(ds, batch_size=2))  # noqa: E731
    want = batches(plain)
    for config, same in [(strength0, True), (no_weights, True), (forced, False)]:
        got = batches(augmented_dataset([tmp_path / "a.h5"], config, inner))
        equal = all(torch.equal(a.image, b.image) and torch.equal(a.target, b.target)
                    for a, b in zip(want, got))
        assert equal == same


def test_validation_test_and_aug_off_are_never_augmented():
    opts = parse_options(["--aug_on"], "x", "fedavg", "")
    assert with_augmentation(record, opts, train=False) is record
    assert isinstance(with_augmentation(record, opts, train=True), AugmentedTransform)
    assert with_augmentation(record, parse_options(["--demo"], "x", "fedavg", ""), train=True) is record


def test_slice_without_target_is_augmented_without_crashing(tmp_path):
    write_volume(tmp_path / "t.h5", coils=2, target=False, header=ismrmrd_header((16, 16, 1), (16, 16, 1), 8, 15))
    inner = UnetDataTransform("multicoil", RandomMaskFunc([0.125], [4]), use_seed=False)
    sample = augmented_dataset([tmp_path / "t.h5"], only("fliph"), inner)[0]
    assert sample.image.shape == (16, 16) and sample.target.shape == (1,)
    assert augmented_dataset([tmp_path / "t.h5"], only("fliph"))[0][2] is None


# --- header padding ---------------------------------------------------------------------------------

def test_header_padding_follows_flips_and_rot90_of_non_square_kspace(tmp_path):
    """k-space 16 x 12 acquired in columns [1, 11): after fliph the zero columns of the re-simulated
    k-space are exactly those outside the new padding; after an odd rot90 every column is acquired."""
    header = ismrmrd_header(encoding=(16, 12, 1), recon=(8, 8, 1), center=5, maximum=9)
    write_volume(tmp_path / "p.h5", shape=(16, 12), coils=2, header=header, columns=(1, 11))
    flipped = augmented_dataset([tmp_path / "p.h5"], only("fliph"))
    kspace, _, _, attrs, _, _, _ = flipped[0]
    assert (attrs["padding_left"], attrs["padding_right"]) == (2, 12)
    power = np.abs(kspace).sum(axis=(0, 1))
    assert (power[:2] < 1e-5).all() and (power[2:] > 1e-2).all()

    rotated = augmented_dataset([tmp_path / "p.h5"], only("rot90"))
    for i in range(len(rotated)):
        params, _, _, _ = drawn(rotated, i)
        kspace, _, target, attrs, _, _, _ = rotated[i]
        width = 16 if params.rot90 % 2 else 12
        assert kspace.shape[-1] == width
        assert (attrs["padding_left"], attrs["padding_right"]) == ((0, 16) if params.rot90 % 2 else (2, 12)
                                                                    if params.rot90 == 2 else (1, 11))
        assert target.shape == ((12, 12) if params.rot90 % 2 else (16, 12))


# --- reproducibility ----------------------------------------------------------------------------------

def loader_batches(dataset, num_workers: int, epochs_times=((0, 1),), persistent: bool = False):
    """Per epoch in ``epochs_times`` ((t, total) each): {(file, slice): (image, target)} and the
    order of the slices, from a DataLoader shuffled by a fixed seed."""
    loader = DataLoader(dataset, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0),
                        num_workers=num_workers, persistent_workers=persistent)
    out = []
    for t, total in epochs_times:
        dataset.set_time(t, total)
        samples, order = {}, []
        for b in loader:
            for i, key in enumerate(zip(b.fname, b.slice_num.tolist())):
                samples[key] = (b.image[i], b.target[i])
                order.append(key)
        out.append((samples, order))
    return out


def same(a, b, order: bool = True) -> bool:
    """Whether two ``loader_batches`` results hold equal samples (and, with ``order``, in one order)."""
    return all((not order or oa == ob) and sa.keys() == sb.keys()
               and all(torch.equal(sa[k][0], sb[k][0]) and torch.equal(sa[k][1], sb[k][1]) for k in sa)
               for (sa, oa), (sb, ob) in zip(a, b))


def test_augmented_batches_are_the_same_for_0_and_2_workers_and_persistent_workers_see_the_time(tmp_path):
    for k in range(2):
        write_volume(tmp_path / f"v{k}.h5", shape=(16, 16), coils=2, slices=3, seed=k)
    files = sorted(tmp_path.glob("*.h5"))
    config = AugmentConfig(strength=1.0, schedule="ramp", weights={k: 1.0 for k in PAPER_WEIGHTS})
    inner = UnetDataTransform("multicoil", RandomMaskFunc([0.125], [4]), use_seed=False)
    times = ((0, 4), (3, 4))  # p = 0, then p = 0.75
    serial = loader_batches(augmented_dataset(files, config, inner), 0, times)
    parallel = loader_batches(augmented_dataset(files, config, inner), 2, times)
    assert same(serial, parallel)
    # Persistent workers shuffle in another order (the DataLoader draws no new worker seed from the
    # generator): the same samples.
    persistent = loader_batches(augmented_dataset(files, config, inner), 2, times, persistent=True)
    assert same(serial, persistent, order=False)
    assert not same(serial[:1], serial[1:], order=False)  # the second epoch is augmented

    reseeded = augmented_dataset(files, config, inner)
    reseeded.set_epoch(EPOCH_SEED + 1)
    assert not same(serial[1:], loader_batches(reseeded, 0, times[1:]), order=False)


# --- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, flag", [
    (["--aug_strength", "1.5"], "--aug_strength"),
    (["--aug_strength", "-0.1"], "--aug_strength"),
    (["--aug_weight_rot90", "-1"], "--aug_weight_rot90"),
    (["--aug_schedule", "linear"], "--aug_schedule"),
    (["--aug_delay", "5", "--epochs", "5"], "--aug_delay"),
    (["--aug_delay", "10", "--epochs", "5", "--strategy", "central", "--local_ep", "2"], "--aug_delay"),
    (["--aug_interpolation_order", "2"], "--aug_interpolation_order"),
    (["--aug_max_translation_x", "1.2"], "--aug_max_translation_x"),
])
def test_bad_flags_raise_one_line_naming_the_flag(args, flag):
    opts = parse_options(["--aug_on", *args], "x", "fedavg", "")
    with pytest.raises(UserError) as err:
        check_augment_options(opts)
    message = str(err.value)
    assert message.startswith(flag) and "\n" not in message


def test_good_flags_pass_and_central_delay_counts_epochs():
    check_augment_options(parse_options(["--aug_on"], "x", "fedavg", ""))
    check_augment_options(parse_options(["--aug_delay", "7", "--epochs", "5", "--local_ep", "2",
                                         "--strategy", "central"], "x", "fedavg", ""), per_epoch=True)


def test_max_train_resolution_larger_than_the_data_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"^--max_train_resolution 20 16: larger than the 16 x 16"):
        check_max_train_resolution((20, 16), (3, 16, 16), "v.h5")
    write_volume(tmp_path / "v.h5", coils=2)
    with pytest.raises(UserError, match="--max_train_resolution"):
        augmented_dataset([tmp_path / "v.h5"], only("fliph", max_train_resolution=(16, 18)))[0]
    kspace, _, target, _, _, _, _ = augmented_dataset(
        [tmp_path / "v.h5"], only("fliph", max_train_resolution=(12, 10)))[0]
    assert kspace.shape == (2, 12, 10) and target.shape == (12, 10)
