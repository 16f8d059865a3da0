"""The site registry: default letters, sites files, site lists and clients."""

import json
from pathlib import Path

import numpy as np
import pytest

from data.sites import (
    Site,
    assign_clients,
    default_sites,
    load_sites_file,
    parse_site_list,
    registry_for,
)
from tests.helpers_data import write_fastmri, write_nifti
from utils.errors import DataError, UserError


def touch_volumes(folder: Path, names: list[str]) -> list[Path]:
    """Empty files named like volumes (enough for listing; not for reading)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).touch()
    return sorted(folder / n for n in names)


def write_sites_file(path: Path, sites: dict) -> Path:
    path.write_text(json.dumps({"sites": sites}))
    return path


def test_default_sites_are_the_paper_letters(tmp_path):
    sites = default_sites(tmp_path)
    assert sorted(sites) == ["B", "F", "H", "I"]
    assert sites["F"].root == tmp_path / "F" and sites["F"].format == "fastmri_h5"
    assert sites["H"].format == "fastmri_h5"
    assert sites["I"].format == "nifti" and sites["I"].slice_range is None
    assert sites["B"].format == "nifti" and sites["B"].slice_range == (14, 134)


def test_site_files_are_sorted_volume_files_of_its_format(tmp_path):
    folder = tmp_path / "I" / "T1" / "train"
    expected = touch_volumes(folder, ["IXI012.nii.gz", "IXI002.nii", "IXI010.nii.gz"])
    touch_volumes(folder, ["notes.txt", "._IXI002.nii", "other.h5"])
    (folder / "sub.nii").mkdir()
    assert default_sites(tmp_path)["I"].files("T1", "train") == expected
    site = Site("A", tmp_path / "I", "auto")
    assert [p.name for p in site.files("T1", "train")][-1] == "other.h5"


def test_missing_site_root_names_the_folder(tmp_path):
    with pytest.raises(DataError, match=r"site 'H': data folder \S*/H does not exist"):
        default_sites(tmp_path)["H"].files("T1", "train")


def test_missing_sequence_folder_lists_the_sequences_found(tmp_path):
    touch_volumes(tmp_path / "F" / "T1" / "train", ["a.h5"])
    (tmp_path / "F" / "FLAIR").mkdir()
    found = r"no sequence folder \S*/F/T2; sequences in \S*: FLAIR, T1: pick one with --sequence"
    with pytest.raises(DataError, match=found):
        default_sites(tmp_path)["F"].files("T2", "train")


def test_missing_split_folder_names_it(tmp_path):
    touch_volumes(tmp_path / "F" / "T1" / "train", ["a.h5"])
    with pytest.raises(DataError, match=r"split folder \S*/F/T1/val does not exist"):
        default_sites(tmp_path)["F"].files("T1", "val")


def test_split_folder_without_volumes_names_it_and_the_suffixes(tmp_path):
    touch_volumes(tmp_path / "B" / "T1" / "test", ["a.h5", "readme.txt"])
    with pytest.raises(DataError, match=r"\S*/B/T1/test holds no volume files \(names ending in "
                                        r"\.nii, \.nii\.gz for format nifti\)"):
        default_sites(tmp_path)["B"].files("T1", "test")


def test_sites_file_adds_a_fifth_site_and_overrides_one(tmp_path, monkeypatch):
    config = tmp_path / "config"
    config.mkdir()
    write_sites_file(config / "sites.json", {
        "B": {"root": "brats_h5", "format": "h5_image", "slice_range": None},
        "Site5": {"root": str(tmp_path / "site5"), "format": "nifti", "challenge": "singlecoil",
                  "slice_range": [2, 8], "description": "fifth hospital"},
    })
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(config)  # a relative root follows the sites file, not the working folder
    registry = registry_for(tmp_path / "data", Path("../config/sites.json"))
    assert sorted(registry) == ["B", "F", "H", "I", "Site5"]
    assert registry["F"] == default_sites(tmp_path / "data")["F"]
    assert registry["B"] == Site("B", config / "brats_h5", "h5_image", "singlecoil", None, "")
    assert registry["Site5"] == Site("Site5", tmp_path / "site5", "nifti", "singlecoil", (2, 8),
                                     "fifth hospital")


def test_sites_file_without_data_root_holds_only_its_sites(tmp_path):
    sites_file = write_sites_file(tmp_path / "s.json", {"X": {"root": "x"}})
    registry = registry_for(None, sites_file)
    assert list(registry) == ["X"]
    assert registry["X"].format == "auto" and registry["X"].challenge == "singlecoil"


def test_sites_json_inside_data_root_defines_its_sites(tmp_path):
    write_sites_file(tmp_path / "sites.json", {"S1": {"root": "S1"}, "S2": {"root": "S2"}})
    registry = registry_for(tmp_path, None)
    assert sorted(registry) == ["S1", "S2"]
    assert registry["S1"].root == tmp_path / "S1"


def test_data_root_alone_gives_default_letters(tmp_path):
    assert registry_for(tmp_path, None) == default_sites(tmp_path)


def test_registry_needs_some_data(tmp_path):
    with pytest.raises(UserError, match=r"--data_root.*--sites "):
        registry_for(None, None)
    with pytest.raises(DataError, match=r"--data_root \S*/nowhere is not a folder"):
        registry_for(tmp_path / "nowhere", None)


@pytest.mark.parametrize("text, problem", [
    ('{"sites": {\n  "F": {"root": "F"},\n  "X": {"root": "x",}\n}}',
     r"is not valid JSON \(line 3, column \d+"),
    ('{"sites": {"X": {"root": "x", "format": "dicom"}}}',
     r"site 'X': unknown format \"dicom\"; known: fastmri_h5, nifti, h5_image, auto"),
    ('{"sites": {"X": {"format": "nifti"}}}', r"site 'X': missing \"root\""),
    ('{"sites": {"X": {"root": "x", "slice_rage": [1, 2]}}}', r"unknown key 'slice_rage'"),
    ('{"sites": {"X": {"root": "x", "slice_range": [1]}}}', r"slice_range must be null or"),
    ('{"sites": {"X": {"root": "x", "challenge": "dualcoil"}}}', r"unknown challenge"),
    ('{"sites": {"X,Y": {"root": "x"}}}', r"site name 'X,Y' may only hold"),
    ('{"sites": {"X": "x"}}', r"site 'X': expected an object"),
    ('["F", "H"]', r"must hold \{\"sites\""),
])
def test_malformed_sites_file_names_the_file_and_the_problem(tmp_path, text, problem):
    path = tmp_path / "my_sites.json"
    path.write_text(text)
    with pytest.raises(DataError, match=r"sites file \S*my_sites\.json.*" + problem):
        load_sites_file(path)


def test_missing_sites_file(tmp_path):
    with pytest.raises(DataError, match=r"sites file \S*absent\.json cannot be read"):
        load_sites_file(tmp_path / "absent.json")


def test_parse_site_list_letters_names_and_commas(tmp_path):
    registry = {**default_sites(tmp_path), "Site5": Site("Site5", tmp_path / "s5")}
    assert parse_site_list("BFHI", registry) == ["B", "F", "H", "I"]
    assert parse_site_list("F,Site5", registry) == ["F", "Site5"]
    assert parse_site_list("Site5", registry) == ["Site5"]
    assert parse_site_list(" F, H ", registry) == ["F", "H"]


def test_parse_site_list_unknown_names_the_flag_and_lists_known(tmp_path):
    registry = default_sites(tmp_path)
    with pytest.raises(UserError, match=r"^--train_dataset BFXZ: unknown site 'X', 'Z'; known: "
                                        r"B, F, H, I"):
        parse_site_list("BFXZ", registry)
    with pytest.raises(UserError, match=r"^--test_dataset Q: unknown site 'Q'"):
        parse_site_list("Q", registry, flag="--test_dataset")
    with pytest.raises(UserError, match=r"site 'B' named twice"):
        parse_site_list("BFB", registry)
    with pytest.raises(UserError, match=r"--train_dataset is empty"):
        parse_site_list(",", registry)


def make_sites(root: Path, counts: dict[str, int]) -> list[Site]:
    sites = []
    for name, count in counts.items():
        touch_volumes(root / name / "T1" / "train", [f"{name}{i:02d}.h5" for i in range(count)])
        sites.append(Site(name, root / name, "fastmri_h5"))
    return sites


def test_one_client_per_site(tmp_path):
    sites = make_sites(tmp_path, {"F": 3, "H": 2, "I": 4, "B": 5})
    clients = assign_clients(sites, 4, "T1", sample_rate=1.0, seed=0)
    assert [c.name for c in clients] == ["F", "H", "I", "B"]
    assert [c.site for c in clients] == sites
    assert clients[3].train_files == tuple(sites[3].files("T1", "train"))


def test_sites_split_round_robin_into_whole_volumes(tmp_path):
    sites = make_sites(tmp_path, {"B": 5, "F": 4})
    clients = assign_clients(sites, 4, "T1", sample_rate=1.0, seed=0)
    assert [c.name for c in clients] == ["B1", "B2", "F1", "F2"]
    volumes = sites[0].files("T1", "train")
    assert clients[0].train_files == tuple(volumes[0::2])
    assert clients[1].train_files == tuple(volumes[1::2])
    assert clients[2].site == clients[3].site == sites[1]
    assert len(clients[2].train_files) == len(clients[3].train_files) == 2


def test_split_site_names_ending_in_a_digit_get_a_separator(tmp_path):
    sites = make_sites(tmp_path, {"Site5": 2})
    assert [c.name for c in assign_clients(sites, 2, "T1", 1.0, 0)] == ["Site5_1", "Site5_2"]


def test_num_users_that_does_not_fit_the_sites(tmp_path):
    sites = make_sites(tmp_path, {"F": 3, "H": 3, "I": 3, "B": 3})
    with pytest.raises(UserError, match=r"^--num_users 6 does not fit 4 training sites \(F, H, I, "
                                        r"B\): use a multiple of 4 \(4, 8, 12"):
        assign_clients(sites, 6, "T1", 1.0, 0)
    with pytest.raises(UserError, match=r"--num_users 2"):
        assign_clients(sites, 2, "T1", 1.0, 0)


def test_site_with_fewer_volumes_than_clients(tmp_path):
    sites = make_sites(tmp_path, {"F": 4, "H": 2})
    with pytest.raises(UserError, match=r"site 'H' has 2 training volumes .*--num_users 6 gives it "
                                        r"3 clients"):
        assign_clients(sites, 6, "T1", 1.0, 0)


def test_sample_rate_subsamples_each_site_reproducibly(tmp_path):
    sites = make_sites(tmp_path, {"F": 10, "H": 10})
    first = assign_clients(sites, 2, "T1", sample_rate=0.3, seed=5)
    assert [len(c.train_files) for c in first] == [3, 3]
    assert first == assign_clients(sites, 2, "T1", sample_rate=0.3, seed=5)


def test_clients_read_through_the_slice_dataset(tmp_path):
    """A site's client files are what SliceDataset indexes: fastMRI and NIfTI sites side by side."""
    from data.mri_data import SliceDataset

    write_fastmri(tmp_path / "F" / "T1" / "train" / "f1.h5", num_slices=2)
    write_nifti(tmp_path / "B" / "T1" / "train" / "b1.nii.gz",
                np.ones((16, 16, 20), np.float32))
    registry = registry_for(tmp_path, None)
    clients = assign_clients([registry[n] for n in parse_site_list("FB", registry)], 2, "T1",
                             1.0, 0)
    sizes = [len(SliceDataset(c.train_files, lambda *a: a, fmt=c.site.format,
                              challenge=c.site.challenge, slice_range=c.site.slice_range))
             for c in clients]
    assert sizes == [2, 6]  # BraTS keeps slices 14..19 of 20


def test_sites_file_gives_a_site_its_own_sequence_and_multicoil_root(tmp_path):
    sites_file = write_sites_file(tmp_path / "s.json", {
        "K": {"root": "knee", "format": "fastmri_h5", "sequence": "PD", "multicoil_root": "mc/knee"},
        "F": {"root": "brain", "format": "fastmri_h5"},
        "I": {"root": "ixi", "format": "nifti", "multicoil_root": "ixi_mc"},
    })
    registry = registry_for(None, sites_file)
    assert registry["K"].sequence == "PD" and registry["K"].multicoil_root == tmp_path / "mc" / "knee"
    assert registry["F"].sequence is None and registry["F"].multicoil_root is None
    touch_volumes(tmp_path / "knee" / "PD" / "train", ["k1.h5"])
    touch_volumes(tmp_path / "brain" / "T1" / "train", ["f1.h5"])
    assert registry["K"].files("T1", "train") == [tmp_path / "knee" / "PD" / "train" / "k1.h5"]
    assert registry["F"].files("T1", "train") == [tmp_path / "brain" / "T1" / "train" / "f1.h5"]

    multicoil = {name: site.with_challenge("multicoil") for name, site in registry.items()}
    assert multicoil["K"].root == tmp_path / "mc" / "knee" and multicoil["K"].challenge == "multicoil"
    assert multicoil["F"].root == tmp_path / "brain" and multicoil["F"].challenge == "multicoil"
    assert multicoil["I"] == registry["I"]  # image sites are single-coil by nature


def test_site_sequence_folder_missing_names_the_sites_file_setting(tmp_path):
    touch_volumes(tmp_path / "knee" / "PDFS" / "train", ["k1.h5"])
    site = Site("K", tmp_path / "knee", "fastmri_h5", sequence="PD")
    with pytest.raises(DataError, match=r"no sequence folder \S*knee/PD; sequences in \S*: PDFS: set "
                                        r"the site's \"sequence\" in the sites file"):
        site.files("T1", "train")


@pytest.mark.parametrize("entry, problem", [
    ({"root": "x", "sequence": 1}, r"sequence must be the name of a sequence folder"),
    ({"root": "x", "sequence": "a/b"}, r"sequence must be the name of a sequence folder"),
    ({"root": "x", "multicoil_root": ""}, r"multicoil_root must be a folder path"),
])
def test_malformed_sequence_or_multicoil_root(tmp_path, entry, problem):
    path = write_sites_file(tmp_path / "bad.json", {"X": entry})
    with pytest.raises(DataError, match=r"sites file \S*bad\.json, site 'X': " + problem):
        load_sites_file(path)
