"""Write paper tables (`experiments.table.Table`) as Markdown, CSV and LaTeX (booktabs)."""
from __future__ import annotations

import csv
import io

from experiments.results import METRICS
from experiments.table import DIGITS, HEADERS, PERSONALISED_MARK, Cell, Table

LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                 "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
                 "±": r"$\pm$", "†": r"$^\dagger$", "→": r"$\rightarrow$"}


def _label(row, mark: str) -> str:
    return row.label + (mark if row.personalized else "")


def markdown(tables: list[Table], cross: list[dict], header: str) -> str:
    """All tables, each under a heading, with best values in bold and footnotes below."""
    out = [header, ""]
    for t in tables:
        out += [f"### {t.title}", "",
                "| " + " | ".join([t.row_header] + [f"{c} {HEADERS[m]}" for c in t.columns for m in METRICS]) + " |",
                "|---" + "|---:" * (len(t.columns) * len(METRICS)) + "|"]
        for row in t.rows:
            cells = [_md_cell(row.cells.get((c, m)), m) for c in t.columns for m in METRICS]
            out.append("| " + " | ".join([_label(row, PERSONALISED_MARK)] + cells) + " |")
        out += [""] + [f"{n}  " for n in t.notes] + ([""] if t.notes else [])
    if cross:
        out += ["### Single-site models on their own site and on the target", "",
                "| Table | Trained on | Target | SSIM own site | SSIM target | PSNR own site | PSNR target "
                "| zero-filled SSIM own / target | zero-filled PSNR own / target |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in cross:
            out.append(f"| {r['table']} | {r['trained_on']} | {r['target']} | {r['own_ssim']:.4f} | "
                       f"{r['target_ssim']:.4f} | {r['own_psnr']:.2f} | {r['target_psnr']:.2f} | "
                       f"{r['zf_own_ssim']:.4f} / {r['zf_target_ssim']:.4f} | "
                       f"{r['zf_own_psnr']:.2f} / {r['zf_target_psnr']:.2f} |")
        out.append("")
    out.append("PSNR in dB. Best value of each column in bold.")
    return "\n".join(out) + "\n"


def _md_cell(cell: Cell | None, metric: str) -> str:
    if cell is None:
        return "–"
    return f"**{cell.text(metric)}**" if cell.best else cell.text(metric)


def csv_text(tables: list[Table]) -> str:
    """One line per table row: the table's axis values, the row label, then per column and metric
    the mean, std (empty for one seed) and number of seeds, at full precision."""
    group_axes = list(dict.fromkeys(a for t in tables for a in t.group))
    columns = list(dict.fromkeys(c for t in tables for c in t.columns))
    fields = group_axes + ["row"] + [f"{c}_{m}{s}" for c in columns for m in METRICS for s in ("", "_std", "_n")]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for t in tables:
        for row in t.rows:
            line = {**t.group, "row": row.label}
            for (c, m), cell in row.cells.items():
                line.update({f"{c}_{m}": repr(cell.mean), f"{c}_{m}_std": "" if cell.std is None else repr(cell.std),
                             f"{c}_{m}_n": cell.n})
            writer.writerow(line)
    return buf.getvalue()


def latex(tables: list[Table], header: str) -> str:
    """One booktabs `table` environment per table (needs \\usepackage{booktabs})."""
    out = [f"% {line}" for line in header.splitlines()]
    for t in tables:
        n = len(t.columns)
        out += [r"\begin{table}[t]", r"\centering",
                rf"\caption{{{_tex(t.title)}: SSIM and PSNR (dB).}}",
                r"\begin{tabular}{l" + " cc" * n + "}", r"\toprule",
                " & " + " & ".join(rf"\multicolumn{{2}}{{c}}{{{_tex(c)}}}" for c in t.columns) + r" \\",
                "".join(rf"\cmidrule(lr){{{2 + 2 * i}-{3 + 2 * i}}}" for i in range(n)),
                _tex(t.row_header) + " & " + " & ".join(HEADERS[m] for _ in t.columns for m in METRICS) + r" \\",
                r"\midrule"]
        for row in t.rows:
            cells = [_tex_cell(row.cells.get((c, m)), m) for c in t.columns for m in METRICS]
            out.append(" & ".join([_tex(_label(row, PERSONALISED_MARK))] + cells) + r" \\")
            if row is t.rows[0]:  # the baseline
                out.append(r"\midrule")
        out += [r"\bottomrule", r"\end{tabular}"]
        out += [rf"\par\footnotesize {_tex(n_)}" for n_ in t.notes]
        out += [r"\end{table}", ""]
    return "\n".join(out)


def _tex_cell(cell: Cell | None, metric: str) -> str:
    if cell is None:
        return "--"
    d = DIGITS[metric]
    text = f"{cell.mean:.{d}f}" + (rf"$\pm${cell.std:.{d}f}" if cell.std is not None else "")
    return rf"\textbf{{{text}}}" if cell.best else text


def _tex(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in text)
