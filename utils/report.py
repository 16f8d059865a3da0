"""Plain-text tables for the console."""
from __future__ import annotations

import math


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def final_table(metrics: list[dict], sites: list[str], method: str, baseline: str = "zero_filled") -> str:
    """Per site: the baseline (zero-filled, or synthesis' identity) vs the last evaluation of the
    trained model(s), PSNR (dB) and SSIM.

    Where several personalised models were evaluated on one site, their mean is shown.
    """
    val = [r for r in metrics if r.get("split") == "val" and "psnr" in r]
    trained = [r for r in val if r["model"] != baseline]
    last = max((r["round"] for r in trained), default=None)
    rows = []
    for site in sites:
        zf = [r for r in val if r["model"] == baseline and r["site"] == site]
        md = [r for r in trained if r["round"] == last and r["site"] == site]
        rows.append([site, _mean(zf, "psnr", 2), _mean(zf, "ssim", 4), _mean(md, "psnr", 2), _mean(md, "ssim", 4)])
    title = f"validation, round {last}" if last is not None else "validation"
    return f"{title} (PSNR in dB)\n" + format_table(
        ["site", f"{baseline.replace('_', '-')} PSNR", "SSIM", f"{method} PSNR", "SSIM"], rows)


def _mean(rows: list[dict], key: str, digits: int) -> str:
    vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    if not vals:
        return "-"
    m = sum(vals) / len(vals)
    return "nan" if math.isnan(m) else f"{m:.{digits}f}"
