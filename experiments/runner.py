"""Run a grid: every run as a subprocess of its entry script, one after another or N at a time, each
in its own folder `<out>/<run name>/`.

The runner is resumable. Each run folder holds `run.json` (the run's command and how far it got) and
`log.txt` (everything its subprocesses printed). Starting the runner again skips finished runs,
continues interrupted ones from their checkpoint (`--continues`), and starts the others. A failing
run is reported with the last line of its log and does not stop the rest; the exit code is 1 when
any run failed, 130 when interrupted.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

from tqdm import tqdm

from experiments.grid import REPO_ROOT, Grid, RunSpec
from utils.errors import UserError
from utils.runlog import write_text_atomic

GRID_FILE = "grid.json"  # the expanded grid, beside the run folders; `table` and `figures` read it
RECORD_FILE = "run.json"
LOG_FILE = "log.txt"


@dataclass
class Outcome:
    """What became of one run in this invocation: ran, resumed, skipped, failed or interrupted."""
    name: str
    status: str
    seconds: float = 0.0
    message: str = ""


class Processes:
    """The subprocesses alive now, so that an interrupt reaches every one of them and no new one starts."""

    def __init__(self, env: dict[str, str], trainer: list[str] | None = None):
        """`trainer`: the command prefix that trains a run (this Python, or torchrun with N
        processes); a test phase always runs in one process."""
        self.env = env
        self.trainer = trainer or [sys.executable]
        self.stopping = False
        self._lock = threading.Lock()
        self._alive: set[subprocess.Popen] = set()

    def call(self, argv: list[str], log: IO[str]) -> int | None:
        """Exit code of `argv` run to the end with output into `log`; None when stopping."""
        with self._lock:
            if self.stopping:
                return None
            log.write(f"\n=== {datetime.now().isoformat(timespec='seconds')}  {shlex.join(argv)}\n")
            log.flush()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=self.env)
            self._alive.add(proc)
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._alive.discard(proc)

    def stop(self) -> None:
        """Interrupt every live run (each saves nothing half-made: checkpoints are atomic). SIGTERM,
        which a run treats as Ctrl-C: SIGINT is ignored by runs of a runner started in the background."""
        with self._lock:
            self.stopping = True
            for proc in self._alive:
                proc.send_signal(signal.SIGTERM)


# ---- one run ------------------------------------------------------------------------------------
def identity(run: RunSpec) -> dict:
    """What makes a run folder this run: its entry script and flags."""
    return {"entry": run.entry, "argv": list(run.argv)}


def read_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RECORD_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_record(folder: Path, record: dict) -> None:
    write_text_atomic(folder / RECORD_FILE, json.dumps(record, indent=2) + "\n")


def assess(run: RunSpec, folder: Path) -> str | None:
    """'done', 'todo', or None with a conflict: the folder holds something else than this run."""
    record = read_record(folder)
    if record is None:
        return "todo" if not folder.exists() or not any(folder.iterdir()) else None
    if {k: record.get(k) for k in ("entry", "argv")} != identity(run):
        return None
    return "done" if record.get("trained") and (record.get("tested") or not run.test_phase) else "todo"


def execute(run: RunSpec, folder: Path, procs: Processes) -> Outcome:
    """Train (continuing from last.pt when there is one) and, if asked, test; returns the outcome."""
    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    record = read_record(folder) or {**identity(run), "trained": False, "tested": False}
    write_record(folder, record)
    python, entry = sys.executable, str(REPO_ROOT / run.entry)
    save_dir = ["--save_dir", str(folder)]
    resumed = False
    with open(folder / LOG_FILE, "a") as log:
        if not record["trained"]:
            resumed = (folder / "last.pt").is_file()
            # --overwrite: a run killed before its first round left an options.json of its own.
            again = ["--continues"] if resumed else ["--overwrite"]
            code = procs.call([*procs.trainer, entry, *run.argv, *save_dir, *again], log)
            if code != 0:
                return failure(run, folder, code, procs, start)
            record["trained"] = True
            write_record(folder, record)
        if run.test_phase and not record["tested"]:
            code = procs.call([python, entry, *run.argv, *save_dir, "--phase", "test",
                               "--checkpoint", str(folder / "best.pt"), *run.test_argv], log)
            if code != 0:
                return failure(run, folder, code, procs, start)
            record["tested"] = True
            write_record(folder, record)
    return Outcome(run.name, "resumed" if resumed else "ran", time.perf_counter() - start)


def failure(run: RunSpec, folder: Path, code: int | None, procs: Processes, start: float) -> Outcome:
    seconds = time.perf_counter() - start
    if procs.stopping:
        return Outcome(run.name, "interrupted", seconds)
    return Outcome(run.name, "failed", seconds, f"exit {code}: {last_line(folder / LOG_FILE)} "
                                                f"(log: {folder / LOG_FILE})")


def last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"


# ---- the grid -----------------------------------------------------------------------------------
def child_env(threads: int) -> dict[str, str]:
    """The runs' environment; `threads` > 0 caps the math threads of each run."""
    env = dict(os.environ)
    if threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def trainer_command(nproc: int) -> list[str]:
    """How a run trains: this Python, or torchrun with `nproc` processes (a free port per run, so
    runs side by side do not collide)."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def run_grid(grid: Grid, out: Path, jobs: int = 1, threads: int = 1, quiet: bool = False, nproc: int = 1) -> int:
    """Run every run of `grid` not finished yet under `out`, each trained by `nproc` processes.
    Returns the exit code: 0, 1 (a run failed) or 130 (interrupted)."""
    out = out.absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / GRID_FILE, json.dumps(grid.to_json(), indent=2) + "\n")
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror}); choose another folder") from None
    say = (lambda msg: None) if quiet else (lambda msg: tqdm.write(msg, file=sys.stdout))
    outcomes, todo = triage(grid, out)
    skipped = sum(o.status == "skipped" for o in outcomes)
    blocked = f", {len(outcomes) - skipped} blocked" if len(outcomes) > skipped else ""
    say(f"grid {grid.path}{f' (scale {grid.scale})' if grid.scale else ''}: {len(grid.runs)} runs in {out}; "
        f"{skipped} finished earlier{blocked}, {len(todo)} to run, {jobs} at a time")
    bar = tqdm(total=len(grid.runs), initial=len(outcomes), desc="grid", unit="run",
               disable=True if quiet else None)
    with bar:
        interrupted = run_all(todo, out, jobs, Processes(child_env(threads), trainer_command(nproc)), outcomes,
                              lambda outcome: (report(outcome, say), bar.update()))
    print(summary(grid, outcomes), file=sys.stdout, flush=True)
    if interrupted:
        return 130
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def triage(grid: Grid, out: Path) -> tuple[list[Outcome], list[RunSpec]]:
    """Outcomes already known (finished earlier; blocked by another run's folder) and runs to do."""
    known, todo = [], []
    for run in grid.runs:
        state = assess(run, out / run.name)
        if state == "done":
            known.append(Outcome(run.name, "skipped"))
        elif state == "todo":
            todo.append(run)
        else:
            known.append(Outcome(run.name, "failed", 0.0,
                                 f"{out / run.name} holds another run (its {RECORD_FILE} has other flags, "
                                 "or it was not made by this runner); delete it or choose another --out"))
    return known, todo


def run_all(todo: list[RunSpec], out: Path, jobs: int, procs: Processes, outcomes: list[Outcome],
            on_done) -> bool:
    """Execute `todo`, `jobs` at a time, appending to `outcomes` and calling `on_done` as each ends.
    Ctrl-C or SIGTERM interrupts every live run; returns whether that happened."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    pool = ThreadPoolExecutor(max_workers=jobs)
    futures = {pool.submit(_execute_safely, run, out / run.name, procs): run for run in todo}
    try:
        for future in as_completed(futures):
            outcomes.append(future.result())
            on_done(outcomes[-1])
        return False
    except KeyboardInterrupt:
        procs.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        reported = {o.name for o in outcomes}
        for future, run in futures.items():
            if run.name not in reported:
                finished = future.done() and not future.cancelled()
                outcomes.append(future.result() if finished else Outcome(run.name, "interrupted"))
        return True
    finally:
        pool.shutdown(wait=True)
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def _execute_safely(run: RunSpec, folder: Path, procs: Processes) -> Outcome:
    """`execute`, with a failure of the runner itself (e.g. a full disk) reported for this run only."""
    try:
        return execute(run, folder, procs)
    except Exception as e:  # noqa: BLE001 -- one run's problem must not end the grid
        return Outcome(run.name, "failed", 0.0, f"{type(e).__name__}: {e}")


def report(outcome: Outcome, say) -> None:
    """One line as a run ends; failures always, on stderr."""
    if outcome.status == "failed":
        tqdm.write(f"FAILED  {outcome.name}: {outcome.message}", file=sys.stderr)
    else:
        say(f"{outcome.status:>7}  {outcome.name}  ({outcome.seconds:.0f} s)")


def summary(grid: Grid, outcomes: list[Outcome]) -> str:
    """One line of counts, then one line per run that did not finish."""
    order = ["ran", "resumed", "skipped", "failed", "interrupted"]
    counts = {s: sum(o.status == s for o in outcomes) for s in order}
    words = {"skipped": "skipped (finished earlier)"}
    line = f"summary: {len(grid.runs)} runs: " + ", ".join(f"{n} {words.get(s, s)}" for s, n in counts.items() if n)
    rank = {run.name: i for i, run in enumerate(grid.runs)}
    unfinished = sorted((o for o in outcomes if o.status in ("failed", "interrupted")), key=lambda o: rank[o.name])
    return "\n".join([line] + [f"  {o.status}: {o.name}" + (f": {o.message}" if o.message else "")
                               for o in unfinished])
