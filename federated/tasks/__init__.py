"""Registry of tasks: what is learned. One line per task; `task_for` picks the run's."""
from __future__ import annotations

import argparse

from federated.tasks.base import Task
from federated.tasks.synthesis import Synthesis
from federated.tasks.unet import UnetReconstruction
from federated.tasks.varnet import VarNetReconstruction

TASKS: dict[str, type[Task]] = {
    "unet": UnetReconstruction,
    "varnet": VarNetReconstruction,
    "synthesis": Synthesis,
}


def task_name(opts: argparse.Namespace) -> str:
    """Reconstruction tasks are named by their model (--model); --task synthesis by itself."""
    return "synthesis" if getattr(opts, "task", "reconstruction") == "synthesis" else opts.model


def task_for(opts: argparse.Namespace) -> Task:
    return TASKS[task_name(opts)](opts)
