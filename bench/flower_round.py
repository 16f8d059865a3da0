"""Round time of a study over Flower (a localhost deployment: SuperLink + one SuperNode per site, TLS
and SuperNode authentication on) against the in-process runner, same data, flags and seed.

Both sides are whole studies of the project's own (`main_fl_mr.py` in this process; `python -m
federated.flower local`), run one after the other (in-process, Flower, in-process, ...) with
`--epochs R --eval_every R`: rounds 1 .. R-1 are train + aggregate + checkpoint only, and a round's
time is the interval between two writes of `last.pt` (watched from a thread). Printed besides:

- per client, the seconds of its local update in process vs the seconds the SuperNode's handler
  took (the reply's `seconds`: rebuilding the site's clients, data index and model, loading and
  saving the client's state, the update itself);
- what a fresh process per message costs, each part timed alone: the import of torch, flwr and the
  ClientApp in a new interpreter, building the site's part of the study, loading and saving a
  client's state;
- what is left of a Flower round: process start, messages, serialisation, polling.

    python -m bench.flower_round                        # demo: chans 16, 128 x 128, BFHI, 3 rounds
    python -m bench.flower_round --scale paper          # chans 32, 256 x 256, 1 volume per client
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if not __package__:  # run as `python bench/<name>.py`: import the repository as `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_parser, load_average, med, setup, spread, synthetic_root

IMPORT = "import torch, flwr.clientapp, flwr.app; import federated.flower.client_app"


def watch_checkpoints(path: Path, stop: threading.Event) -> list[float]:
    """Times at which `path` was (re)written, polled every 20 ms until `stop` is set."""
    times: list[float] = []

    def poll():
        last = None
        while not stop.is_set():
            try:
                m = path.stat().st_mtime_ns
            except FileNotFoundError:
                m = None
            if m is not None and m != last:
                times.append(time.perf_counter())
                last = m
            time.sleep(0.02)
    threading.Thread(target=poll, daemon=True).start()
    return times


def study(kind: str, argv: list[str], save_dir: Path) -> tuple[list[float], dict[str, float]]:
    """Run one study; returns the seconds of rounds 2 .. R-1 measured between checkpoints (round 1
    from the first train message is not observable from outside) and each client's median
    train-row seconds."""
    stop = threading.Event()
    writes = watch_checkpoints(save_dir / "last.pt", stop)
    args = argv + ["--save_dir", str(save_dir)]
    with contextlib.redirect_stdout(io.StringIO()):
        if kind == "flower":
            from federated.flower.local import main
            code = main(args)
        else:
            from federated.cli import main
            code = main(args, "main_fl_mr.py", "fedavg", "")
    time.sleep(0.1)
    stop.set()
    if code != 0:
        raise SystemExit(f"{kind} study failed with exit code {code}")
    rounds = [b - a for a, b in zip(writes, writes[1:])][:-1]  # the last one also evaluates
    with open(save_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    per_client = {c: statistics.median(float(r["seconds"]) for r in rows if r["model"] == c)
                  for c in dict.fromkeys(r["model"] for r in rows)}
    return rounds, per_client


def node_setup_seconds(save_dir: Path, site: str, repeats: int) -> dict[str, float]:
    """What the ClientApp does around each local update, timed here alone (in the study the four
    nodes share the cores, which slows everything they do alike): build the site's part of the
    study (`SiteNode`: data index, clients, strategy, model), load the client's saved state, save it."""
    import json
    import shutil
    from argparse import Namespace
    from federated.flower.site import SiteNode
    opts = Namespace(**json.loads((save_dir / "options.json").read_text()))
    state_dir = save_dir / "nodes" / site
    study_id = next(p.name for p in state_dir.iterdir())
    copy = save_dir / "bench-state" / site
    shutil.copytree(state_dir, copy)
    study = {"options": opts, "study": study_id, "train_sites": list(opts.train_dataset), "test_site": opts.test_dataset}
    config = {"site": site, "data-root": opts.data_root, "state-dir": str(copy)}
    parts: dict[str, list[float]] = {"build": [], "load state": [], "save state": []}
    for i in range(repeats):
        t0 = time.perf_counter()
        node = SiteNode(config, study)
        t1 = time.perf_counter()
        node.restore(node.clients[0], before=10**6)
        t2 = time.perf_counter()
        node.save(node.clients[0], 10**6 + i)
        t3 = time.perf_counter()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
            parts[key].append(value)
    return {k: med(v) for k, v in parts.items()}


def import_seconds(repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", IMPORT], check=True)
        out.append(time.perf_counter() - start)
    return out


def main(argv=None) -> None:
    p = base_parser(__doc__.split("\n")[0], default_repeats=1)
    p.add_argument("--rounds", type=int, default=None, help="rounds per study (default: demo 4, paper 3)")
    args = p.parse_args(argv)
    scale = setup(args)
    resolution = scale.resolutions[0]
    rounds = args.rounds or (4 if scale.name == "demo" else 3)
    sample_rate = 1.0 if scale.name == "demo" else 0.25
    root = synthetic_root(args, resolution)
    flags = ["--data_root", str(root), "--resolution", str(resolution), "--chans", str(scale.chans),
             "--local_bs", str(scale.local_bs), "--local_ep", "2", "--lr", "3e-4", "--epochs", str(rounds),
             "--eval_every", str(rounds), "--sample_rate", str(sample_rate), "--train_dataset", "BFHI",
             "--test_dataset", "H", "--device", "cpu", "--quiet"]
    work = Path(tempfile.mkdtemp(prefix="fedrecon-bench-"))
    print(f"scale {scale.name}: FedAvg, chans {scale.chans}, {resolution}x{resolution}, batch {scale.local_bs}, "
          f"local_ep 2, sites BFHI (--sample_rate {sample_rate}), {rounds} rounds, evaluation in the last only")
    times = {"in-process": [], "flower": []}
    clients = {"in-process": [], "flower": []}
    for i in range(args.repeats):
        for kind in times:
            r, c = study(kind, flags, work / f"{kind}-{i}")
            times[kind] += r
            clients[kind].append(c)
    imports = import_seconds(3)
    setup_parts = node_setup_seconds(work / "flower-0", "F", 3)
    a, b = med(times["in-process"]), med(times["flower"])
    print(f"  in-process round {a:.2f} s ({spread(times['in-process'])}) | Flower round {b:.2f} s "
          f"({spread(times['flower'])}) | Flower / in-process = {b / a:.2f}")
    local = {c: med([run[c] for run in clients["in-process"]]) for c in clients["in-process"][0]}
    node = {c: med([run[c] for run in clients["flower"]]) for c in clients["flower"][0]}
    print("  per client, local update in process -> SuperNode handler: "
          + ", ".join(f"{c} {local[c]:.2f} -> {node[c]:.2f} s" for c in local))
    print(f"  (the {len(node)} nodes train at once on {os.cpu_count()} cores: a handler's update is slowed by "
          "the others; in process the clients train one after another)")
    print("  alone, per message on a node: " + ", ".join(f"{k} {v:.2f} s" for k, v in setup_parts.items())
          + f"; a fresh interpreter importing torch + flwr + the ClientApp {med(imports):.2f} s ({spread(imports)})")
    rest = b - max(node.values())
    print(f"  Flower round minus the slowest handler: {rest:.2f} s (process start and import, messages, "
          f"serialisation, polling); clients train in parallel on {os.cpu_count()} cores")
    print(f"load average at the end {load_average()}")


if __name__ == "__main__":
    main()
