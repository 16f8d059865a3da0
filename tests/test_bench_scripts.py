"""Every benchmark runs as bench/README.md says: `python bench/<name>.py` from any folder, and
`python -m bench.<name>` from the repository root (here: its --help, which imports everything)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (REPO / "bench").glob("*.py") if p.stem not in ("__init__", "common"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_runs_as_a_file_from_another_folder(script, tmp_path):
    done = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
