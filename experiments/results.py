"""Read a grid's output folder: the expanded grid (`grid.json`) and each run's options and metrics.

Every number in a table or figure comes from one function here, reading a run's `metrics.csv`.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from experiments.runner import GRID_FILE
from utils.errors import UserError

METRICS = ("ssim", "psnr")


@dataclass
class RunResult:
    """One run folder: where the grid put it (`coords`), its resolved options and its metric rows."""
    name: str
    path: Path
    coords: dict[str, str]
    options: dict
    rows: list[dict[str, str]]

    @property
    def target(self) -> str:
        """The site the run was evaluated on every round (`--test_dataset`)."""
        return self.options["test_dataset"]

    @property
    def strategy(self) -> str:
        return self.options["strategy"]

    @property
    def personalized(self) -> bool:
        from federated.strategies import STRATEGIES
        return STRATEGIES[self.strategy].personalized

    @property
    def baseline(self) -> str:
        """The model name of the task's baseline rows: zero_filled (reconstruction), identity (synthesis)."""
        import argparse
        from federated.tasks import TASKS, task_name
        return TASKS[task_name(argparse.Namespace(**self.options))].baseline_name

    def evaluated(self) -> list[tuple[str, str]]:
        """(site, task) of every validation score the run has, in order of first appearance; task is
        "" where a site is scored as one (reconstruction)."""
        return list(dict.fromkeys((r["site"], r.get("task") or "") for r in self.rows
                                  if r["split"] == "val" and r.get("psnr")))

    @property
    def last_round(self) -> int:
        return max((int(r["round"]) for r in self.rows), default=0)

    @property
    def finished(self) -> bool:
        return self.last_round >= int(self.options["epochs"])

    def val_rows(self, site: str, task: str | None = None) -> list[dict[str, str]]:
        """Validation rows of trained models on `site` (not the baseline, not the domain-gap row);
        of one `task` (a synthesis translation) when given."""
        return [r for r in self.rows if r["split"] == "val" and r["site"] == site
                and r["model"] != self.baseline and r.get("psnr")
                and (task is None or (r.get("task") or "") == task)]

    def final_scores(self, site: str, task: str | None = None) -> dict[str, float] | None:
        """SSIM and PSNR on `site` (for one `task` when given) at the last evaluated round.
        Personalised methods evaluate one model per client there; their mean is returned (`models`
        says how many)."""
        rows = self.val_rows(site, task)
        if not rows:
            return None
        last = max(int(r["round"]) for r in rows)
        rows = [r for r in rows if int(r["round"]) == last]
        return {**{m: _mean([float(r[m]) for r in rows]) for m in METRICS}, "models": len(rows), "round": last}

    def zero_filled(self, site: str, task: str | None = None) -> dict[str, float] | None:
        """SSIM and PSNR of the task's baseline (zero-filled input; synthesis: identity) on `site`,
        for one `task` when given (round 0)."""
        rows = [r for r in self.rows if r["model"] == self.baseline and r["site"] == site and r["split"] == "val"
                and (task is None or (r.get("task") or "") == task)]
        return {m: float(rows[0][m]) for m in METRICS} if rows else None

    def val_curve(self, site: str, task: str | None = None) -> list[tuple[int, float, float]]:
        """(round, PSNR, SSIM) on `site` (one `task` when given) for every evaluated round (mean over
        personalised models)."""
        rounds: dict[int, list[dict]] = {}
        for r in self.val_rows(site, task):
            rounds.setdefault(int(r["round"]), []).append(r)
        return [(k, _mean([float(r["psnr"]) for r in v]), _mean([float(r["ssim"]) for r in v]))
                for k, v in sorted(rounds.items())]

    def epsilon(self) -> float | None:
        """The privacy spent by the end of the run: the largest epsilon of its `privacy` rows (the
        client-level guarantee, or the worst client's under DP-SGD); None for a non-private run."""
        values = [float(r["epsilon"]) for r in self.rows if r["split"] == "privacy" and r.get("epsilon")]
        return max(values) if values else None

    def train_loss(self) -> list[tuple[int, float]]:
        """(round, mean over the clients that trained in it of their reconstruction loss): a method's
        `recon_loss` where it logs one (FL-MRCM's `loss` adds the adversarial term), else `loss`."""
        rounds: dict[int, list[float]] = {}
        for r in self.rows:
            value = r.get("recon_loss") or r.get("loss")
            if r["split"] == "train" and value:
                rounds.setdefault(int(r["round"]), []).append(float(value))
        return [(k, _mean(v)) for k, v in sorted(rounds.items())]


@dataclass
class GridResults:
    """The runs of one grid output folder; `missing` names runs without metrics yet."""
    path: Path
    grid: dict
    runs: list[RunResult]
    missing: list[str]

    def label(self, axis: str, value: str) -> str:
        return self.grid["axes"].get(axis, {}).get(value, value)


def load_results(folder: Path) -> GridResults:
    """Every run of the grid in `folder` that has options.json and metrics.csv."""
    folder = Path(folder)
    try:
        grid = json.loads((folder / GRID_FILE).read_text())
    except FileNotFoundError:
        raise UserError(f"{folder}: no {GRID_FILE}; pass the --out folder of `python -m experiments run`") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{folder / GRID_FILE}: unreadable ({e})") from None
    runs, missing = [], []
    for spec in grid["runs"]:
        path = folder / spec["name"]
        try:
            options = json.loads((path / "options.json").read_text())
            with open(path / "metrics.csv", newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, json.JSONDecodeError):
            missing.append(spec["name"])
            continue
        runs.append(RunResult(spec["name"], path, spec["coords"], options, rows))
    return GridResults(folder, grid, runs, missing)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    m = _mean(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
