"""How the round loop reaches its clients.

`federated/server.py` runs a round as: select clients -> `Exchange.site_contexts` (the strategy's
start-of-round work at the sites that do some, with their own data) -> `Exchange.train` (their local
updates, with the round's payload) -> aggregate -> `Exchange.evaluate`. `InProcess` does the
clients' work in this process; the Flower exchange (`federated/flower/server_app.py`) sends the same
work to one SuperNode per site, whose ClientApp calls the same functions below. Whatever carries it, a client's update is the same
`local_update` with the same strategy hooks, and the server receives only the shared entries.
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn
from tqdm import tqdm

from federated.client import Client, ClientFailure, LocalResult, local_update
from federated.domain_gap import pooled_latents
from federated.evaluation import evaluate_parts
from federated.experiment import site_train_set
from federated.precision import autocast_forward
from utils.errors import UserError

if TYPE_CHECKING:
    from federated.experiment import Experiment
    from federated.strategies.base import Strategy

State = dict[str, torch.Tensor]
# (model label, client whose model it is or None for the global one, site), see server.evaluation_plan
PlanEntry = tuple[str, "Client | None", str]

GAP_SLICES = 64  # validation slices per site for the latent domain gap


@dataclass
class ClientUpdate:
    """A client's answer to one round: its new weights (only the entries the strategy aggregates),
    its mean training loss and logged values, and the seconds it took as seen by the server."""
    client: Client
    state: State
    loss: float
    logs: dict[str, float]
    seconds: float


@dataclass
class LeftOut:
    """A selected client whose update is not used this round, and why (one line)."""
    client: Client
    reason: str


@dataclass
class Evaluation:
    """Scores of each plan entry (None: not evaluated, with a warning), its seconds, and the pooled
    latents (N, 4C) of the global model per requested site."""
    scores: list[dict | None]
    seconds: list[float]
    latents: dict[str, torch.Tensor] = field(default_factory=dict)


class Exchange(Protocol):
    def site_contexts(self, rnd: int, global_state: State, seeds: dict[str, int]) -> dict[str, State]:
        """`Strategy.site_context` of each site in `seeds` (with its seed), done where the site's
        data is; only its result comes back. Raises RunStopped when a site cannot do it."""

    def train(self, rnd: int, global_state: State, clients: list[Client],
              payload: State) -> list[ClientUpdate | LeftOut]:
        """Every client's local update from `global_state`, with the round's `payload`
        (`Strategy.round_payload`), in the order of `clients`."""

    def evaluate(self, global_state: State, plan: list[PlanEntry], latent_sites: list[str]) -> Evaluation:
        """Validation scores of each plan entry, and the global model's latents on `latent_sites`."""

    def baseline(self, sites: list[str]) -> dict[str, dict]:
        """Validation scores of the task's model-free baseline per site (round 0 of metrics.csv)."""

    def client_states(self) -> dict:
        """What the checkpoint keeps of the clients."""

    def load_client_states(self, saved: dict, path) -> None:
        """Restore what `client_states` returned (`path`: the checkpoint, for error messages)."""


# ---- the client's side: the same in this process and on a Flower SuperNode ---------------------
def start_round(strategy: Strategy, rnd: int, model: nn.Module, global_state: State, clients: list[Client],
                payload: State) -> None:
    """Before `clients` train in round `rnd`: the round's payload, then the strategy's `begin_round`."""
    strategy.load_round_payload(payload)
    strategy.begin_round(rnd, model, global_state, clients)


def shared_entries(strategy: Strategy, state: State) -> State:
    """The entries of `state` the strategy aggregates: all a server ever receives from a client."""
    return {k: v for k, v in state.items() if strategy.is_shared(k)}


def keep_local(client: Client, strategy: Strategy, result: LocalResult) -> None:
    """After a successful local update: what the client keeps for its next round."""
    client.optimizer_state, client.scheduler_state = result.optimizer_state, result.scheduler_state
    client.local_weights = {k: v for k, v in result.state.items() if not strategy.is_shared(k)}
    client.dpsgd_history = result.dpsgd_history


def failure_reason(e: Exception) -> str:
    """One line on why a local update failed."""
    return str(e) if isinstance(e, ClientFailure) else f"{type(e).__name__}: {e}"


def client_checkpoint(client: Client, strategy: Strategy) -> dict:
    """Everything a client keeps between rounds, as tensors and plain values, and its site (what
    --phase test needs to evaluate its model without the training data)."""
    return {"site": client.site, "local_weights": client.local_weights, "optimizer": client.optimizer_state,
            "scheduler": client.scheduler_state, "generator": client.generator.get_state(),
            "extra": strategy.client_state(client), "dpsgd_history": client.dpsgd_history}


def restore_client(client: Client, strategy: Strategy, saved: dict) -> None:
    client.local_weights = saved["local_weights"]
    client.optimizer_state, client.scheduler_state = saved["optimizer"], saved["scheduler"]
    client.generator.set_state(saved["generator"])
    client.dpsgd_history = saved.get("dpsgd_history")  # absent in checkpoints from before DP-SGD
    strategy.load_client_state(client, saved["extra"])


def evaluate_model(model: nn.Module, strategy: Strategy, dataset, global_state: State, client: Client | None,
                   opts: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """Validation scores of the global model (client None) or of `client`'s model on `dataset`, per
    part of the site the task scores separately (`evaluate_parts`: "" for the whole site)."""
    model.load_state_dict(strategy.eval_state(global_state, client))
    model.eval()
    predict = autocast_forward(lambda inputs: strategy.forward(model, inputs, client), opts, device)
    parts = evaluate_parts(strategy.task, dataset, predict, opts.bs, opts.num_workers, device)
    return {part: scores["model"] for part, scores in parts.items()}


def baseline_scores(strategy: Strategy, dataset, opts: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """The task's model-free baseline on `dataset`, per part as `evaluate_model`."""
    parts = evaluate_parts(strategy.task, dataset, None, opts.bs, opts.num_workers, device)
    return {part: scores["baseline"] for part, scores in parts.items()}


def global_latents(model: nn.Module, strategy: Strategy, global_state: State, dataset,
                   device: torch.device) -> torch.Tensor:
    """(N, 4C) pooled latents of the global model on the first GAP_SLICES slices of `dataset`."""
    model.load_state_dict(global_state)
    return pooled_latents(strategy.task, model, dataset, device, GAP_SLICES)


# ---- in this process ---------------------------------------------------------------------------
class InProcess:
    """Every client's work done here, one client after another, on the clients' own objects."""

    def __init__(self, exp: Experiment, model: nn.Module, strategy: Strategy, eval_sets: dict,
                 opts: argparse.Namespace, device: torch.device, log):
        self.exp, self.model, self.strategy, self.eval_sets = exp, model, strategy, eval_sets
        self.opts, self.device, self.log = opts, device, log
        self.train_sets: dict = {}  # site -> its training slices, for `site_contexts`

    def site_contexts(self, rnd: int, global_state: State, seeds: dict[str, int]) -> dict[str, State]:
        out = {}
        for site, seed in seeds.items():
            if site not in self.train_sets:
                self.train_sets[site] = site_train_set(self.exp, site, self.opts)
            out[site] = self.strategy.site_context(rnd, self.model, global_state, self.train_sets[site], seed)
        return out

    def train(self, rnd: int, global_state: State, clients: list[Client],
              payload: State) -> list[ClientUpdate | LeftOut]:
        strategy = self.strategy
        start_round(strategy, rnd, self.model, global_state, clients, payload)
        out: list[ClientUpdate | LeftOut] = []
        for client in tqdm(clients, desc=f"round {rnd}", leave=False, disable=self.log.quiet_bars, unit="client"):
            before = copy.deepcopy(strategy.client_state(client))
            start = time.perf_counter()
            try:
                result = local_update(client, self.model, strategy, global_state, self.opts, self.device, rnd=rnd)
            except Exception as e:  # one site's failure must not end the run
                strategy.load_client_state(client, before)
                out.append(LeftOut(client, failure_reason(e)))
                continue
            keep_local(client, strategy, result)
            out.append(ClientUpdate(client, shared_entries(strategy, result.state), result.loss, result.logs,
                                    time.perf_counter() - start))
        return out

    def evaluate(self, global_state: State, plan: list[PlanEntry], latent_sites: list[str]) -> Evaluation:
        result = Evaluation([], [])
        for _, client, site in plan:
            start = time.perf_counter()
            result.scores.append(evaluate_model(self.model, self.strategy, self.eval_sets[site], global_state,
                                                client, self.opts, self.device))
            result.seconds.append(time.perf_counter() - start)
        for site in latent_sites:
            result.latents[site] = global_latents(self.model, self.strategy, global_state, self.eval_sets[site],
                                                  self.device)
        return result

    def baseline(self, sites: list[str]) -> dict[str, dict]:
        return {site: baseline_scores(self.strategy, self.eval_sets[site], self.opts, self.device) for site in sites}

    def client_states(self) -> dict:
        return {c.name: client_checkpoint(c, self.strategy) for c in self.exp.clients}

    def load_client_states(self, saved: dict, path) -> None:
        names = {c.name for c in self.exp.clients}
        if set(saved) != names:
            raise UserError(f"{path}: its clients {sorted(saved)} are not this run's {sorted(names)}")
        for c in self.exp.clients:
            restore_client(c, self.strategy, saved[c.name])
