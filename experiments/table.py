"""Paper tables from a grid's runs: rows are scenarios or methods, columns are sites (or another
axis) x SSIM/PSNR, one table per value of the remaining axes (e.g. per sequence).

A cell is the run's last evaluated round on the run's target site (`--test_dataset`), read from its
metrics.csv; for a personalised method, the mean over the client models evaluated on that site.
With `"columns": "sites"` a run fills a column per site it evaluates, and per task where a site is
scored per task (pFLSynth's tables: site x translation). Runs that differ only in the grid's seed
axis are averaged (mean +- sample std). The first row is the task's baseline (the zero-filled input;
synthesis: the identity, the source image intensity-matched); the best value of each column is marked.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from experiments.grid import EVERY_SITE
from experiments.results import METRICS, GridResults, RunResult, mean_std

DIGITS = {"ssim": 4, "psnr": 2}
HEADERS = {"ssim": "SSIM", "psnr": "PSNR"}
BASELINE_LABELS = {"zero_filled": "Zero-filled", "identity": "Identity (source)"}
PERSONALISED_MARK = "†"
PERSONALISED_NOTE = (f"{PERSONALISED_MARK} Personalised method (each client keeps its own model): "
                     "the mean over the client models evaluated on that site.")


@dataclass
class Cell:
    """One value of a table: mean over seeds, sample std (None for one seed), number of seeds."""
    mean: float
    std: float | None
    n: int
    best: bool = False

    def text(self, metric: str) -> str:
        d = DIGITS[metric]
        return f"{self.mean:.{d}f}" + (f" ± {self.std:.{d}f}" if self.std is not None else "")


@dataclass
class Row:
    label: str
    cells: dict[tuple[str, str], Cell]  # (column, metric) -> cell
    personalized: bool = False


@dataclass
class Table:
    """One paper table. `group` holds the values (labels) of the axes it is one table of."""
    group: dict[str, str]
    row_header: str
    columns: list[str]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return title(self.group)


def title(group: dict[str, str]) -> str:
    return ", ".join(f"{axis} {value}" for axis, value in group.items()) or "all runs"


@dataclass
class Layout:
    """Where a run goes: which table (its values on the other axes), which row, which column.
    Without a `rows` axis each run is a row; without a `columns` axis the column is its target site."""
    results: GridResults
    rows: str | None
    columns: str | None
    seeds: str | None
    group_axes: list[str]

    @classmethod
    def of(cls, results: GridResults) -> Layout:
        spec = results.grid["table"]
        rows, columns, seeds = spec.get("rows"), spec.get("columns"), spec.get("seeds")
        names = list(results.grid["axes"])
        for run in results.runs:  # coordinates that only explicit runs have come last
            names += [a for a in run.coords if a not in names]
        return cls(results, rows, columns, seeds, [a for a in names if a not in (rows, columns, seeds)])

    def cells_of(self, run: RunResult) -> list[tuple[str, str, str | None]]:
        """(column key, site, task or None) of every cell the run fills in its row."""
        if self.columns == EVERY_SITE:
            return [(f"{site} {task}".strip(), site, task) for site, task in run.evaluated()]
        return [(self.column(run), run.target, None)]

    def row(self, run: RunResult) -> str:
        return run.coords.get(self.rows, run.name) if self.rows else run.name

    def column(self, run: RunResult) -> str:
        return run.coords.get(self.columns, run.target) if self.columns else run.target

    def group(self, run: RunResult) -> tuple[str, ...]:
        return tuple(run.coords.get(a, "") for a in self.group_axes)

    def group_labels(self, key: tuple[str, ...]) -> dict[str, str]:
        return {a: self.results.label(a, v) for a, v in zip(self.group_axes, key) if v}

    def ordered(self, axis: str | None, keys: list[str]) -> list[str]:
        if axis == EVERY_SITE:
            return list(dict.fromkeys(keys))
        """Distinct `keys` in the axis' value order, then any others in order of appearance."""
        seen = list(dict.fromkeys(keys))
        values = self.results.grid["axes"].get(axis, {})
        return [k for k in values if k in seen] + [k for k in seen if k not in values]

    def label(self, axis: str | None, key: str) -> str:
        return self.results.label(axis, key) if axis and axis != EVERY_SITE else key


def build_tables(results: GridResults) -> list[Table]:
    """The grid's tables, from its finished runs (unfinished ones are left out; see `unfinished`)."""
    layout = Layout.of(results)
    groups: dict[tuple, list[RunResult]] = {}
    for run in results.runs:
        if run.finished:
            groups.setdefault(layout.group(run), []).append(run)
    tables = []
    for key, members in groups.items():
        col_keys = layout.ordered(layout.columns, [ck for r in members for ck, _, _ in layout.cells_of(r)])
        columns = [(ck, layout.label(layout.columns, ck)) for ck in col_keys]
        table_rows = [zero_filled_row(members, columns, layout.cells_of)]
        for rk in layout.ordered(layout.rows, [layout.row(r) for r in members]):
            in_row = [r for r in members if layout.row(r) == rk]
            cells = {}
            for ck, column in columns:
                scores = [r.final_scores(site, task) for r in in_row for key, site, task in layout.cells_of(r)
                          if key == ck]
                for m in METRICS:
                    vals = [s[m] for s in scores if s is not None]
                    if vals:
                        cells[(column, m)] = Cell(*mean_std(vals), len(vals))
            table_rows.append(Row(layout.label(layout.rows, rk), cells, any(r.personalized for r in in_row)))
        labels = [c for _, c in columns]
        mark_best(table_rows, labels)
        tables.append(Table(layout.group_labels(key), (layout.rows or "run").capitalize(), labels,
                            table_rows, notes(table_rows)))
    return tables


def zero_filled_row(runs: list[RunResult], columns: list[tuple[str, str]], cells_of) -> Row:
    """The baseline (zero-filled input; synthesis: identity) in each column. `columns` holds (column
    key, column label); the runs of one seed share the baseline's values, so there is one value per seed."""
    cells = {}
    for ck, column in columns:
        for m in METRICS:
            per_seed: dict[int, float] = {}
            for r in runs:
                for key, site, task in cells_of(r):
                    zf = r.zero_filled(site, task) if key == ck else None
                    if zf is not None:
                        per_seed.setdefault(int(r.options["seed"]), zf[m])
            if per_seed:
                cells[(column, m)] = Cell(*mean_std(list(per_seed.values())), len(per_seed))
    return Row(BASELINE_LABELS.get(runs[0].baseline, runs[0].baseline), cells)


def mark_best(rows: list[Row], columns: list[str]) -> None:
    """Mark the highest mean of every (column, metric), ties included."""
    for column in columns:
        for m in METRICS:
            cells = [row.cells[(column, m)] for row in rows if (column, m) in row.cells]
            top = max((c.mean for c in cells), default=None)
            for c in cells:
                c.best = c.mean == top


def notes(rows: list[Row]) -> list[str]:
    out = []
    seeds = max((c.n for row in rows for c in row.cells.values()), default=1)
    if seeds > 1:
        out.append(f"Mean ± sample standard deviation over {seeds} seeds.")
    if any(row.personalized for row in rows):
        out.append(PERSONALISED_NOTE)
    return out


def cross_site(results: GridResults) -> list[dict]:
    """Single-site (`--strategy local`) runs whose target is another site: SSIM/PSNR of the model on
    its own site and on the target, and of the zero-filled input on each (mean over seeds) -- the
    cross-site drop the paper's single-site rows show. Keys: own_ssim, target_ssim, zf_own_ssim, ..."""
    layout = Layout.of(results)
    found: dict[tuple, list[dict]] = {}
    for run in results.runs:
        own = {r["site"] for r in run.rows if r["split"] == "train"}
        if not run.finished or run.strategy != "local" or len(own) != 1 or run.target in own:
            continue
        (site,) = own
        scores = {"own": run.final_scores(site), "target": run.final_scores(run.target),
                  "zf_own": run.zero_filled(site), "zf_target": run.zero_filled(run.target)}
        if all(v is not None for v in scores.values()):
            found.setdefault((layout.group(run), site, run.target), []).append(
                {f"{k}_{m}": v[m] for k, v in scores.items() for m in METRICS})
    return [{"table": title(layout.group_labels(key)), "trained_on": site, "target": target,
             **{k: sum(v[k] for v in values) / len(values) for k in values[0]}, "seeds": len(values)}
            for (key, site, target), values in found.items()]


def unfinished(results: GridResults) -> list[str]:
    """Runs left out of the tables: no metrics yet, or fewer rounds than asked for."""
    return results.missing + [f"{r.name} (round {r.last_round} of {r.options['epochs']})"
                              for r in results.runs if not r.finished]
