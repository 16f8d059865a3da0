"""Paper figures from a grid's runs, each written as PNG and PDF:

- `accel_<group>`: SSIM and PSNR on the target site against the acceleration, one line per method
  (grids whose runs differ in `--accelerations`, e.g. accel_sweep.json);
- `curves_<group>`: validation PSNR on the target site and training loss against the round;
- `val_<group>`: validation SSIM and PSNR on the target site against the round, one panel per value
  of the table's column axis, a line per row (mean over seeds, the band their min..max), e.g. the
  transfer grid's brain curves, augmented or not, one panel per training fraction;
- `recon_<group>`: one test slice -- zero-filled input, each method's reconstruction, ground truth --
  with the error maps below (runs of a grid with `"test_phase": true`).

Synthesis grids (`--task synthesis`) instead get, per group:
- `curves_<group>`: validation PSNR against the round, a panel per site and translation, the
  identity baseline dashed;
- `synthesis_<group>_<site>`: per site, a row per translation on one test slice -- the source, each
  method's synthesis, the real target -- with |image - target| below each.

A group is one combination of the axes other than the rows (methods) and seeds, e.g. `T1_H`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from experiments.results import GridResults, RunResult, mean_std  # noqa: E402

Groups = dict[tuple[str, ...], list[RunResult]]


def make_figures(results: GridResults, out: Path, volume: str | None = None,
                 slice_index: int | None = None) -> list[Path]:
    """Every figure the grid's finished runs allow; returns the files written."""
    out = Path(out)
    runs = [r for r in results.runs if r.finished]
    spec = results.grid["table"]
    per_method = {spec.get("rows"), spec.get("seeds")} - {None}
    written = []
    if runs and runs[0].baseline == "identity":
        for key, members in groups(results, runs, per_method).items():
            written += synthesis_curves(results, members, out / f"curves_{_slug(key)}", _title(results, key))
            written += synthesis_figures(results, members, out / f"synthesis_{_slug(key)}", _title(results, key))
        return written
    for key, members in groups(results, runs, per_method | accel_axes(runs)).items():
        if len({acceleration(r) for r in members}) > 1:
            written += accel_figure(results, members, out / f"accel_{_slug(key)}", _title(results, key))
    panels = panel_axis(results)
    if panels is not None:
        for key, members in groups(results, runs, per_method | {panels}).items():
            written += panels_figure(results, members, panels, out / f"val_{_slug(key)}",
                                     _title(results, key, {panels}))
    if any(r.epsilon() is not None for r in runs):
        for key, members in groups(results, runs, per_method).items():
            written += privacy_figure(results, members, out / f"privacy_{_slug(key)}", _title(results, key))
    for key, members in groups(results, runs, per_method).items():
        written += curves_figure(results, members, out / f"curves_{_slug(key)}", _title(results, key))
        written += recon_figure(results, members, out / f"recon_{_slug(key)}", _title(results, key),
                                volume, slice_index)
    return written


# ---- grouping -----------------------------------------------------------------------------------
def groups(results: GridResults, runs: list[RunResult], exclude: set[str]) -> Groups:
    """Runs keyed by their values on the grid's axes other than `exclude`."""
    axes = [a for a in results.grid["axes"] if a not in exclude]
    out: Groups = {}
    for run in runs:
        out.setdefault(tuple(run.coords.get(a, "") for a in axes), []).append(run)
    return out


def accel_axes(runs: list[RunResult]) -> set[str]:
    """Axes whose values set the acceleration: each value one acceleration, not all the same."""
    found = set()
    for axis in {a for r in runs for a in r.coords}:
        per_value: dict[str, set[float]] = {}
        for r in runs:
            per_value.setdefault(r.coords.get(axis, ""), set()).add(acceleration(r))
        if all(len(v) == 1 for v in per_value.values()) and len(set.union(*per_value.values())) > 1:
            found.add(axis)
    return found


def acceleration(run: RunResult) -> float:
    return float(run.options["accelerations"][0])


def method(results: GridResults, run: RunResult) -> str:
    rows = results.grid["table"].get("rows")
    return results.label(rows, run.coords.get(rows, run.name)) if rows else run.name


def _methods(results: GridResults, runs: list[RunResult]) -> dict[str, list[RunResult]]:
    """Runs by method label, in grid order (seeds of one method together)."""
    out: dict[str, list[RunResult]] = {}
    for run in runs:
        out.setdefault(method(results, run), []).append(run)
    return out


def panel_axis(results: GridResults) -> str | None:
    """The table's column axis when it is one of the grid's axes (not the runs' sites): the axis
    whose values get a panel each in `val_<group>`."""
    columns = results.grid["table"].get("columns")
    return columns if columns in results.grid["axes"] else None


def _title(results: GridResults, key: tuple[str, ...], exclude: set[str] = frozenset()) -> str:
    """The labels of `key`, the values of the axes other than rows, seeds and `exclude`."""
    spec = results.grid["table"]
    axes = [a for a in results.grid["axes"] if a not in {spec.get("rows"), spec.get("seeds"), *exclude}]
    return ", ".join(f"{a} {results.label(a, v)}" for a, v in zip(axes, key) if v)


def _slug(key: tuple[str, ...]) -> str:
    return "_".join(v for v in key if v) or "all"


def _save(fig, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=120, bbox_inches="tight", metadata={"CreationDate": None} if p.suffix == ".pdf" else None)
    plt.close(fig)
    return paths


# ---- figures ------------------------------------------------------------------------------------
def accel_figure(results: GridResults, runs: list[RunResult], stem: Path, title: str) -> list[Path]:
    """SSIM and PSNR against acceleration; error bars are the std over seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, members in _methods(results, runs).items():
        xs = sorted({acceleration(r) for r in members})
        for ax, m in zip(axes, ("psnr", "ssim")):
            stats = [mean_std([r.final_scores(r.target)[m] for r in members if acceleration(r) == x]) for x in xs]
            ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] or 0.0 for s in stats], marker="o", capsize=3,
                        label=name)
    zf = sorted({(acceleration(r), r.zero_filled(r.target)["psnr"], r.zero_filled(r.target)["ssim"]) for r in runs})
    for ax, i, m in ((axes[0], 1, "PSNR (dB)"), (axes[1], 2, "SSIM")):
        ax.plot([z[0] for z in zf], [z[i] for z in zf], "k--", marker=".", label="zero-filled")
        ax.set_xlabel("acceleration")
        ax.set_ylabel(m)
        ticks = sorted({z[0] for z in zf})
        ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, stem)


def curves_figure(results: GridResults, runs: list[RunResult], stem: Path, title: str) -> list[Path]:
    """Validation PSNR on the target site and mean training loss against the round."""
    fig, (ax_psnr, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, members in _methods(results, runs).items():
        curves = [r.val_curve(r.target) for r in members]
        rounds = [k for k, _, _ in curves[0]]
        ax_psnr.plot(rounds, np.mean([[p for _, p, _ in c] for c in curves], axis=0),
                     marker=".", label=name)
        losses = [r.train_loss() for r in members]
        ax_loss.plot([k for k, _ in losses[0]], np.mean([[v for _, v in l] for l in losses], axis=0),
                     marker=".", label=name)
    zf = runs[0].zero_filled(runs[0].target)
    if zf is not None:
        ax_psnr.axhline(zf["psnr"], color="k", ls="--", lw=1, label="zero-filled")
    ax_psnr.set(xlabel="round", ylabel=f"val PSNR on {runs[0].target} (dB)")
    ax_loss.set(xlabel="round", ylabel="train L1 loss (mean over clients)", yscale="log")
    for ax in (ax_psnr, ax_loss):
        ax.grid(alpha=0.3)
    ax_loss.legend(*ax_psnr.get_legend_handles_labels(), fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, stem)


def panels_figure(results: GridResults, runs: list[RunResult], axis: str, stem: Path, title: str) -> list[Path]:
    """Validation SSIM (top) and PSNR (bottom) on each run's target site against the round: a panel
    column per value of `axis` (in grid order), a line per method, the mean over seeds with the band
    between the lowest and highest seed; the zero-filled input dashed."""
    by_value: dict[str, list[RunResult]] = {}
    for run in runs:
        by_value.setdefault(run.coords.get(axis, ""), []).append(run)
    values = [v for v in results.grid["axes"][axis] if v in by_value]
    fig, axes = plt.subplots(2, len(values), figsize=(3.6 * len(values) + 1.2, 5.4), squeeze=False,
                             sharex=True, sharey="row")
    for col, value in enumerate(values):
        members = by_value[value]
        targets = sorted({r.target for r in members})
        for name, seeds in _methods(results, members).items():
            rounds, stats = _seed_curves(seeds)
            if not rounds:
                continue
            for row, metric in enumerate(("ssim", "psnr")):
                mean, low, high = (np.array([s[metric][i] for s in stats]) for i in range(3))
                line, = axes[row, col].plot(rounds, mean, marker=".", label=f"{name} ({len(seeds)} seeds)"
                                            if len(seeds) > 1 else name)
                if len(seeds) > 1:
                    axes[row, col].fill_between(rounds, low, high, color=line.get_color(), alpha=0.2, lw=0)
        zf = [z for z in (r.zero_filled(r.target) for r in members) if z is not None]
        for row, metric in enumerate(("ssim", "psnr")):
            ax = axes[row, col]
            if zf:
                ax.axhline(float(np.mean([z[metric] for z in zf])), color="k", ls="--", lw=1, label="zero-filled")
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(f"val {'SSIM' if metric == 'ssim' else 'PSNR (dB)'} on {', '.join(targets)}")
        axes[0, col].set_title(results.label(axis, value), fontsize=9)
        axes[1, col].set_xlabel("round")
        axes[1, col].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, stem)


def privacy_figure(results: GridResults, runs: list[RunResult], stem: Path, title: str) -> list[Path]:
    """Final validation SSIM and PSNR per site against the epsilon each private run spent (log x, a
    marker per run, seeds averaged); the non-private runs and zero-filled as horizontal lines."""
    import matplotlib.pyplot as plt
    private = [r for r in runs if r.epsilon() is not None]
    public = [r for r in runs if r.epsilon() is None]
    sites = list(dict.fromkeys(site for r in runs for site, _ in r.evaluated()))
    fig, axes = plt.subplots(2, len(sites), figsize=(3.2 * len(sites), 5.6), squeeze=False)
    for col, site in enumerate(sites):
        for row, metric in enumerate(("ssim", "psnr")):
            ax = axes[row][col]
            for label, members in _mechanisms(private).items():
                points = sorted((r.epsilon(), r.final_scores(site)[metric]) for r in members if r.final_scores(site))
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
            for r in public[:1]:
                if (scores := r.final_scores(site)) is not None:
                    ax.axhline(scores[metric], color="k", lw=1, label="non-private")
            if runs and (zf := runs[0].zero_filled(site)) is not None:
                ax.axhline(zf[metric], color="gray", ls="--", lw=1, label="zero-filled")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(plt.NullFormatter())  # labelled decades only: minor labels overlap
            ax.set_title(f"{site} {metric.upper()}", fontsize=9)
            if row == 1:
                ax.set_xlabel("epsilon (log scale)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, stem)


def _mechanisms(runs: list[RunResult]) -> dict[str, list[RunResult]]:
    """Private runs by mechanism: sample-level DP-SGD or client-level DP-FedAvg (one line each)."""
    out: dict[str, list[RunResult]] = {}
    for run in runs:
        sample_level = run.options.get("dpsgd_noise") is not None
        out.setdefault("DP-SGD (per slice)" if sample_level else "DP-FedAvg (per client)", []).append(run)
    return out


def _seed_curves(runs: list[RunResult]) -> tuple[list[int], list[dict[str, tuple[float, float, float]]]]:
    """The rounds every run of `runs` evaluated on its target, and at each the (mean, min, max) over
    the runs of SSIM and PSNR."""
    curves = [{k: (p, s) for k, p, s in r.val_curve(r.target)} for r in runs]
    rounds = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    stats = []
    for k in rounds:
        psnrs, ssims = [c[k][0] for c in curves], [c[k][1] for c in curves]
        stats.append({"psnr": (float(np.mean(psnrs)), min(psnrs), max(psnrs)),
                      "ssim": (float(np.mean(ssims)), min(ssims), max(ssims))})
    return rounds, stats


def recon_figure(results: GridResults, runs: list[RunResult], stem: Path, title: str,
                 volume: str | None, slice_index: int | None) -> list[Path]:
    """Zero-filled, each method and the ground truth on one test slice of the target site, with
    |image - ground truth| below each; needs the runs' `--phase test` outputs. Uses each method's
    lowest seed."""
    recons: dict[str, Path] = {}
    for name, members in _methods(results, runs).items():
        run = min(members, key=lambda r: int(r.options["seed"]))
        folder = test_folder(run)
        if folder is not None:
            recons[name] = folder
    if not recons:
        return []
    first = next(iter(recons.values()))
    volume = volume or sorted(p.stem for p in first.glob("*.h5"))[0]
    ref = reference(runs[0], volume)
    index = len(ref.slice_nums) // 2 if slice_index is None else slice_index
    if not 0 <= index < len(ref.slice_nums):
        from utils.errors import UserError
        raise UserError(f"--slice {index}: volume {volume} has slices 0..{len(ref.slice_nums) - 1}")
    truth = ref.target[index]
    maxval = float(ref.target.max())
    images = {"zero-filled": ref.baseline[index]}
    for name, folder in recons.items():
        with h5py.File(folder / f"{volume}.h5", "r") as f:
            images[name] = f["reconstruction"][index]
    caption = f"{volume}, slice {ref.slice_nums[index]} (test split)"
    return _save(_recon_panels(images, truth, maxval, f"{title}: {caption}" if title else caption), stem)


def _recon_panels(images: dict[str, np.ndarray], truth: np.ndarray, maxval: float, title: str):
    from utils.metrics import psnr, ssim

    n = len(images) + 1
    fig, axes = plt.subplots(2, n, figsize=(1.9 * n, 4.3), squeeze=False)
    errors = {k: np.abs(v - truth) for k, v in images.items()}
    emax = max(float(e.max()) for e in errors.values()) or 1.0
    for i, (name, img) in enumerate(images.items()):
        score = f"{psnr(truth[None], img[None], maxval):.2f} dB / {ssim(truth[None], img[None], maxval):.3f}"
        axes[0, i].imshow(img, cmap="gray", vmin=0, vmax=maxval)
        axes[0, i].set_title(f"{name}\n{score}", fontsize=7)
        axes[1, i].imshow(errors[name], cmap="inferno", vmin=0, vmax=emax)
    axes[0, -1].imshow(truth, cmap="gray", vmin=0, vmax=maxval)
    axes[0, -1].set_title("ground truth", fontsize=7)
    axes[1, 0].set_ylabel("|image - truth|", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1, -1].axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def synthesis_curves(results: GridResults, runs: list[RunResult], stem: Path, title: str) -> list[Path]:
    """Validation PSNR against the round, one panel per evaluated site and translation; the
    identity baseline dashed (mean over seeds)."""
    panels = list(dict.fromkeys(p for r in runs for p in r.evaluated()))
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.9 * ncols, 2.5 * nrows), squeeze=False)
    for ax, (site, task) in zip(axes.flat, panels):
        for name, members in _methods(results, runs).items():
            curves = [c for c in (r.val_curve(site, task) for r in members) if c]
            if curves:
                ax.plot([k for k, _, _ in curves[0]], np.mean([[p for _, p, _ in c] for c in curves], axis=0),
                        marker=".", ms=3, label=name)
        identity = [z["psnr"] for z in (r.zero_filled(site, task) for r in runs) if z is not None]
        if identity:
            ax.axhline(float(np.mean(identity)), color="k", ls="--", lw=1, label="identity (source)")
        ax.set_title(f"{site} {task}", fontsize=9)
        ax.set(xlabel="round", ylabel="val PSNR (dB)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, stem)


def synthesis_figures(results: GridResults, runs: list[RunResult], stem: Path, title: str) -> list[Path]:
    """Per site one figure: a row per translation on the middle slice of the first test volume --
    source, each method's synthesis (its lowest seed; a personalised method's own client model),
    the real target -- and |image - target| below. Needs the runs' `--phase test` outputs."""
    written = []
    methods = {name: min(members, key=lambda r: int(r.options["seed"]))
               for name, members in _methods(results, runs).items()}
    for site in dict.fromkeys(site for r in runs for site, _ in r.evaluated()):
        references = synthesis_references(runs[0], site)
        if not references:
            continue
        rows = []
        for task, ref in references.items():
            index = len(ref.slice_nums) // 2
            images = {"source (identity)": ref.baseline[index]}
            for name, run in methods.items():
                found = synthesis_output(run, site, task, ref.fname)
                if found is not None:
                    images[name] = found[index]
            rows.append((f"{task}: {ref.fname} slice {ref.slice_nums[index]}", images, ref.target[index]))
        written += _save(_synthesis_panels(rows), stem.with_name(f"{stem.name}_{site}"))
    return written


def _synthesis_panels(rows: list[tuple[str, dict[str, np.ndarray], np.ndarray]]):
    """A pair of rows per translation: images and the target above, |image - target| below; each
    image scored (PSNR / SSIM, scaled by the target's range) as in the tables."""
    from utils.synthesis_metrics import synthesis_metrics

    n = len(rows[0][1]) + 1
    fig, axes = plt.subplots(2 * len(rows), n, figsize=(1.9 * n, 2.15 * 2 * len(rows)), squeeze=False)
    for r, (caption, images, truth) in enumerate(rows):
        top, bottom = axes[2 * r], axes[2 * r + 1]
        low, high = float(truth.min()), float(truth.max())
        errors = {k: np.abs(v - truth) for k, v in images.items()}
        emax = max(float(e.max()) for e in errors.values()) or 1.0
        for i, (name, img) in enumerate(images.items()):
            score = synthesis_metrics(truth[None], img[None])
            top[i].imshow(img, cmap="gray", vmin=low, vmax=high)
            top[i].set_title(f"{name}\n{score['psnr']:.2f} dB / {score['ssim']:.3f}", fontsize=7)
            bottom[i].imshow(errors[name], cmap="inferno", vmin=0, vmax=emax)
        top[-1].imshow(truth, cmap="gray", vmin=low, vmax=high)
        top[-1].set_title("target", fontsize=7)
        top[0].set_ylabel(caption, fontsize=7)
        bottom[0].set_ylabel("|image - target|", fontsize=7)
        bottom[-1].axis("off")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def synthesis_references(run: RunResult, site: str) -> dict:
    """Per translation of `site`, the first test volume with its source (identity) and target, made
    from the data as the test phase made it."""
    import torch

    from federated.evaluation import reconstruct_volumes
    from federated.experiment import Experiment, eval_set, resolve_registry
    from federated.tasks import task_for

    opts = argparse.Namespace(**{**run.options, "quiet": True})
    registry, _ = resolve_registry(opts)
    task = task_for(opts)
    exp = Experiment(task, registry, [], [], site, [site], None)
    found = {}
    for vol in reconstruct_volumes(task, eval_set(exp, site, "test", opts), None, opts.bs, 0, torch.device("cpu")):
        found.setdefault(vol.part, vol)
    return found


def synthesis_output(run: RunResult, site: str, task: str, volume: str) -> np.ndarray | None:
    """The run's `--phase test` synthesis (S, H, W) of `volume` on `site` for `task`: the global
    model's, or the model of the client trained at `site`; NIfTI or HDF5 as written."""
    from federated.inference import part_folder

    root = run.path / "test" / "reconstructions"
    for folder in (root / site, root / f"{site}-on-{site}"):
        nifti, h5 = folder / part_folder(task) / f"{volume}.nii.gz", folder / part_folder(task) / f"{volume}.h5"
        if nifti.is_file():
            import nibabel as nib
            return np.transpose(np.asarray(nib.load(nifti).dataobj, dtype=np.float32), (2, 0, 1))
        if h5.is_file():
            with h5py.File(h5, "r") as f:
                return np.asarray(f["synthesis"])
    return None


def test_folder(run: RunResult) -> Path | None:
    """The run's `--phase test` reconstructions on its target site: `<site>` for a global model,
    `<client>-on-<site>` for a personalised one (the first client in name order)."""
    root = run.path / "test" / "reconstructions"
    found = sorted(p for p in root.glob("*") if p.name == run.target or p.name.endswith(f"-on-{run.target}"))
    return found[0] if found else None


def reference(run: RunResult, volume: str):
    """Ground truth and zero-filled input of test volume `volume` on the run's target site, made from
    the data exactly as the test phase made the model's input (same masks, same crop)."""
    import torch

    from federated.evaluation import reconstruct_volumes
    from federated.experiment import Experiment, eval_set, resolve_registry
    from federated.tasks import task_for
    from utils.errors import UserError

    opts = argparse.Namespace(**{**run.options, "quiet": True})
    registry, _ = resolve_registry(opts)
    task = task_for(opts)
    exp = Experiment(task, registry, [], [], run.target, [run.target], None)
    for vol in reconstruct_volumes(task, eval_set(exp, run.target, "test", opts), None, opts.bs, 0,
                                   torch.device("cpu")):
        if _stem(vol.fname) == volume:
            return vol
    raise UserError(f"--volume {volume}: no such test volume on site {run.target}")


def _stem(fname: str) -> str:
    """File name without .h5 / .nii / .nii.gz, as the test phase names its outputs."""
    for suffix in (".nii.gz", ".nii", ".h5"):
        if fname.endswith(suffix):
            return fname[: -len(suffix)]
    return fname
