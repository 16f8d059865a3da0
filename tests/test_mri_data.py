"""The slice dataset: indexing, reading each format, seeds, laziness, and bad input."""

import json
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import data.mri_data as mri_data
from data.mri_data import SliceDataset, center_fit, subsample_volumes
from data.sites import registry_for
from data.transforms import UnetDataTransform, ifft2c_np
from tests.helpers_data import (
    brain_like_volume,
    write_fastmri,
    write_h5_image,
    write_nifti,
)
from utils.errors import DataError


def echo(kspace, mask, target, attrs, fname, slice_num, seed):
    """Stand-in transform: hands back what the dataset passed."""
    return {"kspace": kspace, "mask": mask, "target": target, "attrs": attrs, "fname": fname,
            "slice_num": slice_num, "seed": seed}


def test_fastmri_singlecoil_slices_carry_kspace_target_and_attrs(tmp_path):
    kspace_a = write_fastmri(tmp_path / "a.h5", num_slices=3)
    write_fastmri(tmp_path / "b.h5", num_slices=2)
    ds = SliceDataset([tmp_path / "a.h5", tmp_path / "b.h5"], echo)

    assert len(ds) == ds.num_slices == 5
    assert ds.volumes() == [tmp_path / "a.h5", tmp_path / "b.h5"]
    assert ds.examples[:3] == [(tmp_path / "a.h5", s) for s in range(3)]
    sample = ds[1]
    assert sample["kspace"].dtype == np.complex64
    np.testing.assert_array_equal(sample["kspace"], kspace_a[1])
    assert sample["target"].dtype == np.float32 and sample["target"].shape == (8, 8)
    assert np.all(sample["target"] == 2.0)
    assert sample["mask"] is None and sample["seed"] is None
    assert (sample["fname"], sample["slice_num"]) == ("a.h5", 1)
    assert sample["attrs"]["max"] == 3.0 and sample["attrs"]["patient_id"] == "p1"


def test_ismrmrd_header_gives_sizes_and_padding_as_fastmri(tmp_path):
    # encoded 640x368, centre 180, maximum 367: padding_left = 368 // 2 - 180, right = left + 368.
    write_fastmri(tmp_path / "a.h5")
    attrs = SliceDataset([tmp_path / "a.h5"], echo)[0]["attrs"]
    assert attrs["encoding_size"] == (640, 368, 1)
    assert attrs["recon_size"] == (320, 320, 1)
    assert (attrs["padding_left"], attrs["padding_right"]) == (4, 372)


def test_header_is_optional_and_a_stored_mask_is_passed(tmp_path):
    write_fastmri(tmp_path / "test.h5", target=False, header=False, mask=True, shape=(16, 12))
    sample = SliceDataset([tmp_path / "test.h5"], echo)[0]
    assert sample["target"] is None
    assert "recon_size" not in sample["attrs"]
    np.testing.assert_array_equal(sample["mask"], np.arange(12) % 2 == 0)


def test_fastmri_multicoil_reads_coils_and_rss_target(tmp_path):
    kspace = write_fastmri(tmp_path / "m.h5", num_slices=2, coils=4)
    sample = SliceDataset([tmp_path / "m.h5"], echo, challenge="multicoil")[1]
    np.testing.assert_array_equal(sample["kspace"], kspace[1])
    assert sample["kspace"].shape == (4, 16, 12)
    assert np.all(sample["target"] == 2.0)


def test_challenge_that_does_not_match_the_file_is_a_data_error(tmp_path):
    write_fastmri(tmp_path / "single.h5")
    with pytest.raises(DataError, match=r"single\.h5.*multicoil"):
        SliceDataset([tmp_path / "single.h5"], echo, challenge="multicoil")


def test_nifti_site_from_sites_file_round_trips_kspace_to_the_same_image(tmp_path):
    # A BraTS-style 240x240 volume, slices on the last axis, named as a site in a sites file.
    volume = brain_like_volume((240, 240, 20))
    write_nifti(tmp_path / "brats" / "T1" / "train" / "BraTS20_001_t1.nii.gz", volume)
    sites_file = tmp_path / "sites.json"
    sites_file.write_text(json.dumps({"sites": {"B": {
        "root": "brats", "format": "nifti", "slice_range": [4, 16], "description": "BraTS"}}}))
    site = registry_for(None, sites_file)["B"]
    ds = SliceDataset(site.files("T1", "train"), echo, fmt=site.format, challenge=site.challenge,
                      resolution=256, slice_range=site.slice_range)

    assert [s for _, s in ds.examples] == list(range(4, 16))
    for i in (0, 5, 11):
        sample = ds[i]
        expected = np.zeros((256, 256), np.float32)
        expected[8:248, 8:248] = volume[:, :, sample["slice_num"]]
        assert sample["kspace"].dtype == np.complex64 and sample["kspace"].shape == (256, 256)
        back = ifft2c_np(sample["kspace"])
        np.testing.assert_allclose(back.real, expected, atol=1e-3 * volume.max())
        np.testing.assert_allclose(back.imag, 0, atol=1e-3 * volume.max())
        np.testing.assert_array_equal(sample["target"], expected)
        assert sample["attrs"]["max"] == pytest.approx(volume[:, :, 4:16].max())


def test_nifti_full_kspace_through_the_unet_transform_restores_the_target(tmp_path):
    volume = brain_like_volume((240, 240, 3))
    write_nifti(tmp_path / "ixi.nii.gz", volume)
    ds = SliceDataset([tmp_path / "ixi.nii.gz"], UnetDataTransform("singlecoil"), resolution=256)
    sample = ds[1]
    restored = sample.image * sample.std + sample.mean
    target = sample.target * sample.std + sample.mean
    torch.testing.assert_close(restored, target, atol=1e-3 * float(volume.max()), rtol=0)


def test_uncompressed_and_compressed_nifti_give_the_same_slices(tmp_path):
    volume = brain_like_volume((30, 26, 4))
    write_nifti(tmp_path / "v.nii", volume)
    write_nifti(tmp_path / "v.nii.gz", volume)
    plain = SliceDataset([tmp_path / "v.nii"], echo, resolution=32)
    packed = SliceDataset([tmp_path / "v.nii.gz"], echo, resolution=32)
    for i in range(4):
        np.testing.assert_array_equal(plain[i]["target"], packed[i]["target"])
        np.testing.assert_array_equal(plain[i]["kspace"], packed[i]["kspace"])
        assert plain[i]["attrs"]["max"] == packed[i]["attrs"]["max"]


def test_h5_image_stack_reads_image_or_reconstruction_dataset(tmp_path):
    stack = np.moveaxis(brain_like_volume((20, 18, 3)), -1, 0)  # (S, H, W)
    write_h5_image(tmp_path / "img.h5", stack)
    write_h5_image(tmp_path / "esc.h5", stack, key="reconstruction_esc")
    for name in ("img.h5", "esc.h5"):
        sample = SliceDataset([tmp_path / name], echo, fmt="h5_image", resolution=16)[2]
        np.testing.assert_array_equal(sample["target"], stack[2, 2:18, 1:17])
        assert sample["target"].max() > 0
        np.testing.assert_allclose(ifft2c_np(sample["kspace"]).real, sample["target"], atol=1e-2)
        assert sample["attrs"]["max"] == stack[:, 2:18, 1:17].max()
        assert sample["attrs"]["patient_id"] == "img"


def test_image_formats_give_one_coil_for_multicoil(tmp_path):
    write_nifti(tmp_path / "v.nii", brain_like_volume((16, 16, 2)))
    sample = SliceDataset([tmp_path / "v.nii"], echo, challenge="multicoil")[0]
    assert sample["kspace"].shape == (1, 16, 16)


def test_auto_format_decides_per_file(tmp_path):
    write_fastmri(tmp_path / "k.h5", num_slices=2)
    write_h5_image(tmp_path / "i.h5", np.ones((3, 16, 16), np.float32))
    write_nifti(tmp_path / "n.nii.gz", np.ones((16, 16, 4), np.float32))
    ds = SliceDataset([tmp_path / "k.h5", tmp_path / "i.h5", tmp_path / "n.nii.gz"], echo,
                      resolution=16)
    assert len(ds) == 9
    assert ds[0]["kspace"].shape == (16, 12) and ds[0]["target"].shape == (8, 8)
    assert ds[2]["kspace"].shape == (16, 16) and ds[2]["attrs"]["max"] == 1.0
    assert ds[8]["fname"] == "n.nii.gz"


def test_center_fit_pads_and_crops_about_the_centre():
    image = np.arange(6 * 5, dtype=np.float32).reshape(6, 5)
    padded = center_fit(image, 8)
    assert padded.shape == (8, 8)
    np.testing.assert_array_equal(padded[1:7, 1:6], image)
    np.testing.assert_array_equal(center_fit(padded, 5), padded[1:6, 1:6])
    for size, bigger in [(5, 8), (6, 9), (240, 256)]:
        square = np.random.default_rng(size).random((size, size))
        np.testing.assert_array_equal(center_fit(center_fit(square, bigger), size), square)
    assert center_fit(image, None) is image


def test_slice_range_keeps_python_slice_of_every_volume(tmp_path):
    for name in ("a.h5", "b.h5"):
        write_fastmri(tmp_path / name, num_slices=10)
    ds = SliceDataset([tmp_path / "a.h5", tmp_path / "b.h5"], echo, slice_range=(2, -3))
    assert ds.examples == [(tmp_path / n, s) for n in ("a.h5", "b.h5") for s in range(2, 7)]
    assert ds[0]["slice_num"] == 2


def test_slice_range_that_keeps_nothing_names_the_file(tmp_path):
    write_fastmri(tmp_path / "short.h5", num_slices=5)
    with pytest.raises(DataError, match=r"short\.h5 has 5 slices and slice_range \(14, 134\)"):
        SliceDataset([tmp_path / "short.h5"], echo, slice_range=(14, 134))


def test_set_epoch_seeds_each_slice_from_epoch_slice_and_file_name(tmp_path):
    write_fastmri(tmp_path / "f1.h5", num_slices=2)
    ds = SliceDataset([tmp_path / "f1.h5"], echo)
    assert ds[1]["seed"] is None
    ds.set_epoch(7)
    assert ds[1]["seed"] == (7, 1, ord("f"), ord("1"), ord("."), ord("h"), ord("5"))
    assert ds[0]["seed"] != ds[1]["seed"]
    ds.set_epoch(8)
    assert ds[1]["seed"][0] == 8
    ds.set_epoch(None)
    assert ds[1]["seed"] is None
    with pytest.raises(ValueError):
        ds.set_epoch(-1)


def seeds_of(item):
    return item[0]["fname"], item[0]["slice_num"], item[0]["seed"]


def test_seeds_do_not_depend_on_the_number_of_workers(tmp_path):
    for name in ("a.h5", "b.h5"):
        write_fastmri(tmp_path / name, num_slices=3)
    ds = SliceDataset([tmp_path / "a.h5", tmp_path / "b.h5"], echo)
    ds[0]  # the parent holds an open handle before the workers fork
    ds.set_epoch(3)
    by_workers = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=workers,
                                             collate_fn=lambda batch: batch)
        by_workers[workers] = [seeds_of(item) for item in loader]
    assert by_workers[0] == by_workers[2]
    assert len({seed for _, _, seed in by_workers[0]}) == 6


def test_dataset_pickles_after_reading_for_spawned_workers(tmp_path):
    kspace = write_fastmri(tmp_path / "a.h5")
    ds = SliceDataset([tmp_path / "a.h5"], echo)
    ds[0]
    copy = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(copy[2]["kspace"], kspace[2])


def test_index_reads_no_slice_data(tmp_path, monkeypatch):
    files = [tmp_path / f"v{i:03d}.h5" for i in range(50)]
    for path in files:
        write_fastmri(path, num_slices=4)
    write_h5_image(tmp_path / "img.h5", np.ones((4, 8, 8), np.float32))
    reads = []
    original = h5py.Dataset.__getitem__

    def spy(dataset, key):
        reads.append(dataset.name)
        return original(dataset, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    ds = SliceDataset(files + [tmp_path / "img.h5"], echo)
    assert len(ds) == 204
    assert not {"/kspace", "/reconstruction_esc", "/image"} & set(reads)
    ds[5]
    assert "/kspace" in reads


def test_compressed_nifti_is_decoded_once_for_consecutive_slices(tmp_path, monkeypatch):
    for name in ("a.nii.gz", "b.nii.gz"):
        write_nifti(tmp_path / name, brain_like_volume((16, 16, 5)))
    ds = SliceDataset([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"], echo)
    loads = []
    original = mri_data.nib.load
    monkeypatch.setattr(mri_data.nib, "load", lambda path, **kw: loads.append(path) or
                        original(path, **kw))
    for i in range(len(ds)):
        ds[i]
    assert loads == [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to count open files")
def test_open_files_per_process_stay_bounded(tmp_path):
    files = [tmp_path / f"v{i:02d}.h5" for i in range(mri_data._OPEN_FILES_PER_PROCESS + 10)]
    for path in files:
        write_fastmri(path, num_slices=1)
    ds = SliceDataset(files, echo)
    before = len(os.listdir("/proc/self/fd"))
    for i in range(len(ds)):
        ds[i]
    assert len(os.listdir("/proc/self/fd")) - before <= mri_data._OPEN_FILES_PER_PROCESS


def test_subsample_volumes_is_reproducible_sorted_and_keeps_at_least_one():
    files = [Path(f"/d/v{i:02d}.h5") for i in range(20)]
    half = subsample_volumes(files, 0.5, seed=1)
    assert half == subsample_volumes(list(reversed(files)), 0.5, seed=1)
    assert half == sorted(half) and len(half) == 10 and set(half) <= set(files)
    assert subsample_volumes(files, 0.5, seed=2) != half
    assert len(subsample_volumes(files, 0.001, seed=1)) == 1
    assert subsample_volumes(files, 1.0, seed=1) == files
    assert subsample_volumes(files, 0.0, seed=1) == []
    with pytest.raises(ValueError):
        subsample_volumes(files, 1.5, seed=1)


# Bad input: each raises a DataError naming the file.

def test_file_without_kspace_read_as_fastmri(tmp_path):
    write_h5_image(tmp_path / "images_only.h5", np.ones((2, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"images_only\.h5 has no 'kspace' dataset.*h5_image"):
        SliceDataset([tmp_path / "images_only.h5"], echo, fmt="fastmri_h5")


def test_truncated_hdf5_file(tmp_path):
    path = tmp_path / "cut.h5"
    write_fastmri(path, num_slices=20, shape=(64, 64))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut\.h5 cannot be opened as HDF5.*truncated"):
        SliceDataset([path], echo)


def test_file_that_is_not_hdf5(tmp_path):
    (tmp_path / "notes.h5").write_text("not an HDF5 file\n")
    with pytest.raises(DataError, match=r"notes\.h5 cannot be opened as HDF5"):
        SliceDataset([tmp_path / "notes.h5"], echo)


def test_corrupt_file_among_good_ones_fails_fast_naming_it(tmp_path):
    for name in ("good1.h5", "good2.h5"):
        write_fastmri(tmp_path / name)
    (tmp_path / "bad.h5").write_bytes(b"\x00" * 100)
    files = [tmp_path / "good1.h5", tmp_path / "bad.h5", tmp_path / "good2.h5"]
    with pytest.raises(DataError, match=r"^\S*bad\.h5 cannot be opened"):
        SliceDataset(files, echo)


def test_several_bad_files_are_all_named_in_one_line(tmp_path):
    write_fastmri(tmp_path / "good.h5")
    (tmp_path / "bad1.h5").write_bytes(b"x")
    write_nifti(tmp_path / "bad2.nii", np.ones((4, 4), np.float32))
    unusable = r"2 of 3 volume files are unusable: .*bad1\.h5.*bad2\.nii"
    with pytest.raises(DataError, match=unusable) as err:
        SliceDataset([tmp_path / "good.h5", tmp_path / "bad1.h5", tmp_path / "bad2.nii"], echo)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 3, 2)])
def test_nifti_that_is_not_3d(tmp_path, shape):
    write_nifti(tmp_path / "scan.nii.gz", np.ones(shape, np.float32))
    with pytest.raises(DataError, match=rf"scan\.nii\.gz holds a {len(shape)}-D image"):
        SliceDataset([tmp_path / "scan.nii.gz"], echo)


def test_truncated_uncompressed_nifti_fails_at_index_time(tmp_path):
    path = tmp_path / "cut.nii"
    write_nifti(path, brain_like_volume((16, 16, 4)))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"cut\.nii is truncated"):
        SliceDataset([path], echo)


def test_truncated_compressed_nifti_fails_when_read_naming_the_slice(tmp_path):
    path = tmp_path / "cut.nii.gz"
    write_nifti(path, np.random.default_rng(0).random((64, 64, 8), dtype=np.float32))
    path.write_bytes(path.read_bytes()[:2000])  # the header survives; the data do not
    ds = SliceDataset([path], echo)
    with pytest.raises(DataError, match=r"cannot read slice 3 of \S*cut\.nii\.gz"):
        ds[3]


def test_file_that_is_not_nifti(tmp_path):
    (tmp_path / "scan.nii").write_text("hello")
    with pytest.raises(DataError, match=r"scan\.nii is not a readable NIfTI file"):
        SliceDataset([tmp_path / "scan.nii"], echo)


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(DataError, match=r"gone\.h5 does not exist"):
        SliceDataset([tmp_path / "gone.h5"], echo)
    write_fastmri(tmp_path / "k.h5")
    with pytest.raises(DataError, match=r"k\.h5 is not a nifti volume file"):
        SliceDataset([tmp_path / "k.h5"], echo, fmt="nifti")


def test_nan_in_kspace_names_file_and_slice_when_read(tmp_path):
    path = tmp_path / "nan.h5"
    write_fastmri(path, num_slices=3)
    with h5py.File(path, "r+") as hf:
        hf["kspace"][1, 2, 2] = np.nan
    ds = SliceDataset([path], echo)
    ds[0]
    with pytest.raises(DataError, match=r"nan\.h5 slice 1: 'kspace' holds NaN or Inf"):
        ds[1]


def test_inf_in_target_names_file_and_slice(tmp_path):
    path = tmp_path / "inf.h5"
    write_fastmri(path, num_slices=3)
    with h5py.File(path, "r+") as hf:
        hf["reconstruction_esc"][2, 0, 0] = np.inf
    with pytest.raises(DataError, match=r"inf\.h5 slice 2: 'reconstruction_esc' holds NaN or Inf"):
        SliceDataset([path], echo)[2]


@pytest.mark.parametrize("name", ["bad.nii", "bad.nii.gz"])
def test_nan_in_nifti_names_the_bad_slice(tmp_path, name):
    volume = brain_like_volume((16, 16, 4))
    volume[3, 3, 2] = np.nan
    write_nifti(tmp_path / name, volume)
    ds = SliceDataset([tmp_path / name], echo)
    with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')} slice 2: .*NaN or Inf"):
        ds[2]
    # The volume's max covers every slice, so a clean slice of it fails too, naming slice 2.
    with pytest.raises(DataError, match=r"slice 2: .*NaN or Inf"):
        ds[0]
