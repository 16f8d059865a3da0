"""Grid files: a JSON spec of named runs, each an entry script plus flags, expanded into `RunSpec`s.

A grid lists runs explicitly (`runs`), compactly as common flags times the product of `axes`, or
both. Flags are written as an object `{"flag": value}` (no dashes needed): a string or number is
one argument, a list several (`"accelerations": [4, 8]`), `true` the bare flag, `false`/`null`
leaves it out. Later flags replace earlier ones, in this order: the grid's `flags`, the scale's
`flags`, each axis value's `flags` in axis order, an explicit run's `flags`, and last the extra flags
given on the runner's command line. Example (see `experiments/grids/` for complete ones):

    {"description": "FL-MR vs FL-MRCM",
     "entry": "main_fl_mr.py",
     "flags": {"train_dataset": "BFHI", "test_dataset": "H"},
     "test_phase": true,
     "axes": {"sequence": {"flag": "sequence", "values": ["T1", "T2"]},
              "method": {"values": {"fl-mr": {"label": "FL-MR"},
                                    "fl-mrcm": {"label": "FL-MRCM", "entry": "main_fl_mrcm.py"}}}},
     "table": {"rows": "method"},
     "scales": {"demo": {"flags": {"epochs": 3}}, "paper": {"flags": {"epochs": 50}}}}

expands to the runs `T1_fl-mr`, `T1_fl-mrcm`, `T2_fl-mr`, `T2_fl-mrcm` (axis value names joined
by `_`). A scale may also keep only some values of an axis: `"axes": {"target": ["H"]}`.
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ENTRY = "main_fl_mr.py"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]*$")  # `_` joins axis values into run names
# The runner sets these itself for every run.
RUNNER_FLAGS = {"save_dir", "continues", "resume", "overwrite", "phase", "checkpoint"}
TOP_KEYS = {"description", "entry", "flags", "test_phase", "test_flags", "axes", "runs", "table", "scales"}
TABLE_KEYS = {"rows", "columns", "seeds"}
# `"table": {"columns": "sites"}`: a column per site (and task) each run evaluates, not only its target.
EVERY_SITE = "sites"

Flags = dict[str, tuple[str, Any]]  # argparse dest -> (option string, JSON value)


class GridError(UserError):
    """A grid file (or the flags given with it) that cannot be expanded into runs."""


@dataclass(frozen=True)
class RunSpec:
    """One run of a grid: `python <entry> <argv> --save_dir <out>/<name>`, then, with `test_phase`,
    the same with `--phase test --checkpoint <out>/<name>/best.pt` and `test_argv` (the grid's
    `test_flags`, e.g. more sites to test on).

    `coords` places the run in tables and figures: axis name -> value name.
    """
    name: str
    entry: str
    argv: tuple[str, ...]
    coords: dict[str, str]
    test_phase: bool
    test_argv: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"name": self.name, "entry": self.entry, "argv": list(self.argv), "coords": self.coords,
                "test_phase": self.test_phase, "test_argv": list(self.test_argv)}


@dataclass
class Grid:
    """An expanded grid: its runs, the labels of its axis values, and how its tables are laid out
    (`table`: which axis gives the rows, which the columns, which holds repeated seeds)."""
    path: Path
    scale: str | None
    description: str
    runs: list[RunSpec]
    axes: dict[str, dict[str, str]]  # axis -> value name -> label, in file order
    table: dict[str, str | None]

    def to_json(self) -> dict:
        return {"grid": str(self.path), "scale": self.scale, "description": self.description,
                "axes": self.axes, "table": self.table, "runs": [r.to_json() for r in self.runs]}


@dataclass(frozen=True)
class _Value:
    """One value of an axis."""
    name: str
    label: str
    entry: str | None
    flags: Flags


def load_grid(path: Path, scale: str | None, extra_argv: list[str]) -> Grid:
    """Read and expand the grid file `path` at `scale`; `extra_argv` is appended to every run.

    Raises GridError, naming the file and the problem, for anything that would not run.
    """
    path = Path(path)
    spec = _read_json(path)
    return _Expander(path, spec).expand(scale, list(extra_argv))


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise GridError(f"{path}: no such grid file") from None
    except OSError as e:
        raise GridError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise GridError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(spec, dict):
        raise GridError(f"{path}: must hold a JSON object with 'axes' and/or 'runs'")
    return spec


class _Expander:
    """Checks a grid spec piece by piece; every error names the file and the key at fault."""

    def __init__(self, path: Path, spec: dict):
        from options import build_parser

        self.path = path
        self.spec = spec
        self.parser = build_parser("grid", "fedavg", "")
        self.parser.error = self._parser_error  # argparse reports every bad flag through error()
        self.actions = self.parser._option_string_actions
        self._where = ""

    def fail(self, where: str, problem: str) -> GridError:
        return GridError(f"{self.path}: {where}: {problem}")

    def _parser_error(self, message: str) -> None:
        raise self.fail(self._where, message)

    def expand(self, scale: str | None, extra_argv: list[str]) -> Grid:
        spec = self.spec
        unknown = sorted(set(spec) - TOP_KEYS)
        if unknown:
            raise self.fail(unknown[0], f"unknown key; a grid has {', '.join(sorted(TOP_KEYS))}")
        common = self.flags(spec.get("flags", {}), "flags")
        entry = self.entry(spec.get("entry", DEFAULT_ENTRY), "entry")
        test_phase = spec.get("test_phase", False)
        if not isinstance(test_phase, bool):
            raise self.fail("test_phase", "must be true or false")
        scale_flags, keep = self.scale(scale)
        axes = self.axes(spec.get("axes", {}), keep)
        runs = [self.product_run(list(axes), combo, entry, common, scale_flags, test_phase)
                for combo in itertools.product(*axes.values())] if axes else []
        runs += self.explicit_runs(spec.get("runs", {}), entry, common, scale_flags, test_phase)
        if not runs:
            raise self.fail("axes/runs", "the grid has no runs; give 'axes' or 'runs'")
        names = [r.name for r in runs]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise self.fail("runs", f"two runs are named {duplicate!r}")
        test_argv = tuple(render(self.flags(spec.get("test_flags", {}), "test_flags")))
        runs = [RunSpec(r.name, r.entry, r.argv + tuple(extra_argv), r.coords, r.test_phase, test_argv) for r in runs]
        for run in runs:
            self.check_argv(run, extra_argv)
        labels = {axis: {v.name: v.label for v in values} for axis, values in axes.items()}
        return Grid(self.path, scale, str(spec.get("description", "")), runs, labels,
                    self.table(spec.get("table", {}), runs))

    # ---- pieces -------------------------------------------------------------------------------
    def flags(self, raw: Any, where: str) -> Flags:
        if not isinstance(raw, dict):
            raise self.fail(where, 'must be an object of flags, e.g. {"epochs": 50}')
        out: Flags = {}
        for key, value in raw.items():
            option = "--" + str(key).lstrip("-")
            action = self.actions.get(option)
            if action is None:
                raise self.fail(where, f"unknown flag {option} (`python main_fl_mr.py --help` lists them)")
            if action.dest in RUNNER_FLAGS:
                raise self.fail(where, f"{option} is set by the runner for every run; leave it out")
            scalars = value if isinstance(value, list) else [value]
            if not all(v is None or isinstance(v, (str, int, float, bool)) for v in scalars):
                raise self.fail(f"{where}.{key}", "must be a string, number, true/false/null or a list of them")
            out[action.dest] = (option, value)
        return out

    def entry(self, raw: Any, where: str) -> str:
        if not isinstance(raw, str) or not raw.endswith(".py") or not (REPO_ROOT / raw).is_file():
            raise self.fail(where, f"{raw!r} is not an entry script of this project (e.g. main_fl_mr.py)")
        return raw

    def name(self, raw: Any, where: str) -> str:
        if not isinstance(raw, str) or not NAME.match(raw):
            raise self.fail(where, f"{raw!r} cannot name a run folder: use letters, digits, '.', '+', '-'")
        return raw

    def scale(self, scale: str | None) -> tuple[Flags, dict[str, list[str]]]:
        scales = self.spec.get("scales")
        if scales is None:
            if scale is not None:
                raise self.fail("scales", f"the grid defines no scales, so --scale {scale} has no meaning")
            return {}, {}
        if not isinstance(scales, dict) or not scales:
            raise self.fail("scales", 'must be an object of scale name -> {"flags": ..., "axes": ...}')
        if scale is None:
            raise self.fail("scales", f"choose one with --scale ({', '.join(scales)})")
        if scale not in scales:
            raise self.fail("scales", f"no scale {scale!r}; choose one of {', '.join(scales)}")
        raw = scales[scale]
        where = f"scales.{scale}"
        if not isinstance(raw, dict) or set(raw) - {"description", "flags", "axes"}:
            raise self.fail(where, "must be an object with 'description', 'flags' and 'axes'")
        keep = raw.get("axes", {})
        if not isinstance(keep, dict) or not all(isinstance(v, list) and v for v in keep.values()):
            raise self.fail(f"{where}.axes", "must map axis names to non-empty lists of value names")
        return self.flags(raw.get("flags", {}), f"{where}.flags"), {k: [str(x) for x in v] for k, v in keep.items()}

    def axes(self, raw: Any, keep: dict[str, list[str]]) -> dict[str, list[_Value]]:
        if not isinstance(raw, dict):
            raise self.fail("axes", "must be an object of axis name -> {...}")
        axes = {name: self.axis(name, spec) for name, spec in raw.items()}
        for name, wanted in keep.items():
            if name not in axes:
                raise self.fail(f"scales: axes.{name}", "no such axis in 'axes'")
            known = {v.name for v in axes[name]}
            missing = [w for w in wanted if w not in known]
            if missing:
                raise self.fail(f"scales: axes.{name}", f"no value {missing[0]!r}; the axis has {', '.join(known)}")
            axes[name] = [v for v in axes[name] if v.name in wanted]
        return axes

    def axis(self, name: str, raw: Any) -> list[_Value]:
        where = f"axes.{name}"
        if not isinstance(raw, dict) or set(raw) - {"flag", "values"} or "values" not in raw:
            raise self.fail(where, 'must be {"flag": F, "values": [...]} or {"values": {name: {...}}}')
        values = raw["values"]
        if "flag" in raw:
            if not isinstance(values, list) or not values:
                raise self.fail(where, "with 'flag', 'values' must be a non-empty list")
            return [_Value(self.name(str(v), f"{where}.values"), str(v), None,
                           self.flags({raw["flag"]: v}, where)) for v in values]
        if not isinstance(values, dict) or not values:
            raise self.fail(where, "'values' must be a non-empty object of value name -> {label, entry, flags}")
        out = []
        for value, body in values.items():
            vwhere = f"{where}.values.{value}"
            if not isinstance(body, dict) or set(body) - {"label", "entry", "flags"}:
                raise self.fail(vwhere, "must be an object with 'label', 'entry' and/or 'flags'")
            entry = self.entry(body["entry"], f"{vwhere}.entry") if "entry" in body else None
            out.append(_Value(self.name(value, vwhere), str(body.get("label", value)), entry,
                              self.flags(body.get("flags", {}), f"{vwhere}.flags")))
        return out

    def product_run(self, axes: list[str], combo: tuple[_Value, ...], entry: str, common: Flags,
                    scale_flags: Flags, test_phase: bool) -> RunSpec:
        flags = {**common, **scale_flags}
        for value in combo:
            flags.update(value.flags)
            entry = value.entry or entry
        return RunSpec("_".join(v.name for v in combo), entry, tuple(render(flags)),
                       {axis: v.name for axis, v in zip(axes, combo)}, test_phase)

    def explicit_runs(self, raw: Any, entry: str, common: Flags, scale_flags: Flags,
                      test_phase: bool) -> list[RunSpec]:
        if not isinstance(raw, dict):
            raise self.fail("runs", "must be an object of run name -> {entry, flags, coords}")
        runs = []
        for name, body in raw.items():
            where = f"runs.{name}"
            if not isinstance(body, dict) or set(body) - {"entry", "flags", "coords"}:
                raise self.fail(where, "must be an object with 'entry', 'flags' and/or 'coords'")
            coords = body.get("coords", {})
            if not isinstance(coords, dict) or not all(isinstance(v, str) for v in coords.values()):
                raise self.fail(f"{where}.coords", "must map axis names to value names (strings)")
            flags = {**common, **scale_flags, **self.flags(body.get("flags", {}), f"{where}.flags")}
            run_entry = self.entry(body["entry"], f"{where}.entry") if "entry" in body else entry
            runs.append(RunSpec(self.name(name, where), run_entry, tuple(render(flags)), dict(coords), test_phase))
        return runs

    def check_argv(self, run: RunSpec, extra_argv: list[str]) -> None:
        from federated.strategies import STRATEGIES

        self._where = f"run {run.name}" + (" (with the extra flags " + " ".join(extra_argv) + ")"
                                            if extra_argv else "")
        opts = self.parser.parse_args(list(run.argv))
        if opts.strategy not in STRATEGIES:
            raise self.fail(self._where, f"--strategy {opts.strategy}: unknown; choose one of {', '.join(STRATEGIES)}")
        for dest in RUNNER_FLAGS:
            if getattr(opts, dest) not in (None, False, "train"):
                raise self.fail(self._where, f"--{dest} is set by the runner for every run; leave it out")

    def table(self, raw: Any, runs: list[RunSpec]) -> dict[str, str | None]:
        if not isinstance(raw, dict) or set(raw) - TABLE_KEYS:
            raise self.fail("table", f"must be an object with {', '.join(sorted(TABLE_KEYS))} (axis names)")
        known = {axis for r in runs for axis in r.coords}
        for key, axis in raw.items():
            if axis not in known and not (key == "columns" and axis == EVERY_SITE):
                raise self.fail(f"table.{key}", f"{axis!r} is not an axis of the runs ({', '.join(sorted(known))})")
        return {key: raw.get(key) for key in sorted(TABLE_KEYS)}


def render(flags: Flags) -> list[str]:
    """Command-line arguments of merged flags."""
    argv: list[str] = []
    for option, value in flags.values():
        if value is None or value is False:
            continue
        if value is True:
            argv.append(option)
            continue
        argv += [option, *(str(v) for v in (value if isinstance(value, list) else [value]))]
    return argv
