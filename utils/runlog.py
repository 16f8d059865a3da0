"""A run's folder: its resolved options (options.json), its metrics (metrics.csv) and checkpoints.

Nothing is written until `create()`: every check on the user's input happens before that.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

from utils.errors import UserError

# Columns every metrics.csv starts with; a method's own values (e.g. disc_loss) follow.
BASE_COLUMNS = ["round", "model", "site", "split", "nmse", "psnr", "ssim",
                "nmse_std", "psnr_std", "ssim_std", "volumes", "loss", "seconds"]

# Options that may change when a run is continued, without making it a different run.
RESUMABLE_CHANGES = {"epochs", "continues", "resume", "overwrite", "quiet", "verbose", "num_workers",
                     "device", "amp", "eval_every", "save_dir", "checkpoint", "phase", "demo", "scale",
                     "pretrained"}


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    def __init__(self, path: Path, options: dict, resume: bool, overwrite: bool, writer: bool = True):
        """`writer` False (a torchrun rank other than 0): the same checks, and nothing is written."""
        self.path = Path(path)
        self.writer = writer
        self.options = options
        self.resume = resume
        self.options_file = self.path / "options.json"
        self.metrics_file = self.path / "metrics.csv"
        self.last = self.path / "last.pt"
        self.best = self.path / "best.pt"
        self._check(overwrite)

    def _check(self, overwrite: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--save_dir {self.path}: is a file, not a folder; choose another --save_dir")
        if self.resume:
            if not self.last.is_file():
                raise UserError(f"--save_dir {self.path}: nothing to continue (no last.pt); "
                                "start the run without --continues/--resume")
            old = self.saved_options()
            changed = sorted(k for k in set(old) | set(self.options)
                             if k not in RESUMABLE_CHANGES and old.get(k) != self.options.get(k))
            if changed:
                flags = ", ".join(f"--{k} ({old.get(k)!r} -> {self.options.get(k)!r})" for k in changed)
                raise UserError(f"--save_dir {self.path}: the saved run was started with other options: {flags}; "
                                "continue it with its own options or choose another --save_dir")
        elif self.options_file.exists() and not overwrite:
            raise UserError(f"--save_dir {self.path}: already holds a run (options.json); pass --continues to "
                            "continue it, --overwrite to replace it, or choose another --save_dir")

    def saved_options(self) -> dict:
        try:
            return json.loads(self.options_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{self.options_file}: unreadable ({e}); cannot continue this run") from None

    def create(self) -> None:
        """Make the folder and write options.json (not when resuming: the run keeps its own)."""
        if not self.writer:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not self.resume:
                for stale in (self.metrics_file, self.last, self.best):
                    stale.unlink(missing_ok=True)
                write_text_atomic(self.options_file, json.dumps(self.options, indent=2, sort_keys=True) + "\n")
        except OSError as e:
            raise UserError(f"--save_dir {self.path}: cannot write there ({e.strerror}); "
                            "choose a folder you can write to") from None

    def write_metrics(self, rows: list[dict]) -> None:
        if self.writer:
            write_metrics_csv(self.metrics_file, rows)


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    """All rows, BASE_COLUMNS first, then every other key in order of first appearance."""
    columns = list(BASE_COLUMNS)
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(v) for k, v in row.items()})
    write_text_atomic(path, buf.getvalue())


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v
