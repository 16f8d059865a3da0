"""The README's demo: after its 5 rounds FL-MR beats zero-filled by at least 2 dB PSNR on every site."""
from __future__ import annotations

import pytest

from tests.conftest import run_cli
from tests.test_fl_mr import read_metrics


@pytest.mark.slow
def test_demo_beats_zero_filled_by_2db_everywhere(tmp_path):
    assert run_cli(["--demo", "--quiet", "--save_dir", str(tmp_path / "demo")]) == 0
    rows = [r for r in read_metrics(tmp_path / "demo") if r["split"] == "val" and r["psnr"]]
    zero_filled = {r["site"]: float(r["psnr"]) for r in rows if r["model"] == "zero_filled"}
    final = {r["site"]: float(r["psnr"]) for r in rows if r["model"] == "global" and r["round"] == "5"}
    assert set(final) == set(zero_filled) == {"B", "F", "H", "I"}
    for site in final:
        assert final[site] >= zero_filled[site] + 2.0, (site, final[site], zero_filled[site])
