"""`python -m experiments`: run a grid of runs, then make its tables and figures.

    python -m experiments run experiments/grids/cvpr_table.json --scale demo --out runs/cvpr_demo
    python -m experiments table runs/cvpr_demo --out docs/cvpr_demo
    python -m experiments figures runs/cvpr_demo --out docs/cvpr_demo/figures

User errors (a malformed grid file, a missing folder) print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

from utils.errors import UserError

PROG = "python -m experiments"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run every unfinished run of a grid file",
                         description="Run a grid: finished runs are skipped, interrupted ones continue from "
                                     "their checkpoint. Flags after `--` are added to every run "
                                     "(e.g. -- --data_root /data/fl_mrcm).",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("grid", type=Path, help="grid file (JSON), e.g. experiments/grids/cvpr_table.json")
    run.add_argument("--scale", default=None, help="one of the grid's scales, e.g. demo or paper")
    run.add_argument("--out", type=Path, default=None,
                     help="folder of the run folders (default: runs/<grid name>-<scale>)")
    run.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    run.add_argument("--threads", type=int, default=1,
                     help="math threads per run (OMP_NUM_THREADS); on a CPU, --threads 1 with --jobs = "
                          "cores is fastest and robust to other load; 0 leaves the default")
    run.add_argument("--nproc_per_node", type=int, default=1,
                     help="train each run data-parallel with torchrun over this many processes (GPUs on CUDA); "
                          "the test phase runs in one")
    run.add_argument("--list", action="store_true", help="print each run's command and exit")
    run.add_argument("--quiet", action="store_true", help="no progress bar; only failures and the summary")

    table = sub.add_parser("table", help="paper tables (Markdown, CSV, LaTeX) from a grid's runs",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    table.add_argument("runs", type=Path, help="the --out folder of `run`")
    table.add_argument("--out", type=Path, default=None, help="folder for table.md, table.csv, table.tex "
                                                              "(default: the runs folder)")

    figures = sub.add_parser("figures", help="PNG and PDF figures from a grid's runs",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    figures.add_argument("runs", type=Path, help="the --out folder of `run`")
    figures.add_argument("--out", type=Path, default=None, help="folder for the figures "
                                                                "(default: <runs>/figures)")
    figures.add_argument("--volume", default=None,
                         help="test volume (file name without suffix) of the reconstruction figure "
                              "(default: the first one)")
    figures.add_argument("--slice", type=int, default=None, dest="slice_index",
                         help="slice index within the volume (default: the middle one)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after `--` goes to every run of `run`, untouched by this parser.
    split = argv.index("--") if "--" in argv else len(argv)
    opts = build_parser().parse_args(argv[:split])
    opts.extra = argv[split + 1:]
    if opts.extra and opts.command != "run":
        print(f"{PROG} {opts.command}: error: flags after `--` only go with `run`", file=sys.stderr)
        return 2
    try:
        return {"run": run, "table": table, "figures": figures}[opts.command](opts, argv)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def run(opts: argparse.Namespace, argv: list[str]) -> int:
    from experiments.grid import REPO_ROOT, load_grid
    from experiments.runner import run_grid, trainer_command

    if opts.jobs < 1:
        raise UserError(f"--jobs {opts.jobs}: must be at least 1")
    if opts.threads < 0:
        raise UserError(f"--threads {opts.threads}: must be 0 or more")
    if opts.nproc_per_node < 1:
        raise UserError(f"--nproc_per_node {opts.nproc_per_node}: must be at least 1")
    grid = load_grid(opts.grid, opts.scale, opts.extra)
    out = opts.out or Path("runs") / (opts.grid.stem + (f"-{opts.scale}" if opts.scale else ""))
    if opts.list:
        for r in grid.runs:
            command = [*trainer_command(opts.nproc_per_node), str(REPO_ROOT / r.entry), *r.argv,
                       "--save_dir", str(out / r.name)]
            print(f"{r.name}: {shlex.join(command)}")
        return 0
    return run_grid(grid, out, opts.jobs, opts.threads, opts.quiet, opts.nproc_per_node)


def _provenance(argv: list[str], results) -> str:
    scale = results.grid.get("scale")
    return (f"Generated by `{PROG} {shlex.join(argv)}` from the runs of {results.grid['grid']}"
            + (f" (scale {scale})" if scale else "") + "; do not edit by hand.")


def table(opts: argparse.Namespace, argv: list[str]) -> int:
    from experiments.render import csv_text, latex, markdown
    from experiments.results import load_results
    from experiments.table import build_tables, cross_site, unfinished
    from utils.runlog import write_text_atomic

    results = load_results(opts.runs)
    left_out = unfinished(results)
    if left_out:
        print(f"warning: left out of the tables (not finished): {', '.join(left_out)}", file=sys.stderr)
    tables = build_tables(results)
    if not tables:
        raise UserError(f"{opts.runs}: no finished runs yet; run the grid first")
    out = opts.out or opts.runs
    header = _provenance(argv, results)
    md = markdown(tables, cross_site(results), header)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "table.md", md)
        write_text_atomic(out / "table.csv", csv_text(tables))
        write_text_atomic(out / "table.tex", latex(tables, header))
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror})") from None
    print(md)
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'table.tex'}")
    return 0


def figures(opts: argparse.Namespace, argv: list[str]) -> int:
    from experiments.figures import make_figures
    from experiments.results import load_results

    results = load_results(opts.runs)
    written = make_figures(results, opts.out or opts.runs / "figures", opts.volume, opts.slice_index)
    if not written:
        raise UserError(f"{opts.runs}: no finished runs to draw yet; run the grid first")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
