"""From options to data: which sites, which clients, which evaluation sets.

This is the one place that turns flags into datasets; the round loop receives the result.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from data.mri_data import SliceDataset, subsample_volumes
from data.sites import ClientSpec, Site, assign_clients, parse_site_list, registry_for
from data.subsample import create_mask_for_mask_type
from data.synthetic import SyntheticConfig, ensure_synthetic_sites
from federated.client import Client
from federated.tasks.base import Task
from utils.errors import UserError

if TYPE_CHECKING:
    from federated.strategies.base import Strategy


@dataclass
class Experiment:
    """The sites and clients of one run, and what is learned on them.

    `clients` train; `eval_sites` (test site first, then the `--val_dataset` sites, then the
    training sites) are evaluated on `split` by `eval_set`.
    """
    task: Task
    registry: dict[str, Site]
    clients: list[Client]
    train_sites: list[str]
    test_site: str
    eval_sites: list[str]
    synthetic_root: Path | None


def resolve_registry(opts: argparse.Namespace) -> tuple[dict[str, Site], Path | None]:
    """The site registry, generating the synthetic sites first when no data was named."""
    if opts.data_root is None and opts.sites is None:
        config = SyntheticConfig(resolution=opts.resolution, multicoil=opts.challenge == "multicoil")
        root = ensure_synthetic_sites(config,
                                      Path(opts.synthetic_dir) if opts.synthetic_dir else None,
                                      progress=not opts.quiet)
        return with_challenge(registry_for(root, None), opts.challenge), root
    data_root = Path(opts.data_root) if opts.data_root else None
    sites_file = Path(opts.sites) if opts.sites else None
    if data_root is not None and not data_root.is_dir():
        raise UserError(f"--data_root {data_root}: no such folder; point it at the folder holding one "
                        "subfolder per site (F, H, I, B) or a sites.json")
    if sites_file is not None and not sites_file.is_file():
        raise UserError(f"--sites {sites_file}: no such file; see 'Use your own data' in the README")
    return with_challenge(registry_for(data_root, sites_file), opts.challenge), None


def with_challenge(registry: dict[str, Site], challenge: str) -> dict[str, Site]:
    """--challenge multicoil makes every fastMRI HDF5 site multicoil (a sites file can also say so
    per site); image sites are single-coil by nature."""
    if challenge == "singlecoil":
        return registry
    return {k: s.with_challenge(challenge) for k, s in registry.items()}


def site_dataset(task: Task, site: Site, files: list[Path], opts: argparse.Namespace,
                 train: bool) -> SliceDataset:
    """A site's slices through the task's transform. Training draws a fresh mask per slice and epoch;
    evaluation seeds masks from the file name (the same for every slice of a volume and every run)."""
    task.check_site(site)
    mask = create_mask_for_mask_type(opts.mask_type, opts.center_fractions, opts.accelerations)
    return task.dataset(site, files, train, mask)


def eval_set(exp: Experiment, site_name: str, split: str, opts: argparse.Namespace) -> SliceDataset:
    """The `split` slices of one site, masks seeded from the file names."""
    site = exp.registry[site_name]
    files = subsample_volumes(site.files(opts.sequence, split), opts.val_sample_rate, opts.seed)
    return site_dataset(exp.task, site, files, opts, train=False)


def site_train_set(exp: Experiment, site_name: str, opts: argparse.Namespace) -> SliceDataset:
    """All training slices of one site (--sample_rate of its volumes), undersampled like any
    training input: what a site works with in `Strategy.site_context`, whether or not it has clients."""
    site = exp.registry[site_name]
    files = subsample_volumes(site.files(opts.sequence, "train"), opts.sample_rate, opts.seed)
    return site_dataset(exp.task, site, files, opts, train=True)


def _client(task: Task, group: list[ClientSpec], index: int, opts: argparse.Namespace) -> Client:
    parts = [site_dataset(task, spec.site, list(spec.train_files), opts, train=True) for spec in group]
    dataset = parts[0] if len(parts) == 1 else ConcatSliceDataset(parts)
    generator = torch.Generator().manual_seed(opts.seed * 1000 + index + 1)
    name = group[0].name if len(group) == 1 else "+".join(spec.name for spec in group)
    return Client(name=name, site=group[0].site.name, dataset=dataset, num_slices=len(dataset),
                  generator=generator)


def site_clients(task: Task, opts: argparse.Namespace, registry: dict[str, Site], train_sites: list[str],
                 site: str) -> list[Client]:
    """The clients `build_experiment` makes on `site` (same names, volumes and seeds) from that
    site's data alone, as a Flower SuperNode holding one site builds them. Strategies that regroup
    clients (`arrange_clients`) do not run on Flower."""
    num_users = opts.num_users if opts.num_users is not None else len(train_sites)
    if num_users % len(train_sites):
        raise UserError(f"--num_users {num_users} does not fit {len(train_sites)} training sites: "
                        f"use a multiple of {len(train_sites)}")
    per_site = num_users // len(train_sites)
    specs = assign_clients([registry[site]], per_site, opts.sequence, opts.sample_rate, opts.seed)
    first = train_sites.index(site) * per_site
    return [_client(task, [spec], first + k, opts) for k, spec in enumerate(specs)]


class ConcatSliceDataset(torch.utils.data.ConcatDataset):
    """Several sites' slices as one client's data (the pooled baseline)."""

    def set_epoch(self, seed: int | None) -> None:
        for d in self.datasets:
            d.set_epoch(seed)

    def set_time(self, t: int, total: int) -> None:
        for d in self.datasets:
            d.set_time(t, total)


def build_experiment(opts: argparse.Namespace, strategy: Strategy) -> Experiment:
    registry, synthetic_root = resolve_registry(opts)
    train_sites = parse_site_list(opts.train_dataset, registry, "--train_dataset")
    test_sites = parse_site_list(opts.test_dataset, registry, "--test_dataset")
    if len(test_sites) != 1:
        raise UserError(f"--test_dataset {opts.test_dataset}: name exactly one target site")
    test_site = test_sites[0]
    num_users = opts.num_users if opts.num_users is not None else len(train_sites)
    specs = assign_clients([registry[s] for s in train_sites], num_users, opts.sequence,
                           opts.sample_rate, opts.seed)
    groups = strategy.arrange_clients([[spec] for spec in specs])
    clients = [_client(strategy.task, group, i, opts) for i, group in enumerate(groups)]
    return Experiment(strategy.task, registry, clients, train_sites, test_site,
                      evaluated_sites(test_site, validation_sites(opts, registry), train_sites), synthetic_root)


def validation_sites(opts: argparse.Namespace, registry: dict[str, Site]) -> list[str]:
    """The extra sites of `--val_dataset` (none without it)."""
    return parse_site_list(opts.val_dataset, registry, "--val_dataset") if opts.val_dataset else []


def evaluated_sites(test_site: str, val_sites: list[str], train_sites: list[str]) -> list[str]:
    """The sites evaluated every round, each once: the target, the `--val_dataset` sites, the training sites."""
    return list(dict.fromkeys([test_site, *val_sites, *train_sites]))
