"""Registry of tasks: what is learned. One line per task; `task_for` picks the run's."""
from __future__ import annotations

import argparse

from federated.tasks.base import Task
from federated.tasks.unet import UnetReconstruction
from federated.tasks.varnet import VarNetReconstruction

TASKS: dict[str, type[Task]] = {
    "unet": UnetReconstruction,
    "varnet": VarNetReconstruction,
}


def task_name(opts: argparse.Namespace) -> str:
    """Reconstruction tasks are named by their model (--model)."""
    return opts.model


def task_for(opts: argparse.Namespace) -> Task:
    return TASKS[task_name(opts)](opts)
