"""Experiment grids end to end: a tiny grid is run as a user would (a subprocess), killed after its
first run, run again to the end; its tables must hold the runs' own metrics.csv values."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.__main__ import main as experiments_main
from tests.conftest import run_cli, wait_until

ROOT = Path(__file__).resolve().parent.parent

# Seed axis first, so that the runs go: a 1-round single-site run, a 3-round FedAvg run (the one the
# kill interrupts), the same two with seed 1, and an explicit run that fails at start-up.
TINY_GRID = {
    "description": "tiny grid for the tests",
    "flags": {"chans": 4, "num_pools": 2, "local_ep": 1, "local_bs": 4, "test_dataset": "H", "quiet": True},
    "axes": {
        "seed": {"flag": "seed", "values": [0, 1]},
        "method": {"values": {
            "only-F": {"label": "Train on F", "flags": {"strategy": "local", "train_dataset": "F", "epochs": 1}},
            "fl-mr": {"label": "FL-MR", "flags": {"epochs": 3}},
        }},
    },
    "runs": {"broken": {"flags": {"num_users": 3, "epochs": 1}, "coords": {"seed": "0", "method": "broken"}}},
    "table": {"rows": "method", "seeds": "seed"},
}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def last_val(run: Path, site: str) -> dict[str, float]:
    """Mean SSIM/PSNR of the last evaluated round's validation rows on `site`, from metrics.csv."""
    rows = [r for r in read_csv(run / "metrics.csv")
            if r["split"] == "val" and r["site"] == site and r["model"] != "zero_filled" and r["psnr"]]
    last = max(int(r["round"]) for r in rows)
    rows = [r for r in rows if int(r["round"]) == last]
    return {m: sum(float(r[m]) for r in rows) / len(rows) for m in ("ssim", "psnr")}


def runner(grid: Path, out: Path, root: Path) -> list[str]:
    return [sys.executable, "-m", "experiments", "run", str(grid), "--out", str(out), "--quiet",
            "--", "--data_root", str(root)]


@pytest.fixture(scope="module")
def finished_grid(tiny_root, tmp_path_factory) -> dict:
    """The tiny grid, killed (with its runs) once its first run has finished and the second has
    saved a checkpoint, then started again and left to finish."""
    tmp = tmp_path_factory.mktemp("grid")
    grid, out = tmp / "tiny.json", tmp / "out"
    grid.write_text(json.dumps(TINY_GRID))
    first, second = out / "0_only-F", out / "0_fl-mr"
    proc = subprocess.Popen(runner(grid, out, tiny_root), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until((second / "last.pt").is_file, f"{second.name} saves its first round", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert json.loads((first / "run.json").read_text())["trained"]
    assert torch.load(second / "last.pt", weights_only=True)["round"] < 3, "the 3-round run had finished before the kill"
    first_checkpoint = (first / "last.pt").stat().st_mtime_ns
    again = subprocess.run(runner(grid, out, tiny_root), cwd=ROOT, capture_output=True, text=True)
    return {"out": out, "again": again, "first_checkpoint": first_checkpoint}


def test_restart_runs_only_what_is_missing(finished_grid):
    out, again = finished_grid["out"], finished_grid["again"]
    summary = next(line for line in again.stdout.splitlines() if line.startswith("summary:"))
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (ran|resumed|skipped|failed)", summary)}
    assert counts == {"ran": 2, "resumed": 1, "skipped": 1, "failed": 1}, summary
    assert again.returncode == 1  # the broken run failed; the others still ran
    # The finished run was not touched; the interrupted one continued from its checkpoint.
    assert (out / "0_only-F" / "last.pt").stat().st_mtime_ns == finished_grid["first_checkpoint"]
    assert (out / "0_only-F" / "log.txt").read_text().count("\n=== ") == 1
    interrupted = (out / "0_fl-mr" / "log.txt").read_text()
    assert interrupted.count("\n=== ") == 2 and "--continues" in interrupted
    rounds = sorted({int(r["round"]) for r in read_csv(out / "0_fl-mr" / "metrics.csv")})
    assert rounds == [0, 1, 2, 3]
    # The failure names the run and keeps its log.
    assert re.search(r"failed: broken: exit 2: .*--num_users 3.*\(log: .*broken/log\.txt\)", again.stdout)
    assert "--num_users 3" in (out / "broken" / "log.txt").read_text()


def test_tables_hold_the_runs_metrics(finished_grid, tmp_path):
    out = finished_grid["out"]
    assert experiments_main(["table", str(out), "--out", str(tmp_path)]) == 0
    rows = {r["row"]: r for r in read_csv(tmp_path / "table.csv")}
    assert list(rows) == ["Zero-filled", "Train on F", "FL-MR"]  # the broken run has no metrics
    for label, method in (("Train on F", "only-F"), ("FL-MR", "fl-mr")):
        per_seed = [last_val(out / f"{seed}_{method}", "H") for seed in (0, 1)]
        for m in ("ssim", "psnr"):
            values = [s[m] for s in per_seed]
            mean = sum(values) / 2
            assert float(rows[label][f"H_{m}"]) == pytest.approx(mean, rel=1e-12)
            assert float(rows[label][f"H_{m}_std"]) == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5, rel=1e-9)
            assert rows[label][f"H_{m}_n"] == "2"
    zero = [r for r in read_csv(out / "0_fl-mr" / "metrics.csv") if r["model"] == "zero_filled" and r["site"] == "H"]
    assert float(rows["Zero-filled"]["H_ssim"]) == float(zero[0]["ssim"])

    md = (tmp_path / "table.md").read_text()
    assert "| Method | H SSIM | H PSNR |" in md
    assert "Train on F†" in md and "client models evaluated on that site" in md
    assert "over 2 seeds" in md and md.count("**") == 4  # one best value per column
    tex = (tmp_path / "table.tex").read_text()
    assert r"\multicolumn{2}{c}{H}" in tex and r"\textbf{" in tex
    # The cross-site check: the single-site model on its own site F and on the target H.
    assert re.search(r"\| F \| H \| [-0-9.]+ \| [-0-9.]+ \|", md)


def test_figures_from_the_runs(finished_grid, tiny_root, tmp_path):
    out = finished_grid["out"]
    for name in ("0_only-F", "0_fl-mr"):
        assert run_cli(["--phase", "test", "--checkpoint", str(out / name / "best.pt"), "--data_root",
                        str(tiny_root), "--save_dir", str(out / name), "--quiet"]) == 0
    assert experiments_main(["figures", str(out), "--out", str(tmp_path)]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"curves_all.png", "curves_all.pdf", "recon_all.png", "recon_all.pdf"} <= names


@pytest.mark.parametrize("text, problem", [
    ('{"axes": {', "not valid JSON (line 1"),
    ('{"flags": {"epoch": 3}, "runs": {"a": {}}}', "flags: unknown flag --epoch"),
    ('{"runs": {"a": {"flags": {"mask_type": "spiral"}}}}', "run a: argument --mask-type"),
    ('{"runs": {"a": {}}, "scales": {"demo": {}}}', "choose one with --scale (demo)"),
    ('{"axes": {"m": {"values": []}}}', "axes.m"),
])
def test_malformed_grid_is_one_line_and_exit_2(tmp_path, capsys, text, problem):
    grid = tmp_path / "bad.json"
    grid.write_text(text)
    assert experiments_main(["run", str(grid), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(grid) in err and problem in err, err
    assert not (tmp_path / "out").exists()


SYNTHESIS_GRID = {
    "description": "tiny synthesis grid for the tests",
    "flags": {"task": "synthesis", "train_dataset": "I,F", "test_dataset": "I", "epochs": 1, "local_ep": 1,
              "local_bs": 2, "ngf": 4, "ndf": 4, "n_blocks": 2, "mapping_layers": 2, "resolution": 32,
              "pflsynth_shared_blocks": 1, "site_tasks": ["I=T1->T2,T2->PD"], "quiet": True},
    "test_phase": True,
    "test_flags": {"test_dataset": "IF"},  # a figure per site: the test phase tests both
    "axes": {"method": {"values": {"pflsynth": {"label": "pFLSynth", "flags": {"strategy": "pflsynth"}},
                                   "fedavg": {"label": "FedAvg", "flags": {"strategy": "fedavg"}}}}},
    "table": {"rows": "method", "columns": "sites"},
}


@pytest.mark.slow  # two training runs and their test phases: about a minute on 2 quiet cores
def test_synthesis_tables_have_a_column_per_site_and_task_and_a_figure_per_site(tiny_root, tmp_path):
    grid, out = tmp_path / "synthesis.json", tmp_path / "out"
    grid.write_text(json.dumps(SYNTHESIS_GRID))
    assert subprocess.run(runner(grid, out, tiny_root), cwd=ROOT, capture_output=True).returncode == 0
    assert experiments_main(["table", str(out), "--out", str(tmp_path / "t")]) == 0
    rows = {r["row"]: r for r in read_csv(tmp_path / "t" / "table.csv")}
    assert list(rows) == ["Identity (source)", "pFLSynth", "FedAvg"]
    metrics = [r for r in read_csv(out / "pflsynth" / "metrics.csv") if r["split"] == "val"]
    for site, task in [("I", "T1->T2"), ("I", "T2->PD"), ("F", "T1->T2")]:
        identity = next(r for r in metrics if (r["model"], r["site"], r["task"]) == ("identity", site, task))
        model = next(r for r in metrics if r["model"] != "identity" and (r["site"], r["task"]) == (site, task))
        assert float(rows["Identity (source)"][f"{site} {task}_psnr"]) == float(identity["psnr"])
        assert float(rows["pFLSynth"][f"{site} {task}_ssim"]) == float(model["ssim"])
    assert experiments_main(["figures", str(out), "--out", str(tmp_path / "f")]) == 0
    assert {p.name for p in (tmp_path / "f").glob("*.png")} == {"curves_all.png", "synthesis_all_I.png",
                                                                "synthesis_all_F.png"}


def test_sigterm_stops_a_runner_started_in_the_background_and_its_runs(tiny_root, tmp_path):
    """A runner started from a shell's background job (SIGINT ignored, inherited by its runs) still
    stops every run on SIGTERM, each keeping its last complete round."""
    grid, out = tmp_path / "long.json", tmp_path / "out"
    grid.write_text(json.dumps({"description": "one long run", "flags": {**TINY_GRID["flags"], "epochs": 100000},
                                "axes": {"seed": {"flag": "seed", "values": [0]}}}))
    proc = subprocess.Popen(runner(grid, out, tiny_root), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    run = out / "0"
    try:
        wait_until((run / "last.pt").is_file, "the run saves its first round", proc)
        # The runs are started from the runner's worker threads: children of any of its tasks.
        children = [c for t in Path(f"/proc/{proc.pid}/task").iterdir() for c in (t / "children").read_text().split()]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert children and all(not Path(f"/proc/{c}").exists() for c in children)
    assert torch.load(run / "last.pt", weights_only=True)["round"] >= 1
    assert "interrupted; the last complete round is saved" in (run / "log.txt").read_text()
