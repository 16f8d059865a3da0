"""One site's part of a study, on that site's own Flower SuperNode.

flwr runs every message in a fresh process, so `SiteNode` is built anew for each one, from the
SuperNode's `--node-config` and the study the server sends: the site's clients from the site's own
data only, the strategy and the model. What a client keeps between rounds (optimiser and scheduler,
local weights, the strategy's own state, its random generator) is written to the node's disk, one
file per client and round under `state-dir`, so a SuperNode restarted mid-study goes on from there.

Node config keys: `site` (required), `data-root` and/or `sites` (as --data_root / --sites),
`state-dir` (required), `device` (auto, cpu or cuda; default: the study's --device).
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from federated.client import Client
from federated.exchange import client_checkpoint, restore_client
from federated.experiment import Experiment, eval_set, resolve_registry, site_clients, site_train_set
from federated.server import resolve_device
from federated.strategies import STRATEGIES
from utils.checkpoint import FORMAT, load_checkpoint, save_atomic
from utils.errors import UserError
from utils.seeding import seed_everything

KEEP_ROUNDS = 2  # saved rounds per client: a server resumed after a crash repeats at most one round
_ROUND_FILE = re.compile(r"round-(\d+)\.pt")


def node_site(node_config: dict) -> str:
    site = node_config.get("site")
    if not isinstance(site, str) or not site:
        raise UserError("--node-config: name this SuperNode's site, e.g. --node-config 'site=\"F\" "
                        "data-root=\"/data/mri\" state-dir=\"/var/lib/fedrecon\"'")
    return site


def study_state_dir(node_config: dict, study_id: str) -> Path:
    """Where this node keeps the state of study `study_id`'s clients."""
    return Path(str(node_config["state-dir"])) / study_id


class SiteNode:
    def __init__(self, node_config: dict, study: dict):
        self.site = node_site(node_config)
        if not node_config.get("data-root") and not node_config.get("sites"):
            raise UserError(f"--node-config of site {self.site}: give data-root=\"DIR\" or sites=\"FILE\"")
        if not node_config.get("state-dir"):
            raise UserError(f"--node-config of site {self.site}: give state-dir=\"DIR\" (where its clients' "
                            "state is kept between rounds)")
        opts = argparse.Namespace(**vars(study["options"]))
        opts.data_root, opts.sites = node_config.get("data-root") or None, node_config.get("sites") or None
        opts.device = node_config.get("device", opts.device)
        self.opts = opts
        self.device = resolve_device(opts.device)
        self.state_dir = study_state_dir(node_config, study["study"])

        seed_everything(opts.seed)
        registry, _ = resolve_registry(opts)
        if self.site not in registry:
            raise UserError(f"--node-config site=\"{self.site}\": no such site in its data "
                            f"(known: {', '.join(sorted(registry))})")
        train_sites = list(study["train_sites"])
        self.strategy = STRATEGIES[opts.strategy](opts)
        task = self.strategy.task
        self.clients = site_clients(task, opts, registry, train_sites, self.site) if self.site in train_sites else []
        self.exp = Experiment(task, registry, self.clients, train_sites, study["test_site"], [self.site], None)
        self.model = self.strategy.build_model(train_sites).to(self.device)
        self.strategy.prepare(self.exp, self.model, self.device)
        for c in self.clients:
            self.strategy.init_client(c, self.model)

    def client(self, name: str) -> Client:
        for c in self.clients:
            if c.name == name:
                return c
        raise UserError(f"site {self.site} has no client {name!r} (its clients: "
                        f"{', '.join(c.name for c in self.clients) or 'none'})")

    def val_set(self):
        return eval_set(self.exp, self.site, "val", self.opts)

    def train_set(self):
        """All of the site's training slices, for the strategy's start-of-round work."""
        return site_train_set(self.exp, self.site, self.opts)

    # ---- the clients' state on this node's disk ------------------------------------------------
    def _saved_rounds(self, client: Client) -> dict[int, Path]:
        folder = self.state_dir / client.name
        if not folder.is_dir():
            return {}
        return {int(m.group(1)): p for p in folder.iterdir() if (m := _ROUND_FILE.fullmatch(p.name))}

    def restore(self, client: Client, before: int) -> int | None:
        """Load the client's state saved after its latest round earlier than `before`; returns
        that round, or None when it has none (it starts fresh, as in round 1)."""
        rounds = [r for r in self._saved_rounds(client) if r < before]
        if not rounds:
            return None
        last = max(rounds)
        saved = load_checkpoint(self._saved_rounds(client)[last])
        restore_client(client, self.strategy, saved["client"])
        return last

    def save(self, client: Client, rnd: int) -> None:
        """Write the client's state after round `rnd`, keeping the KEEP_ROUNDS latest rounds."""
        folder = self.state_dir / client.name
        folder.mkdir(parents=True, exist_ok=True)
        save_atomic({"format": FORMAT, "round": rnd, "client": client_checkpoint(client, self.strategy)},
                    folder / f"round-{rnd}.pt")
        saved = self._saved_rounds(client)
        for r in sorted(saved)[:-KEEP_ROUNDS]:
            saved[r].unlink(missing_ok=True)

