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
    trained model(s), PSNR (dB), SSIM and, where the metrics have it, SSIM inside the head.

    Where several personalised models were evaluated on one site, their mean is shown.
    """
    val = [r for r in metrics if r.get("split") == "val" and "psnr" in r]
    trained = [r for r in val if r["model"] != baseline]
    last = max((r["round"] for r in trained), default=None)
    columns = [("psnr", 2, "PSNR"), ("ssim", 4, "SSIM")]
    if any("ssim_head" in r for r in val):
        columns.append(("ssim_head", 4, "head SSIM"))
    rows = []
    for site in sites:
        # A site scored in parts (synthesis' translations, the `task` column) has a line per part.
        for part in dict.fromkeys(r.get("task", "") for r in val if r["site"] == site) or [""]:
            here = [r for r in val if r["site"] == site and r.get("task", "") == part]
            zf = [r for r in here if r["model"] == baseline]
            md = [r for r in here if r["model"] != baseline and r["round"] == last]
            rows.append([f"{site} {part}".strip(), *(_mean(zf, key, digits) for key, digits, _ in columns),
                         *(_mean(md, key, digits) for key, digits, _ in columns)])
    title = f"validation, round {last}" if last is not None else "validation"
    labels = [label for _, _, label in columns]
    header = ["site"]
    for name in (baseline.replace("_", "-"), method):
        header += [f"{name} {labels[0]}", *labels[1:]]
    return f"{title} (PSNR in dB)\n" + format_table(header, rows)


def _mean(rows: list[dict], key: str, digits: int) -> str:
    vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    if not vals:
        return "-"
    m = sum(vals) / len(vals)
    return "nan" if math.isnan(m) else f"{m:.{digits}f}"
