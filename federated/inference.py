"""--phase test: evaluate a run checkpoint on the test split, write the reconstructions in the fastMRI
submission layout (one HDF5 per volume with dataset `reconstruction`) and a figure of a few slices."""
from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np

from federated.evaluation import reconstruct_volumes
from federated.experiment import build_experiment, eval_set
from federated.precision import autocast_forward
from federated.server import evaluation_plan, resolve_device
from federated.strategies import STRATEGIES
from federated.tasks import TASKS, task_name
from utils.checkpoint import load_checkpoint
from utils.errors import UserError
from utils.figures import save_recon_grid
from utils.metrics import summarize
from utils.report import format_table
from utils.runlog import write_metrics_csv

# Options that define the trained model and its clients: always taken from the checkpoint (with the
# task's own model options).
MODEL_OPTIONS = ("strategy", "model", "task", "train_dataset", "num_users", "sample_rate", "sequence",
                 "resolution", "challenge", "seed")
FIGURE_VOLUMES = 2


def test(opts: argparse.Namespace, log) -> list[dict]:
    if opts.checkpoint is None:
        raise UserError("--phase test needs --checkpoint FILE (a run's best.pt or last.pt)")
    ckpt = load_checkpoint(Path(opts.checkpoint))
    saved = ckpt["options"]
    opts = argparse.Namespace(**{**vars(opts), **{k: saved[k] for k in MODEL_OPTIONS if k in saved}})
    defining = TASKS[task_name(opts)].model_options
    opts = argparse.Namespace(**{**vars(opts), **{k: saved[k] for k in defining if k in saved}})
    if opts.test_dataset is None:
        opts.test_dataset = saved["test_dataset"]
    out = Path(opts.save_dir) / "test"
    device = resolve_device(opts.device)
    strategy = STRATEGIES[opts.strategy](opts)
    exp = build_experiment(opts, strategy)
    model = strategy.build_model(exp.clients)
    model.to(device).eval()
    by_name = {c.name: c for c in exp.clients}
    if set(ckpt["clients"]) != set(by_name):
        raise UserError(f"{opts.checkpoint}: its clients {sorted(ckpt['clients'])} are not the ones "
                        f"these options make ({sorted(by_name)})")
    # As in training: the per-client state a method keeps (e.g. FL-MRCM's discriminators) must exist
    # before the checkpoint's values can be loaded into it.
    strategy.prepare(exp, model, device)
    for c in exp.clients:
        strategy.init_client(c, model)
    for name, saved_client in ckpt["clients"].items():
        by_name[name].local_weights = saved_client["local_weights"]
        strategy.load_client_state(by_name[name], saved_client["extra"])

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--save_dir {opts.save_dir}: cannot write there ({e.strerror})") from None
    rows = []
    for label, client, site in evaluation_plan(strategy, exp):
        model.load_state_dict(strategy.eval_state(ckpt["model"], client))
        predict = autocast_forward(lambda inputs: strategy.forward(model, inputs, client), opts, device)
        folder = out / "reconstructions" / (site if label == "global" else f"{label}-on-{site}")
        folder.mkdir(parents=True, exist_ok=True)
        model_scores, zf_scores, figure_rows = [], [], []
        for vol in reconstruct_volumes(exp.task, eval_set(exp, site, "test", opts), predict, opts.bs,
                                       opts.num_workers, device):
            with h5py.File(folder / (_stem(vol.fname) + ".h5"), "w") as f:
                f.create_dataset("reconstruction", data=vol.reconstruction.astype(np.float32))
            if vol.target is None:
                continue
            model_scores.append(exp.task.volume_metrics(vol.target, vol.reconstruction))
            zf_scores.append(exp.task.volume_metrics(vol.target, vol.baseline))
            if len(figure_rows) < FIGURE_VOLUMES:
                mid = len(vol.slice_nums) // 2
                figure_rows.append((f"{vol.fname} slice {vol.slice_nums[mid]}",
                                    {exp.task.baseline_name.replace("_", "-"): vol.baseline[mid],
                                     opts.strategy: vol.reconstruction[mid]},
                                    vol.target[mid]))
        if model_scores:
            rows.append({"model": exp.task.baseline_name, "site": site, "split": "test", **summarize(zf_scores)})
            rows.append({"model": label, "site": site, "split": "test", **summarize(model_scores)})
            save_recon_grid(out / "figures" / f"{folder.name}.png", figure_rows)
        log.info(f"wrote {folder}")
    if rows:
        write_metrics_csv(out / "metrics.csv", rows)
        log.table("test split (PSNR in dB)\n" + format_table(
            ["model", "site", "PSNR", "SSIM", "NMSE", "volumes"],
            [[r["model"], r["site"], f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", f"{r.get('nmse', float('nan')):.4f}", r["volumes"]]
             for r in rows]))
    return rows


def _stem(fname: str) -> str:
    for suffix in (".nii.gz", ".nii", ".h5"):
        if fname.endswith(suffix):
            return fname[: -len(suffix)]
    return fname
