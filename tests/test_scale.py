"""Which configuration a command runs: the demo stays the demo when a flag that does not set the scale
is added; a scale flag, `--scale paper` or real data gives the paper's defaults; the README's and the
grids' command lines mean what they meant; every training run says what it runs and how long it takes."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from experiments.grid import load_grid
from options import build_parser, parse_options
from tests.conftest import TINY_RUN, run_cli

REPO = Path(__file__).resolve().parents[1]
PAPER = dict(epochs=50, chans=32, local_ep=2, local_bs=16, lr=1e-4)
DEMO = dict(epochs=5, chans=16, local_ep=2, local_bs=4, lr=3e-4)


def parse(argv: list[str]):
    return parse_options(argv, "main_fl_mr.py", "fedavg", "")


def scale_values(opts) -> dict:
    return {k: getattr(opts, k) for k in PAPER}


@pytest.mark.parametrize("argv", [[], ["--save_dir", "mydemo"], ["--seed", "3"], ["--quiet"],
                                  ["--verbose", "--num_workers", "1", "--test_dataset", "F", "--resolution", "64"]])
def test_flags_that_do_not_set_the_scale_keep_the_demo(argv):
    opts = parse(argv)
    assert opts.scale == "demo" and opts.demo
    assert scale_values(opts) == DEMO


def test_more_rounds_of_the_demo_are_still_the_demo():
    assert scale_values(parse(["--epochs", "20"])) == {**DEMO, "epochs": 20}


@pytest.mark.parametrize("argv, given", [
    (["--chans", "8"], {"chans": 8}),
    (["--lr=1e-3"], {"lr": 1e-3}),
    (["--local_b", "8"], {"local_bs": 8}),  # argparse's abbreviations count as the flag
    (["--local_ep", "1", "--epochs", "3"], {"local_ep": 1, "epochs": 3}),
    (["--scale", "paper"], {}),
])
def test_a_scale_flag_on_the_synthetic_sites_gives_the_paper_defaults_for_the_rest(argv, given):
    opts = parse(argv)
    assert opts.scale == "paper" and not opts.demo
    assert scale_values(opts) == {**PAPER, **given}


@pytest.mark.parametrize("data", [["--data_root", "my/sites"], ["--sites", "sites.json"]])
def test_real_data_is_paper_scale_unless_asked(data):
    assert scale_values(parse(data)) == PAPER
    assert scale_values(parse(data + ["--demo"])) == DEMO
    assert scale_values(parse(data + ["--scale", "demo", "--chans", "8"])) == {**DEMO, "chans": 8}


def test_demo_and_scale_paper_together_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--demo", "--scale", "paper"])
    assert e.value.code == 2 and "--demo and --scale paper" in capsys.readouterr().err


def readme_training_commands() -> list[list[str]]:
    """The README's `python main_fl_mr*.py --phase train ...` lines, continuation lines joined."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    lines = re.findall(r"^python (main_fl_mrc?m?\.py --phase train .*)$", text, flags=re.M)
    return [shlex.split(line)[1:] for line in lines]


def test_the_readme_train_commands_run_at_paper_scale():
    commands = readme_training_commands()
    assert len(commands) >= 2  # "Train FL-MR" and "Train FL-MRCM"
    for argv in commands:
        assert scale_values(parse(argv)) == PAPER, argv


@pytest.mark.parametrize("grid", sorted((REPO / "experiments" / "grids").glob("*.json")), ids=lambda p: p.stem)
@pytest.mark.parametrize("scale", ["demo", "paper"])
def test_grid_runs_keep_their_configuration(grid, scale):
    """Every U-Net grid run gets the values its flags and the paper defaults give, as before scales
    existed (other tasks bring their own defaults at each scale: `Task.paper_defaults`)."""
    plain = build_parser("grid", "fedavg", "")
    for run in load_grid(grid, scale, []).runs:
        argv = list(run.argv)
        opts = parse(argv)
        if opts.task != "reconstruction" or opts.model != "unet":
            continue
        assert scale_values(opts) == scale_values(plain.parse_args(argv)), (run.name, argv)


@pytest.mark.parametrize("scale, expected", [
    ("demo", dict(epochs=10, local_ep=1, local_bs=1, ngf=16, niter=5, niter_decay=5, resolution=64)),
    ("paper", dict(epochs=150, local_ep=1, local_bs=1, ngf=64, niter=75, niter_decay=75, lr=2e-4)),
])
def test_synthesis_runs_get_pflsynths_loop_unless_the_command_says_otherwise(scale, expected):
    for run in load_grid(REPO / "experiments" / "grids" / "synthesis.json", scale, []).runs:
        opts = parse(list(run.argv))
        assert {k: getattr(opts, k) for k in expected} == expected, run.name
    given = parse(["--task", "synthesis", "--scale", scale, "--local_bs", "4", "--epochs", "3"])
    assert (given.local_bs, given.epochs, given.local_ep) == (4, 3, 1)


def test_a_run_says_what_it_runs_and_projects_its_time(tiny_root, tmp_path, capsys):
    argv = [a for a in TINY_RUN if a != "--quiet"] + ["--data_root", str(tiny_root), "--epochs", "3",
                                                      "--save_dir", str(tmp_path / "run")]
    assert run_cli(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^paper scale: 3 rounds x 1 local epochs, 4 clients, unet --chans 4 \([\d,]+ parameters\)",
                     out, flags=re.M), out
    # The unit follows the time (a loaded machine turns seconds into minutes).
    duration = r"[\d.]+ (s|min|h)"
    assert re.search(rf"^round 1 took {duration}; the 2 rounds left: about {duration}$", out, flags=re.M), out
