"""A synthesis task's translation, source contrast -> target contrast, and its written form "T1->T2"
(on the command line and in a sites file's per-site "tasks")."""
from __future__ import annotations

import re
from typing import NamedTuple

from utils.errors import UserError

_TRANSLATION = re.compile(r"\s*([A-Za-z0-9_+-]+?)\s*->\s*([A-Za-z0-9_+-]+)\s*")


class Translation(NamedTuple):
    """A synthesis task: source contrast -> target contrast."""

    source: str
    target: str

    def __str__(self) -> str:
        return f"{self.source}->{self.target}"


def translation(source: str, target: str, where: str) -> Translation:
    """``Translation(source, target)``; ``UserError`` naming ``where`` when the two are the same."""
    if source == target:
        raise UserError(f"{where}: source and target contrast are both {source}; synthesis translates "
                        "one contrast into another: pick two different ones")
    return Translation(source, target)


def parse_translation(text: str, where: str) -> Translation:
    """``"T1->T2"`` -> ``Translation("T1", "T2")``; ``UserError`` naming ``where`` otherwise."""
    match = _TRANSLATION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise UserError(f"{where}: task {text!r} is not of the form SOURCE->TARGET (e.g. \"T1->T2\")")
    return translation(match.group(1), match.group(2), where)
