"""The interface every federated method answers for the shared round loop (`federated/server.py`).

A method is one subclass in its own file plus one line in `federated/strategies/__init__.py`. The
server calls the hooks in this order each round:

    prepare, init_client (once) ->
    context_sites -> site_context (where each such site's data is) -> round_payload (server) ->
    load_round_payload -> begin_round -> for each selected client: [local_state -> training_loss
    per batch -> end_local] -> aggregate -> end_round -> evaluation through eval_state

What a round carries besides the global weights goes through two hook pairs, the same in this
process and on Flower (`federated/exchange.py`): `context_sites`/`site_context` (work a site does
with its own data at the start of a round; only what it returns leaves the site) and
`round_payload`/`load_round_payload` (what every selected client needs this round).

The base class is FedAvg: everything shared, weights uniform or by slices, the task's loss, one
global model evaluated everywhere. What is learned (model, sample, loss, optimiser) is the run's task
(`self.task`, `federated/tasks/`); a strategy hands batches to the task and never reads their fields.
"""
from __future__ import annotations

import argparse
import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from data.augment import schedule_length
from federated.aggregation import weighted_average
from federated.privacy import ClientLevelDP
from federated.tasks import task_for
from federated.tasks.base import Batch, Task

if TYPE_CHECKING:
    from federated.client import Client
    from federated.experiment import Experiment

State = dict[str, torch.Tensor]


def with_weight_term(loss: torch.Tensor, logs: dict, term: torch.Tensor | None,
                     term_logs: dict) -> tuple[torch.Tensor, dict]:
    """The data loss plus a method's weight term; with a term (or its logs), `recon_loss` logs the data part."""
    if term is None and not term_logs:
        return loss, logs
    return (loss if term is None else loss + term), {**logs, "recon_loss": loss.detach(), **term_logs}


class Strategy:
    name = "fedavg"
    summary = "FedAvg (FL-MR): every client trains locally, all weights are averaged"
    personalized = False  # True: each client keeps its own model, evaluated on its own data
    # Augmentation schedules (MRAugment's p(t)) step once per round, as every client follows the
    # global round; methods that exchange nothing step them once per local epoch, as MRAugment does.
    schedule_per_epoch = False
    # Why sample-level DP-SGD (--dpsgd_noise) would be wrong with this method (None: it is not). Opacus
    # clips the per-sample gradients it sees through the model's layers. A loss on the weights alone
    # goes in `weight_term` (added after the noise); anything else outside `data_loss` (a second
    # model trained on the data, a batch-wide input) would be dropped or leak: such methods refuse.
    dpsgd_refusal: str | None = None
    # Client-level DP (--dp_clip) needs a federation of updates to clip; None: this method has one.
    client_dp_refusal: str | None = None
    # Why secure aggregation (--secagg on Flower) would be wrong with this method (None: it is not).
    # The server then holds only the weighted mean of the clients' shared entries, never one
    # client's: a method whose server step needs anything else (each client's weights, per-client
    # server state) overrides `aggregate` and must refuse here.
    secagg_refusal: str | None = None

    def __init__(self, opts: argparse.Namespace):
        self.opts = opts

    @functools.cached_property
    def privacy(self) -> ClientLevelDP | None:
        """Client-level DP (--dp_clip/--dp_noise), which replaces the weighted mean in `aggregate`;
        None without it."""
        return ClientLevelDP.from_options(self.opts)

    @functools.cached_property
    def task(self) -> Task:
        """What is learned: the run's task (`--model`), made from the same options."""
        return task_for(self.opts)

    # ---- flags -------------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """Add this method's own flags to the shared parser."""

    # ---- model and partition of its weights --------------------------------------------------
    def build_model(self, sites: list[str]) -> nn.Module:
        """The model, for a study whose clients train on `sites` (the training sites, in the
        clients' order; personalised methods code them). The same everywhere: a Flower node knows
        the study's training sites, not the other sites' clients."""
        return self.task.build_model()

    def is_shared(self, key: str) -> bool:
        """Whether state_dict entry `key` is aggregated (True) or stays with each client (False)."""
        return True

    def arrange_clients(self, groups: list[list[Any]]) -> list[list[Any]]:
        """Group client data specs into clients; each inner list becomes one client (see `central`)."""
        return groups

    # ---- per-client state --------------------------------------------------------------------
    def prepare(self, exp: Experiment, model: nn.Module, device: torch.device) -> None:
        """Called once with the run's sites and clients, before `init_client` (e.g. to load data
        the method needs beyond the clients' own)."""

    def init_client(self, client: Client, model: nn.Module) -> None:
        """Create what this method keeps per client (in `client.extra`) before the first round;
        the base keeps what the task keeps."""
        self.task.init_client(client, model)

    def client_state(self, client: Client) -> dict:
        """What `init_client` created, as tensors and plain values, for the checkpoint."""
        return self.task.client_state(client)

    def load_client_state(self, client: Client, state: dict) -> None:
        """Restore what `client_state` returned."""
        self.task.load_client_state(client, state)

    def client_weights(self, clients: list[Client]) -> list[float]:
        """Aggregation weight of each client: equal (the paper) or its number of training slices."""
        if self.opts.weighting == "samples":
            return [float(c.num_slices) for c in clients]
        return [1.0] * len(clients)

    def local_state(self, client: Client, global_state: State) -> State:
        """The weights a client starts its local update from: the global weights, with its own
        local entries where it has them."""
        return {**global_state, **client.local_weights}

    def schedule_time(self, rnd: int, epoch: int) -> tuple[int, int]:
        """(t, T) of the augmentation schedule for local epoch `epoch` (0-based) of round `rnd`
        (1-based): t 0-based, T the planned total."""
        total = schedule_length(self.opts, self.schedule_per_epoch)
        if self.schedule_per_epoch:
            return (rnd - 1) * self.opts.local_ep + epoch, total
        return rnd - 1, total

    # ---- what travels each round besides the global weights -----------------------------------
    def context_sites(self, rnd: int, exp: Experiment) -> dict[str, int]:
        """Server side, once per round `rnd` before the clients train: the sites that do work with
        their own training data first (`site_context`), each with the seed it uses. Seeds are drawn
        here from the method's own generators, so `state_dict` checkpoints the draws. Default: none."""
        return {}

    def site_context(self, rnd: int, model: nn.Module, global_state: State, dataset, seed: int) -> State:
        """Where a site's data is (this process, or the site's Flower node): that site's work at the
        start of round `rnd` with the current global weights on `dataset`, its training slices
        (`federated.experiment.site_train_set`). Only the returned tensors leave the site."""
        return {}

    def round_payload(self, rnd: int, contexts: dict[str, State]) -> State:
        """Server side, before the clients train in round `rnd`: tensors every selected client needs
        this round besides the global weights (`contexts`: each context site's `site_context`)."""
        return {}

    def load_round_payload(self, payload: State) -> None:
        """Client side, before `begin_round`: take what `round_payload` returned (on the device of
        the model)."""

    def federation_refusal(self) -> str | None:
        """None when the method runs with each site's data on its own machine (Flower); otherwise
        one line for the user, naming the flag, on why not."""
        return None

    # ---- the round ---------------------------------------------------------------------------
    def begin_round(self, rnd: int, model: nn.Module, global_state: State, clients: list[Client]) -> None:
        """Called once before the clients train in round `rnd` (1-based)."""

    def training_loss(self, client: Client, model: nn.Module,
                      batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for one local step on `batch` (on the device): `data_loss` plus `weight_term`.

        Returns the loss to minimise and detached values to log (averaged over the client's steps).
        A method that overrides this with more than those two sets `dpsgd_refusal` (DP-SGD calls the
        two parts itself: `federated/client.py`).
        """
        loss, logs = self.data_loss(client, model, batch)
        return with_weight_term(loss, logs, *self.weight_term(client, model))

    def data_loss(self, client: Client, model: nn.Module,
                  batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The part of the loss that reads the batch: the task's loss of this method's forward pass."""
        return self.task.training_loss(client, model, batch, lambda inputs: self.forward(model, inputs, client))

    def weight_term(self, client: Client, model: nn.Module) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """A loss on the weights alone, reading no data (FedProx's proximal term, FedMRI's contrastive
        term), and its detached logs; (None, {}) without one.

        Under DP-SGD its gradient is added after the per-sample clipping and noise: it depends only on
        the current weights (outputs of earlier private steps) and on what the server released, so
        the step stays private (post-processing), and the method's objective is kept.
        """
        return None, {}

    def end_local(self, client: Client, model: nn.Module) -> None:
        """Called after a client's local update succeeded, with the model holding its new weights."""
        self.task.end_local(client)

    def aggregate(self, global_state: State, client_states: list[State], weights: list[float]) -> State:
        """New global weights from the clients' weights; entries that are not shared keep their old value."""
        shared = [k for k in global_state if self.is_shared(k)]
        if self.privacy is not None:
            return {**global_state, **self.privacy.aggregate(global_state, client_states, shared)}
        return {**global_state, **weighted_average(client_states, weights, shared)}

    def end_round(self, rnd: int, model: nn.Module, global_state: State, clients: list[Client]) -> list[dict]:
        """Called after aggregation; returns extra metric rows for metrics.csv (e.g. a domain gap)."""
        return []

    # ---- evaluation --------------------------------------------------------------------------
    def eval_state(self, global_state: State, client: Client | None) -> State:
        """Weights evaluated for `client` (None: a site no client trains on)."""
        if client is None:
            return global_state
        return {**global_state, **client.local_weights}

    def forward(self, model: nn.Module, inputs: tuple[torch.Tensor, ...], client: Client | None) -> torch.Tensor:
        """The task's prediction from `inputs` for `client` (personalised models take the site)."""
        return self.task.forward(model, inputs)

    # ---- checkpointing of method state -------------------------------------------------------
    def state_dict(self) -> dict:
        """Method-level state (not per client) needed to resume bit for bit."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
