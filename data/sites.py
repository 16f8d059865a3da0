"""The site registry: which hospital's data lives where, in which format, and how clients share it.

A site's volumes live in ``<root>/<sequence>/<split>/`` (split: train, val or test). The paper's
sites are letters: F = fastMRI brain, H = HPKS (private), I = IXI, B = BraTS 2020. A sites file
(JSON) adds sites under any name or replaces the defaults::

    {"sites": {"F": {"root": "F", "format": "fastmri_h5", "challenge": "singlecoil",
                     "slice_range": null, "description": "fastMRI brain"},
               "Site5": {"root": "/data/site5", "format": "nifti"}}}

``root`` is required (relative roots are relative to the file's folder); ``format`` defaults to
"auto", ``challenge`` to "singlecoil", ``slice_range`` to null and ``description`` to "".
Optional: ``multicoil_root``, where a fastMRI site's multicoil files live (``--challenge
multicoil`` reads them; default: ``root``), and ``sequence``, the site's own sequence folder,
which it uses whatever ``--sequence`` says (so one run can train on knee PD and validate on
brain T1)::

    {"sites": {"K": {"root": "K", "multicoil_root": "multicoil/K", "format": "fastmri_h5",
                     "sequence": "PD"}}}
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from data.mri_data import CHALLENGES, FORMATS, is_volume_file, subsample_volumes, volume_suffixes
from data.translation import Translation, parse_translation
from utils.errors import DataError, UserError

SITES_FILE_NAME = "sites.json"
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_SITE_KEYS = {"root", "format", "challenge", "slice_range", "description", "sequence", "multicoil_root", "tasks"}


@dataclass(frozen=True)
class Site:
    """One hospital's data: volumes in ``<root>/<sequence>/<split>/``.

    ``sequence``: the site's own sequence, used instead of the run's (None: the run's).
    ``multicoil_root``: where its multicoil files live, when not in ``root``.
    ``tasks``: the site's own synthesis translations (``--task synthesis``; pFLSynth's variable-task
    setting, e.g. ("T1->T2", "T2->PD")), used instead of the run's (empty: the run's).
    """

    name: str
    root: Path
    format: str = "auto"
    challenge: str = "singlecoil"
    slice_range: tuple[int, int] | None = None
    description: str = ""
    sequence: str | None = None
    multicoil_root: Path | None = None
    tasks: tuple[Translation, ...] = ()

    def with_challenge(self, challenge: str) -> Site:
        """This site read as ``challenge``: a fastMRI HDF5 site switches to its multicoil files
        (``multicoil_root`` when it has one); image sites are single-coil by nature and stay."""
        if self.format != "fastmri_h5":
            return self
        root = self.multicoil_root if challenge == "multicoil" and self.multicoil_root else self.root
        return replace(self, root=root, challenge=challenge)

    def files(self, sequence: str, split: str) -> list[Path]:
        """Sorted volume files of this site's format in ``<root>/<sequence>/<split>/``, where the
        site's own ``sequence`` (when set) replaces the one asked for.

        Raises ``DataError`` naming the folder when the root, the sequence folder or the split
        folder is missing, or the split folder holds no volume files.
        """
        if not self.root.is_dir():
            raise DataError(f"site '{self.name}': data folder {self.root} does not exist: put the "
                            "site's data there, or set its root with --data_root or --sites")
        sequence = self.sequence or sequence
        folder = self.root / sequence
        if not folder.is_dir():
            found = sorted(p.name for p in self.root.iterdir() if p.is_dir()) or ["none"]
            fix = ("set the site's \"sequence\" in the sites file to one of them" if self.sequence
                   else "pick one with --sequence")
            raise DataError(f"site '{self.name}': no sequence folder {folder}; sequences in "
                            f"{self.root}: {', '.join(found)}: {fix}")
        folder = folder / split
        if not folder.is_dir():
            raise DataError(f"site '{self.name}': split folder {folder} does not exist: create it "
                            f"with the {split} volumes")
        files = sorted(p for p in folder.iterdir()
                       if is_volume_file(p, self.format) and p.is_file())
        if not files:
            raise DataError(f"site '{self.name}': {folder} holds no volume files (names ending in "
                            f"{', '.join(volume_suffixes(self.format))} for format "
                            f"{self.format}): add them, or set the site's format in a sites file")
        return files


@dataclass(frozen=True)
class ClientSpec:
    """One federated client: a site, or one share of a site's training volumes (``B1``, ``B2``)."""

    name: str
    site: Site
    train_files: tuple[Path, ...]


def default_sites(data_root: Path) -> dict[str, Site]:
    """The paper's sites, each at ``data_root/<letter>``."""
    return {
        "F": Site("F", data_root / "F", "fastmri_h5", "singlecoil", None, "fastMRI brain"),
        "H": Site("H", data_root / "H", "fastmri_h5", "singlecoil", None, "HPKS (private)"),
        "I": Site("I", data_root / "I", "nifti", "singlecoil", None, "IXI"),
        "B": Site("B", data_root / "B", "nifti", "singlecoil", (14, 134), "BraTS 2020"),
    }


def load_sites_file(path: Path) -> dict[str, Site]:
    """Read the sites of a sites file (see the module docstring); ``DataError`` naming the file."""
    try:
        text = path.read_text()
    except OSError as err:
        problem = f"sites file {path} cannot be read ({err.strerror}): check --sites"
        raise DataError(problem) from None
    try:
        content = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"sites file {path} is not valid JSON (line {err.lineno}, column "
                        f"{err.colno}: {err.msg}): fix it") from None
    if not isinstance(content, dict) or not isinstance(content.get("sites"), dict):
        raise DataError(f'sites file {path} must hold {{"sites": {{"<name>": {{"root": ...}}}}}}: '
                        "fix its layout")
    return {name: _parse_site(path, name, entry) for name, entry in content["sites"].items()}


def _parse_site(path: Path, name: str, entry: Any) -> Site:
    where = f"sites file {path}, site '{name}'"
    if not _NAME.fullmatch(name):
        raise DataError(f"sites file {path}: site name '{name}' may only hold letters, digits, "
                        "'_' and '-': rename it")
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object with a \"root\", got {json.dumps(entry)}")
    unknown = sorted(set(entry) - _SITE_KEYS)
    if unknown:
        raise DataError(f"{where}: unknown key {', '.join(map(repr, unknown))}; known: "
                        f"{', '.join(sorted(_SITE_KEYS))}")
    if not isinstance(entry.get("root"), str) or not entry["root"]:
        raise DataError(f"{where}: missing \"root\" (the site's data folder): add it")
    fmt = entry.get("format", "auto")
    if fmt not in FORMATS:
        raise DataError(f"{where}: unknown format {json.dumps(fmt)}; known: {', '.join(FORMATS)}")
    challenge = entry.get("challenge", "singlecoil")
    if challenge not in CHALLENGES:
        raise DataError(f"{where}: unknown challenge {json.dumps(challenge)}; known: "
                        f"{', '.join(CHALLENGES)}")
    slice_range = entry.get("slice_range")
    if slice_range is not None:
        if not (isinstance(slice_range, list) and len(slice_range) == 2
                and all(type(v) is int for v in slice_range)):
            raise DataError(f"{where}: slice_range must be null or [start, stop] (integers), got "
                            f"{json.dumps(slice_range)}")
        slice_range = (slice_range[0], slice_range[1])
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise DataError(f"{where}: description must be a string")
    sequence = entry.get("sequence")
    if sequence is not None and (not isinstance(sequence, str) or not _NAME.fullmatch(sequence)):
        raise DataError(f"{where}: sequence must be the name of a sequence folder (e.g. \"PD\"), "
                        f"got {json.dumps(sequence)}")
    multicoil_root = entry.get("multicoil_root")
    if multicoil_root is not None and (not isinstance(multicoil_root, str) or not multicoil_root):
        raise DataError(f"{where}: multicoil_root must be a folder path, got {json.dumps(multicoil_root)}")
    tasks = entry.get("tasks", [])
    if not isinstance(tasks, list):
        raise DataError(f"{where}: tasks must be a list of translations like [\"T1->T2\", \"T2->PD\"], got "
                        f"{json.dumps(tasks)}")
    tasks = tuple(dict.fromkeys(parse_translation(t, f"{where}, tasks") for t in tasks))
    return Site(name, _absolute(path, entry["root"]), fmt, challenge, slice_range, description,
                sequence, _absolute(path, multicoil_root) if multicoil_root else None, tasks)


def _absolute(sites_file: Path, root: str) -> Path:
    # Absolute, so that a later change of working folder cannot move it; symlinks stay as written.
    return Path(os.path.abspath(sites_file.parent / Path(root).expanduser()))


def declared_resolution(data_root: Path | None, sites_file: Path | None) -> int | None:
    """The image size a sites file declares with a top-level ``"resolution"`` (the synthetic sites
    do), or None; the sites file is ``sites_file`` or else ``data_root/sites.json``."""
    path = sites_file or (data_root / SITES_FILE_NAME if data_root is not None else None)
    if path is None or not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("resolution")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None  # load_sites_file reports a malformed file with its line
    if value is not None and (type(value) is not int or value < 1):
        raise DataError(f"sites file {path}: \"resolution\" must be a positive integer, got {json.dumps(value)}")
    return value


def registry_for(data_root: Path | None, sites_file: Path | None) -> dict[str, Site]:
    """The sites a run can name.

    With ``sites_file``: the default letters at ``data_root`` (when given), replaced or extended by
    the file's sites. Else, when ``data_root`` holds a ``sites.json`` (as the synthetic generator
    writes), exactly the sites of that file. Else the default letters at ``data_root``.
    """
    if data_root is not None and not data_root.is_dir():
        raise DataError(f"--data_root {data_root} is not a folder: pass the folder holding the "
                        "site folders")
    if sites_file is not None:
        registry = default_sites(data_root) if data_root is not None else {}
        registry.update(load_sites_file(sites_file))
        return registry
    if data_root is None:
        raise UserError("no data given: pass --data_root (a folder of site folders) or "
                        "--sites (a JSON sites file)")
    if (data_root / SITES_FILE_NAME).is_file():
        return load_sites_file(data_root / SITES_FILE_NAME)
    return default_sites(data_root)


def parse_site_list(
    spec: str, registry: dict[str, Site], flag: str = "--train_dataset"
) -> list[str]:
    """Site names of ``spec``: letters ("BFHI"), one whole name ("Site5"), or commas ("F,Site5").

    Raises ``UserError`` naming ``flag`` for unknown, repeated or no names.
    """
    if "," in spec:
        names = [n.strip() for n in spec.split(",") if n.strip()]
    elif spec in registry:
        names = [spec]
    else:
        names = [c for c in spec if not c.isspace()]
    known = ", ".join(sorted(registry)) or "none"
    if not names:
        raise UserError(f"{flag} is empty: name one or more sites; known: {known}")
    unknown = [n for n in dict.fromkeys(names) if n not in registry]
    if unknown:
        raise UserError(f"{flag} {spec}: unknown site {', '.join(map(repr, unknown))}; known: "
                        f"{known} (add sites with --sites)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"{flag} {spec}: site {', '.join(map(repr, repeated))} named twice: name "
                        "each site once")
    return names


def assign_clients(
    sites: list[Site], num_users: int, sequence: str, sample_rate: float, seed: int
) -> list[ClientSpec]:
    """Clients over ``sites``' training volumes (``--sample_rate`` of them, chosen by ``seed``).

    ``num_users == len(sites)``: one client per site. ``num_users == k * len(sites)``: each site's
    volumes are dealt round-robin (sorted, never splitting a volume) to ``k`` clients named
    ``<site>1`` .. ``<site>k`` (``<site>_1`` .. when the name ends in a digit). Any other
    ``num_users`` raises ``UserError``, as does a site with fewer volumes than clients.
    """
    if not sites:
        raise ValueError("assign_clients needs at least one site")
    if num_users < len(sites) or num_users % len(sites) != 0:
        valid = ", ".join(str(len(sites) * k) for k in (1, 2, 3))
        raise UserError(f"--num_users {num_users} does not fit {len(sites)} training sites "
                        f"({', '.join(s.name for s in sites)}): use a multiple of {len(sites)} "
                        f"({valid}, ...)")
    per_site = num_users // len(sites)
    clients = []
    for site in sites:
        files = subsample_volumes(site.files(sequence, "train"), sample_rate, seed)
        if len(files) < per_site:
            raise UserError(f"site '{site.name}' has {len(files)} training volumes in "
                            f"{site.root / (site.sequence or sequence) / 'train'} (at --sample_rate {sample_rate}) "
                            f"but --num_users {num_users} gives it {per_site} clients: lower "
                            "--num_users or raise --sample_rate")
        if per_site == 1:
            clients.append(ClientSpec(site.name, site, tuple(files)))
            continue
        joiner = "_" if site.name[-1].isdigit() else ""
        for k in range(per_site):
            name = f"{site.name}{joiner}{k + 1}"
            clients.append(ClientSpec(name, site, tuple(files[k::per_site])))
    return clients
