"""The knee-to-brain transfer study: its grid expands to the runs the paper and the demo need, its
figure draws a panel per training fraction from a runs folder, its table has the spread over seeds,
`--val_dataset` evaluates unseen sites every round, and an augmented run resumed after an
interruption ends with the weights of an uninterrupted one."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import experiments.figures as figures
from experiments.grid import REPO_ROOT, load_grid
from experiments.results import load_results
from experiments.runner import GRID_FILE
from experiments.table import build_tables
from options import parse_options
from tests.conftest import TINY_RUN, run_cli

GRID = REPO_ROOT / "experiments" / "grids" / "transfer.json"
ROUNDS = 3


def flag(argv: tuple[str, ...], name: str) -> list[str] | None:
    """The values after `name` in `argv` (an empty list for a bare flag), or None when absent."""
    if name not in argv:
        return None
    i = argv.index(name) + 1
    values = []
    while i < len(argv) and not argv[i].startswith("--"):
        values.append(argv[i])
        i += 1
    return values


@pytest.mark.parametrize("scale, fractions, seeds", [("demo", ["25", "100"], ["0", "1"]),
                                                     ("paper", ["1", "10", "33", "100"], ["0", "1", "2"])])
def test_grid_expands_to_every_setting_fraction_augmentation_and_seed(scale, fractions, seeds):
    grid = load_grid(GRID, scale, [])
    expected = {f"{s}_{f}_{a}_{seed}" for s in ("knee", "fl") for f in fractions
                for a in ("none", "mraugment") for seed in seeds}
    assert {r.name for r in grid.runs} == expected
    rates = {"1": "0.01", "10": "0.1", "25": "0.25", "33": "0.33", "100": "1.0"}
    for run in grid.runs:
        argv = run.argv
        assert flag(argv, "--model") == ["varnet"] and flag(argv, "--challenge") == ["multicoil"]
        assert flag(argv, "--test_dataset") == ["H"] and flag(argv, "--sequence") == ["T1"]
        assert flag(argv, "--local_bs") == ["1"]  # an odd rot90 makes non-square slices unbatchable
        assert flag(argv, "--sample_rate") == [rates[run.coords["fraction"]]]
        assert flag(argv, "--seed") == [run.coords["seed"]]
        assert (flag(argv, "--aug_on") is not None) == (run.coords["augment"] == "mraugment")
        if run.coords["setting"] == "knee":  # knee alone; both brain sites unseen and validated
            assert flag(argv, "--strategy") == ["central"] and flag(argv, "--train_dataset") == ["K"]
            assert flag(argv, "--val_dataset") == ["F"]
        else:  # FL-MR: a knee client and a brain client
            assert flag(argv, "--strategy") == ["fedavg"] and flag(argv, "--train_dataset") == ["KF"]
            assert flag(argv, "--val_dataset") is None
        opts = parse_options(list(argv), "main_fl_mr.py", "fedavg", "")
        assert opts.demo == (scale == "demo")
    if scale == "paper":  # MRAugment's epochs per fraction: 1000/500/300/50 over 50 rounds, 8x
        epochs = {r.coords["fraction"]: int(flag(r.argv, "--epochs")[0]) * int(flag(r.argv, "--local_ep")[0])
                  for r in grid.runs}
        assert epochs == {"1": 1000, "10": 500, "33": 300, "100": 50}
        assert all(flag(r.argv, "--accelerations") == ["8"] for r in grid.runs)
    assert grid.table == {"rows": "augment", "columns": "fraction", "seeds": "seed"}


def fake_score(run_coords: dict[str, str], rnd: int) -> tuple[float, float]:
    """(PSNR, SSIM) of a fake run on H at round `rnd`: augmentation +0.5 dB, seed 1 +0.2 dB."""
    psnr = 24.0 + 0.1 * rnd + (0.5 if run_coords["augment"] == "mraugment" else 0.0) \
        + 0.2 * int(run_coords["seed"]) + (0.3 if run_coords["fraction"] == "100" else 0.0)
    return psnr, psnr / 40.0


@pytest.fixture
def fake_runs(tmp_path) -> Path:
    """A runs folder of the demo grid whose runs hold options and made-up metrics (no training)."""
    grid = load_grid(GRID, "demo", [])
    out = tmp_path / "runs"
    out.mkdir()
    (out / GRID_FILE).write_text(json.dumps(grid.to_json()))
    for run in grid.runs:
        folder = out / run.name
        folder.mkdir()
        opts = parse_options(list(run.argv), "main_fl_mr.py", "fedavg", "")
        (folder / "options.json").write_text(json.dumps(vars(opts)))
        rows = [{"round": 0, "model": "zero_filled", "site": "H", "split": "val", "psnr": 23.0, "ssim": 0.6}]
        for rnd in range(1, ROUNDS + 1):
            psnr, ssim = fake_score(run.coords, rnd)
            rows += [{"round": rnd, "model": "K", "site": "K", "split": "train", "loss": 0.5 / rnd},
                     {"round": rnd, "model": "global", "site": "H", "split": "val", "psnr": psnr, "ssim": ssim}]
        with open(folder / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["round", "model", "site", "split", "psnr", "ssim", "loss"])
            writer.writeheader()
            writer.writerows(rows)
    return out


def test_figure_has_a_panel_per_fraction_with_both_arms_and_the_seed_mean(fake_runs, tmp_path, monkeypatch):
    drawn = {}
    save = figures._save

    def record(fig, stem):
        drawn[stem.name] = [(ax.get_title(), ax.get_ylabel(),
                             {line.get_label(): np.asarray(line.get_ydata(), float) for line in ax.get_lines()})
                            for ax in fig.axes]
        return save(fig, stem)

    monkeypatch.setattr(figures, "_save", record)
    written = figures.make_figures(load_results(fake_runs), tmp_path)
    assert {p.name for p in written} >= {"val_knee.png", "val_knee.pdf", "val_fl.png", "val_fl.pdf"}
    panels = drawn["val_knee"]
    assert len(panels) == 4  # SSIM and PSNR rows x the two fractions
    assert [t for t, _, _ in panels] == ["25% of the volumes", "100% of the volumes", "", ""]
    assert panels[0][1] == "val SSIM on H" and panels[2][1] == "val PSNR (dB) on H"
    for (_, _, lines), metric, fraction in zip(panels, ("ssim", "ssim", "psnr", "psnr"), ("25", "100") * 2):
        assert set(lines) == {"no augmentation (2 seeds)", "MRAugment (2 seeds)", "zero-filled"}
        for label, augment in (("no augmentation (2 seeds)", "none"), ("MRAugment (2 seeds)", "mraugment")):
            per_seed = [[fake_score({"augment": augment, "seed": s, "fraction": fraction}, k)
                         for k in range(1, ROUNDS + 1)] for s in ("0", "1")]
            mean = np.mean([[p if metric == "psnr" else q for p, q in seed] for seed in per_seed], axis=0)
            np.testing.assert_allclose(lines[label], mean, rtol=1e-12)


def test_table_gives_the_last_round_with_the_spread_over_seeds(fake_runs):
    tables = {t.title: t for t in build_tables(load_results(fake_runs))}
    assert set(tables) == {"setting knee only (K)", "setting FL-MR (K + brain F)"}
    table = tables["setting knee only (K)"]
    assert table.columns == ["25% of the volumes", "100% of the volumes"]
    assert [r.label for r in table.rows] == ["Zero-filled", "no augmentation", "MRAugment"]
    cell = table.rows[2].cells[("25% of the volumes", "psnr")]
    seeds = [fake_score({"augment": "mraugment", "seed": s, "fraction": "25"}, ROUNDS)[0] for s in ("0", "1")]
    assert (cell.n, cell.mean) == (2, pytest.approx(np.mean(seeds), rel=1e-12))
    assert cell.std == pytest.approx(np.std(seeds, ddof=1), rel=1e-9)
    assert "over 2 seeds" in " ".join(table.notes)


def val_sites(save_dir: Path) -> list[tuple[str, str]]:
    """(model, site) of the last round's validation rows."""
    with open(save_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val" and r["psnr"]]
    last = max(int(r["round"]) for r in rows)
    return [(r["model"], r["site"]) for r in rows if int(r["round"]) == last]


def test_val_dataset_evaluates_unseen_sites_every_round(tiny_root, tmp_path, capsys):
    args = TINY_RUN + ["--data_root", str(tiny_root), "--train_dataset", "F", "--test_dataset", "H"]
    assert run_cli(args + ["--val_dataset", "IB", "--save_dir", str(tmp_path / "global")]) == 0
    assert val_sites(tmp_path / "global") == [("global", "H"), ("global", "I"), ("global", "B"), ("global", "F")]
    # A personalised model is evaluated on the unseen sites as on the target.
    assert run_cli(args + ["--strategy", "local", "--val_dataset", "I", "--save_dir", str(tmp_path / "local")]) == 0
    assert sorted(val_sites(tmp_path / "local")) == [("F", "F"), ("F", "H"), ("F", "I")]
    capsys.readouterr()
    assert run_cli(args + ["--val_dataset", "Q", "--save_dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--val_dataset Q: unknown site 'Q'" in err and "\n" not in err


def test_augmented_run_resumed_after_round_1_ends_with_the_same_weights(tiny_root, tmp_path):
    # Constant schedule: every round is augmented (exp gives p = 0 in round 1), and its p(t) does not
    # depend on the planned total, so a 1-round run continued to 2 rounds is the 2-round run. (A run
    # killed mid-round resuming bit for bit is tests/test_recovery.py's; no race with a clock here.)
    args = TINY_RUN + ["--data_root", str(tiny_root), "--train_dataset", "F", "--epochs", "2",
                       "--aug_on", "--aug_schedule", "constant", "--aug_strength", "1.0"]
    assert run_cli(args + ["--save_dir", str(tmp_path / "straight")]) == 0
    run = tmp_path / "interrupted"
    assert run_cli(args + ["--epochs", "1", "--save_dir", str(run)]) == 0
    assert torch.load(run / "last.pt", weights_only=True)["round"] == 1
    assert run_cli(["--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(run / "last.pt", weights_only=True)
    assert resumed["round"] == 2
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    # The augmentation was on: without it the same run ends elsewhere.
    assert run_cli([a for a in args if a != "--aug_on"] + ["--save_dir", str(tmp_path / "plain")]) == 0
    plain = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)["model"]
    assert not all(torch.equal(plain[k], straight["model"][k]) for k in plain)
