"""The privacy-utility grid: its runs, and the figure of validation SSIM/PSNR against epsilon drawn
from the runs' own metrics.csv privacy rows."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

import experiments.figures as figures
from experiments.grid import REPO_ROOT, load_grid
from experiments.results import load_results
from experiments.runner import GRID_FILE
from options import parse_options

GRID = REPO_ROOT / "experiments" / "grids" / "privacy.json"


def test_grid_has_the_non_private_run_and_both_mechanisms():
    assert [r.name for r in load_grid(GRID, "demo", []).runs] == ["none_0", "dp-0.3_0", "dp-1_0", "dp-3_0",
                                                                "dpsgd-1_0"]
    paper = load_grid(GRID, "paper", [])
    flags = {r.name: " ".join(r.argv) for r in paper.runs}
    assert "--dp_" not in flags["none_0"].replace("--dp_delta", "") and "--dpsgd" not in flags["none_0"]
    assert "--dp_clip 0.05 --dp_noise 1.0" in flags["dp-1_0"]
    assert "--dpsgd_clip 1.0 --dpsgd_noise 1.0" in flags["dpsgd-1_0"]
    assert len(paper.runs) == 15


def fake_runs(tmp_path: Path) -> tuple[Path, dict[str, float]]:
    """The paper grid's seed-0 runs with made-up metrics: more noise, less epsilon, lower SSIM."""
    grid = load_grid(GRID, "paper", [])
    out = tmp_path / "runs"
    out.mkdir()
    (out / GRID_FILE).write_text(json.dumps(grid.to_json()))
    epsilons = {"dp-0.3_0": 400.0, "dp-1_0": 30.0, "dp-3_0": 4.0, "dpsgd-1_0": 12.0}
    for run in (r for r in grid.runs if r.name.endswith("_0")):
        folder = out / run.name
        folder.mkdir()
        opts = parse_options(list(run.argv), "main_fl_mr.py", "fedavg", "")
        (folder / "options.json").write_text(json.dumps(vars(opts)))
        eps = epsilons.get(run.name)
        ssim = 0.8 if eps is None else 0.6 + 0.02 * np.log(eps)
        rows = [{"round": 0, "model": "zero_filled", "site": "H", "split": "val", "psnr": 23.0, "ssim": 0.5}]
        for rnd in range(1, opts.epochs + 1):
            rows.append({"round": rnd, "model": "global", "site": "H", "split": "val", "psnr": 20 + ssim, "ssim": ssim})
            if eps is not None:  # epsilon grows over the rounds: the figure must take the last
                rows.append({"round": rnd, "model": "global", "site": "", "split": "privacy",
                             "epsilon": eps * rnd / opts.epochs})
        with open(folder / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["round", "model", "site", "split", "psnr", "ssim", "epsilon"])
            writer.writeheader()
            writer.writerows(rows)
    return out, epsilons


def test_figure_plots_each_mechanism_against_its_final_epsilon(tmp_path, monkeypatch):
    runs, epsilons = fake_runs(tmp_path)
    drawn = {}
    save = figures._save

    def record(fig, stem):
        drawn[stem.name] = [{line.get_label(): (np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float))
                             for line in ax.get_lines()} for ax in fig.axes]
        return save(fig, stem)

    monkeypatch.setattr(figures, "_save", record)
    written = figures.make_figures(load_results(runs), tmp_path / "f")
    assert {p.name for p in written} >= {"privacy_all.png", "privacy_all.pdf"}
    ssim_panel = drawn["privacy_all"][0]
    x, y = ssim_panel["DP-FedAvg (per client)"]
    assert list(x) == [4.0, 30.0, 400.0]
    assert np.allclose(y, [0.6 + 0.02 * np.log(e) for e in (4.0, 30.0, 400.0)])
    assert list(ssim_panel["DP-SGD (per slice)"][0]) == [12.0]
    assert ssim_panel["non-private"][1][0] == 0.8 and ssim_panel["zero-filled"][1][0] == 0.5
