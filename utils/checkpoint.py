"""Atomic checkpoint files, loaded with weights-only unpickling."""
from __future__ import annotations

import contextlib
import os
import pickle
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from utils.errors import CheckpointError

FORMAT = "fedrecon-checkpoint"


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: a crash never leaves half a file.
    Ctrl-C or SIGTERM arriving meanwhile takes effect once the file is in place (torch.save cut short
    by an interrupt ends in its own RuntimeError instead of a clean stop)."""
    path = Path(path)
    with interrupts_deferred():
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def interrupts_deferred():
    """SIGINT and SIGTERM (where they are handled, in the main thread) are held until the block ends,
    then raise KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler not in (signal.SIG_IGN, signal.SIG_DFL, None):
            previous[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a run checkpoint written by this project; CheckpointError names the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; pass a last.pt or best.pt from a run folder")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused by weights-only loading, it holds more than tensors "
                              f"({first[:200]}); only load checkpoints written by fedrecon") from None
    except Exception as e:  # torch raises many kinds of errors on files that are not checkpoints
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}); "
                              "pass a last.pt or best.pt from a run folder") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fedrecon run checkpoint (for plain U-Net weights use "
                              "--pretrained); pass a last.pt or best.pt from a run folder")
    return obj
