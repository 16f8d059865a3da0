"""--phase test: evaluate a run checkpoint, or public fastMRI weights (--pretrained), on one site's
test split (its val split when it has no test split), write the predicted volumes (the task's
`write_volume`: reconstructions in the fastMRI submission layout, one HDF5 per volume with dataset
`reconstruction`; syntheses as NIfTI or HDF5, one folder per translation) and a figure of a few
slices per evaluated model.

Only the test site's data is read: the model, the method and the clients come from the checkpoint
(or the weights), never from the training sites. A shared-model method's global model is evaluated
once; a personalised method (`Strategy.personalized`) evaluates each client's model, its rows and
folders named by the client as in training."""
from __future__ import annotations

import argparse
import itertools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from data.mri_data import subsample_volumes
from data.sites import Site, parse_site_list
from federated.client import Client
from federated.evaluation import reconstruct_volumes
from federated.experiment import resolve_registry, site_dataset
from federated.precision import autocast_forward
from federated.server import part_column, resolve_device
from federated.strategies import STRATEGIES
from federated.strategies.base import Strategy
from federated.tasks import TASKS, task_name
from utils.checkpoint import load_checkpoint
from utils.errors import CheckpointError, DataError, UserError
from utils.figures import save_recon_grid
from utils.metrics import summarize
from utils.report import format_table
from utils.runlog import write_metrics_csv

# Options that define the trained model and its clients: always taken from the checkpoint (with the
# task's own model options).
MODEL_OPTIONS = ("strategy", "model", "task", "train_dataset", "num_users", "sample_rate", "sequence",
                 "resolution", "challenge", "seed")
FIGURE_VOLUMES = 2
SPLITS = ("test", "val")  # evaluated: the first the test site has


@dataclass
class Tested:
    """What is evaluated: the options it was made with, its strategy, the weights of the global
    model (None: `model` already holds them) and (label, client or None) per evaluated model."""
    opts: argparse.Namespace
    strategy: Strategy
    model: nn.Module
    global_state: dict | None
    entries: list[tuple[str, Client | None]]
    test_site_from_run: bool = False  # no --test_dataset: the run's own target site


def test(opts: argparse.Namespace, log) -> list[dict]:
    if opts.checkpoint is not None and opts.pretrained is not None:
        raise UserError("--phase test evaluates one model: give --checkpoint (a run's best.pt) or "
                        "--pretrained (fastMRI weights), not both")
    if opts.checkpoint is not None:
        tested = from_checkpoint(opts, log)
    elif opts.pretrained is not None:
        tested = from_pretrained(opts, log)
    else:
        raise UserError("--phase test needs a model: --checkpoint FILE (a run's best.pt or last.pt) or "
                        "--pretrained FILE (fastMRI U-Net or VarNet weights)")
    opts, strategy, model = tested.opts, tested.strategy, tested.model
    task = strategy.task
    registry, _ = resolve_registry(opts)
    if opts.test_dataset not in registry and tested.test_site_from_run:
        raise UserError(f"{opts.checkpoint}: the run's target site {opts.test_dataset} is not among the sites "
                        f"given (known: {', '.join(sorted(registry)) or 'none'}): name the site to test "
                        "with --test_dataset")
    names = parse_site_list(opts.test_dataset, registry, "--test_dataset")
    # Built before anything is written: a site without usable data ends the test with nothing made.
    tests = []  # (site, split, dataset)
    for name in names:
        site = registry[name]
        split = test_split(site, opts.sequence)
        files = subsample_volumes(site.files(opts.sequence, split), opts.val_sample_rate, opts.seed)
        tests.append((site, split, site_dataset(task, site, files, opts, train=False)))
        if split != "test":
            log.info(f"site '{site.name}' has no test split: evaluating its {split} split")

    device = resolve_device(opts.device)
    model.to(device).eval()
    out = Path(opts.save_dir) / "test"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--save_dir {opts.save_dir}: cannot write there ({e.strerror})") from None
    rows, baseline_done = [], set()
    for (site, split, dataset), (label, client) in itertools.product(tests, tested.entries):
        if tested.global_state is not None:
            model.load_state_dict(strategy.eval_state(tested.global_state, client))
        predict = autocast_forward(lambda inputs: strategy.forward(model, inputs, client), opts, device)
        base = out / "reconstructions" / (site.name if client is None else f"{label}-on-{site.name}")
        scores: dict[str, tuple[list, list]] = {}  # part -> (model, baseline) metrics per volume
        figure_rows, shown = [], Counter()
        for vol in reconstruct_volumes(task, dataset, predict, opts.bs, opts.num_workers, device):
            folder = base / part_folder(vol.part)
            folder.mkdir(parents=True, exist_ok=True)
            task.write_volume(folder, vol, site)
            if vol.target is None:
                continue
            model_scores, zf_scores = scores.setdefault(vol.part, ([], []))
            model_scores.append(task.volume_metrics(vol.target, vol.reconstruction))
            zf_scores.append(task.volume_metrics(vol.target, vol.baseline))
            if shown[vol.part] < FIGURE_VOLUMES:
                shown[vol.part] += 1
                mid = len(vol.slice_nums) // 2
                figure_rows.append((f"{vol.part} {vol.fname} slice {vol.slice_nums[mid]}".strip(),
                                    task.figure_images(vol, mid, opts.strategy), vol.target[mid]))
        for part, (model_scores, zf_scores) in scores.items():
            where = {"site": site.name, **part_column(part), "split": split}
            if (site.name, part) not in baseline_done:  # the baseline is the same for every model: one row
                baseline_done.add((site.name, part))
                rows.append({"model": task.baseline_name, **where, **summarize(zf_scores)})
            rows.append({"model": label, **where, **summarize(model_scores)})
        if figure_rows:
            save_recon_grid(out / "figures" / f"{base.name}.png", figure_rows)
        log.info(f"wrote {base}")
    if rows:
        write_metrics_csv(out / "metrics.csv", rows)
        log.table(f"{'/'.join(dict.fromkeys(split for _, split, _ in tests))} split (PSNR in dB)\n" + format_table(
            ["model", "site", "PSNR", "SSIM", "NMSE", "volumes"],
            [[r["model"], f"{r['site']} {r.get('task', '')}".strip(), f"{r['psnr']:.2f}", f"{r['ssim']:.4f}",
              f"{r.get('nmse', float('nan')):.4f}", r["volumes"]] for r in rows]))
    else:
        log.warn(f"site(s) {', '.join(s.name for s, _, _ in tests)}: the volumes have no reference image; "
                 "wrote the predictions only, no metrics")
    return rows


def from_checkpoint(opts: argparse.Namespace, log) -> Tested:
    """The run's model and method from its checkpoint; each client's saved weights for a
    personalised method. Reads no data."""
    ckpt = load_checkpoint(Path(opts.checkpoint))
    missing = [k for k in ("options", "model", "clients") if not isinstance(ckpt.get(k), dict)]
    if missing:
        raise CheckpointError(f"{opts.checkpoint}: incomplete checkpoint (no {', '.join(missing)}); pass a "
                              "last.pt or best.pt from a run folder")
    saved = ckpt["options"]
    opts = argparse.Namespace(**{**vars(opts), **{k: saved[k] for k in MODEL_OPTIONS if k in saved}})
    defining = TASKS[task_name(opts)].model_options
    opts = argparse.Namespace(**{**vars(opts), **{k: saved[k] for k in defining if k in saved}})
    from_run = opts.test_dataset is None
    if from_run:
        opts.test_dataset = saved["test_dataset"]
    strategy = STRATEGIES[opts.strategy](opts)
    saved_clients = ckpt["clients"]
    if set(saved_clients) == {"flower_study"}:  # a Flower run: client state lives on the nodes
        if strategy.personalized:
            raise UserError(f"{opts.checkpoint}: a Flower run of {opts.strategy}, whose clients' own weights are "
                            "on the Flower nodes; --phase test takes the checkpoints of shared-model methods only")
        saved_clients = {}
    clients = [checkpoint_client(name, saved_client, opts.train_dataset)
               for name, saved_client in saved_clients.items()]
    model = strategy.build_model(list(dict.fromkeys(c.site for c in clients)))
    if not strategy.personalized:
        return Tested(opts, strategy, model, ckpt["model"], [("global", None)], from_run)
    if not clients:
        raise CheckpointError(f"{opts.checkpoint}: holds no clients' weights; pass a last.pt or best.pt of a run")
    return Tested(opts, strategy, model, ckpt["model"], [(c.name, c) for c in clients], from_run)


def checkpoint_client(name: str, saved: dict, train_dataset: str) -> Client:
    """A client as far as evaluation needs it: its name, site and local weights (no data)."""
    site = saved.get("site") or client_site(name, train_dataset)
    return Client(name=name, site=site, dataset=None, num_slices=0, generator=torch.Generator(),
                  local_weights=saved["local_weights"])


def client_site(name: str, train_dataset: str) -> str:
    """The site of client `name` in a checkpoint that does not record it (written before it did):
    the client is the site ("B"), one share of it ("B1", "Site5_2") or several pooled ("B+F")."""
    first = name.split("+")[0]
    spec = [s.strip() for s in train_dataset.split(",")] if "," in train_dataset else [train_dataset, *train_dataset]
    for site in sorted(spec, key=len, reverse=True):
        rest = first[len(site):] if first.startswith(site) else None
        if rest is not None and (rest == "" or rest.lstrip("_").isdigit()):
            return site
    return first


def from_pretrained(opts: argparse.Namespace, log) -> Tested:
    """One model from fastMRI-format weights; its sizes are read from the file, whatever the flags say."""
    if opts.test_dataset is None:
        raise UserError("--phase test --pretrained needs --test_dataset SITE: the site to evaluate the weights on")
    task_cls = TASKS[task_name(opts)]
    found = task_cls.pretrained_options(Path(opts.pretrained))
    if found:
        opts = argparse.Namespace(**{**vars(opts), **found})
        log.info(f"{opts.pretrained}: " + ", ".join(f"--{k} {v}" for k, v in found.items()))
    strategy = Strategy(opts)  # one model, evaluated as itself: no method applies
    model = strategy.task.build_model()
    strategy.task.load_pretrained(model, Path(opts.pretrained))
    return Tested(opts, strategy, model, None, [("pretrained", None)])


def test_split(site: Site, sequence: str) -> str:
    """The first of SPLITS the site has; DataError naming the folder when it has none."""
    folder = site.root / (site.sequence or sequence)
    for split in SPLITS:
        if (folder / split).is_dir():
            return split
    if folder.is_dir():
        raise DataError(f"site '{site.name}': no test or val split in {folder}: put the volumes to "
                        f"evaluate in {folder / 'test'}")
    site.files(sequence, SPLITS[0])  # raises naming the missing root or sequence folder
    raise AssertionError("unreachable")


def part_folder(part: str) -> str:
    """The subfolder of a part's outputs ("T1->T2" -> "T1-to-T2"); "" (the site's folder) for none."""
    return part.replace("->", "-to-")
