"""The federated round loop. One round, top to bottom, is `run_round`; `train` repeats it, evaluates,
checkpoints and resumes."""
from __future__ import annotations

import argparse
import copy
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from federated.client import Client, ClientFailure, local_update
from federated.domain_gap import mmd2, pooled_latents
from federated.evaluation import evaluate
from federated.experiment import Experiment, build_experiment, eval_set
from federated.precision import autocast_forward
from federated.run_plan import describe_run, projection
from federated.strategies.base import State, Strategy
from utils.checkpoint import FORMAT, load_checkpoint, save_atomic
from utils.errors import UserError
from utils.report import final_table
from utils.runlog import RunDir
from utils.seeding import capture_rng, restore_rng, seed_everything


GAP_SLICES = 64  # validation slices per site for the latent domain gap


class RunStopped(Exception):
    """The run cannot go on (too few clients finished a round); the last checkpoint is intact."""


@dataclass
class RunState:
    """What a checkpoint holds besides the clients."""
    round: int = 0
    global_state: State = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    best_score: float = float("-inf")
    best_round: int = 0
    server_generator: torch.Generator = field(default_factory=torch.Generator)  # draws clients per round


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return torch.device(name)


def select_clients(clients: list[Client], frac: float, generator: torch.Generator) -> list[Client]:
    """max(1, round(frac * n)) clients drawn without replacement, kept in their fixed order."""
    if frac >= 1.0:
        return list(clients)
    m = max(1, round(frac * len(clients)))
    chosen = torch.randperm(len(clients), generator=generator)[:m].sort().values.tolist()
    return [clients[i] for i in chosen]


def run_round(rnd: int, model: nn.Module, strategy: Strategy, state: RunState, selected: list[Client],
              opts: argparse.Namespace, device: torch.device, log) -> list[dict]:
    """Local updates on the selected clients, then aggregation. Returns the round's training rows."""
    strategy.begin_round(rnd, model, state.global_state, selected)
    results, finished, rows = [], [], []
    for client in tqdm(selected, desc=f"round {rnd}", leave=False, disable=log.quiet_bars, unit="client"):
        before = copy.deepcopy(strategy.client_state(client))
        start = time.perf_counter()
        try:
            result = local_update(client, model, strategy, state.global_state, opts, device, rnd=rnd)
        except Exception as e:  # one site's failure must not end the run
            strategy.load_client_state(client, before)
            log.warn(f"round {rnd}: client {client.name} (site {client.site}) left out of this round: "
                     f"{type(e).__name__ + ': ' if not isinstance(e, ClientFailure) else ''}{e}")
            continue
        client.optimizer_state, client.scheduler_state = result.optimizer_state, result.scheduler_state
        client.local_weights = {k: v for k, v in result.state.items() if not strategy.is_shared(k)}
        results.append(result)
        finished.append(client)
        rows.append({"round": rnd, "model": client.name, "site": client.site, "split": "train",
                     "loss": result.loss, "seconds": time.perf_counter() - start, **result.logs})
        log.verbose(f"round {rnd}: client {client.name} loss {result.loss:.4f} "
                    + " ".join(f"{k} {v:.4f}" for k, v in result.logs.items()))
    if len(finished) < max(opts.min_clients, 1):
        raise RunStopped(f"round {rnd}: only {len(finished)} of {len(selected)} clients finished, fewer than "
                         f"--min_clients {opts.min_clients}; the warnings above say why")
    weights = strategy.client_weights(finished)
    state.global_state = strategy.aggregate(state.global_state, [r.state for r in results], weights)
    return rows


def evaluate_round(rnd: int, model: nn.Module, strategy: Strategy, exp: Experiment, state: RunState,
                   eval_sets: dict, opts: argparse.Namespace, device: torch.device) -> list[dict]:
    """The global model (or each client's personalised model) on the validation split of the test
    site and of every training site."""
    rows = []
    for label, client, site in evaluation_plan(strategy, exp):
        start = time.perf_counter()
        model.load_state_dict(strategy.eval_state(state.global_state, client))
        model.eval()
        predict = autocast_forward(lambda inputs: strategy.forward(model, inputs, client), opts, device)
        scores = evaluate(exp.task, eval_sets[site], predict, opts.bs, opts.num_workers, device)["model"]
        rows.append({"round": rnd, "model": label, "site": site, "split": "val", **scores,
                     "seconds": time.perf_counter() - start})
    if not strategy.personalized and exp.task.has_latent:
        rows.append(domain_gap_row(rnd, model, exp, state, eval_sets, device))
    return rows


def domain_gap_row(rnd: int, model: nn.Module, exp: Experiment, state: RunState, eval_sets: dict,
                   device: torch.device) -> dict:
    """MMD^2 between the global model's pooled latents on the source sites and on the target site
    (validation slices): the figure FL-MRCM is meant to shrink, logged for every shared-model method."""
    model.load_state_dict(state.global_state)
    sources = [s for s in exp.train_sites if s != exp.test_site]
    if not sources:
        return {"round": rnd, "model": "global", "site": exp.test_site, "split": "val", "domain_gap": float("nan")}
    source = torch.cat([pooled_latents(exp.task, model, eval_sets[s], device, GAP_SLICES) for s in sources])
    target = pooled_latents(exp.task, model, eval_sets[exp.test_site], device, GAP_SLICES)
    return {"round": rnd, "model": "global", "site": exp.test_site, "split": "val",
            "domain_gap": mmd2(source, target)}


def evaluation_plan(strategy: Strategy, exp: Experiment) -> list[tuple[str, Client | None, str]]:
    """(model label, client whose model it is or None for the global one, site) to evaluate.

    Personalised methods: each client's model on its own site, and on the test site when no client
    trains there (every client's model is evaluated there; no rule picks one for the user).
    """
    if not strategy.personalized:
        return [("global", None, site) for site in exp.eval_sites]
    plan = [(c.name, c, c.site) for c in exp.clients]
    if exp.test_site not in {c.site for c in exp.clients}:
        plan += [(c.name, c, exp.test_site) for c in exp.clients]
    return plan


def test_site_score(rows: list[dict], test_site: str) -> float:
    """Mean validation SSIM on the test site over the evaluated models: what 'best' means."""
    vals = [r["ssim"] for r in rows if r["site"] == test_site and "ssim" in r]
    return sum(vals) / len(vals) if vals else float("-inf")


def checkpoint(state: RunState, strategy: Strategy, clients: list[Client], opts: argparse.Namespace) -> dict:
    return {
        "format": FORMAT,
        "round": state.round,
        "options": vars(opts),
        "model": state.global_state,
        "clients": {c.name: {"local_weights": c.local_weights, "optimizer": c.optimizer_state,
                             "scheduler": c.scheduler_state, "generator": c.generator.get_state(),
                             "extra": strategy.client_state(c)} for c in clients},
        "strategy": strategy.state_dict(),
        "rng": capture_rng(),
        "metrics": state.metrics,
        "best": {"score": state.best_score, "round": state.best_round},
        "server_generator": state.server_generator.get_state(),
        "privacy": strategy.privacy.state_dict() if strategy.privacy is not None else None,
    }


def restore(ckpt: dict, state: RunState, strategy: Strategy, clients: list[Client], path: Path) -> None:
    names = {c.name for c in clients}
    if set(ckpt["clients"]) != names:
        raise UserError(f"{path}: its clients {sorted(ckpt['clients'])} are not this run's {sorted(names)}")
    state.round = ckpt["round"]
    state.global_state = ckpt["model"]
    state.metrics = ckpt["metrics"]
    state.best_score, state.best_round = ckpt["best"]["score"], ckpt["best"]["round"]
    state.server_generator.set_state(ckpt["server_generator"])
    for c in clients:
        saved = ckpt["clients"][c.name]
        c.local_weights = saved["local_weights"]
        c.optimizer_state, c.scheduler_state = saved["optimizer"], saved["scheduler"]
        c.generator.set_state(saved["generator"])
        strategy.load_client_state(c, saved["extra"])
    strategy.load_state_dict(ckpt["strategy"])
    if strategy.privacy is not None:
        strategy.privacy.load_state_dict(ckpt["privacy"])
    restore_rng(ckpt["rng"])


def train(opts: argparse.Namespace, strategy: Strategy, log) -> RunState:
    device = resolve_device(opts.device)
    resume = bool(opts.continues)
    run = RunDir(Path(opts.save_dir), vars(opts), resume=resume, overwrite=opts.overwrite)
    seed_everything(opts.seed)
    exp = build_experiment(opts, strategy)
    log.info(f"clients: " + ", ".join(f"{c.name} ({c.num_slices} slices)" for c in exp.clients)
             + f"; target site {exp.test_site}; device {device}")
    eval_sets = {site: eval_set(exp, site, "val", opts) for site in exp.eval_sites}

    model = strategy.build_model(exp.clients)
    if opts.pretrained:
        exp.task.load_pretrained(model, Path(opts.pretrained))
    model.to(device)
    strategy.prepare(exp, model, device)
    for c in exp.clients:
        strategy.init_client(c, model)
    log.info(describe_run(opts, model, len(exp.clients)))
    state = RunState(global_state={k: v.detach().clone() for k, v in model.state_dict().items()},
                     server_generator=torch.Generator().manual_seed(opts.seed))

    if resume:
        ckpt = load_checkpoint(run.last, map_location=device)
        restore(ckpt, state, strategy, exp.clients, run.last)
        log.info(f"continuing {run.path} after round {state.round}")
    if state.round == 0:
        # Before anything is written: a bad validation file ends the run with nothing half-made.
        state.metrics += baseline_rows(exp, eval_sets, opts, device)
    run.create()
    run.write_metrics(state.metrics)

    rounds = range(state.round + 1, opts.epochs + 1)
    for rnd in tqdm(rounds, desc="rounds", disable=log.quiet_bars, unit="round"):
        start = time.perf_counter()
        selected = select_clients(exp.clients, opts.frac, state.server_generator)
        if strategy.privacy is not None and (why := strategy.privacy.stop_reason(len(selected), len(exp.clients))):
            raise RunStopped(f"round {rnd}: {why}")
        rows = run_round(rnd, model, strategy, state, selected, opts, device, log)
        if strategy.privacy is not None:
            rows.append(strategy.privacy.spend(rnd, len(selected), len(exp.clients)))
        rows += strategy.end_round(rnd, model, state.global_state, exp.clients)
        if rnd % opts.eval_every == 0 or rnd == opts.epochs:
            val_rows = evaluate_round(rnd, model, strategy, exp, state, eval_sets, opts, device)
            rows += val_rows
            score = test_site_score(val_rows, exp.test_site)
            improved = score > state.best_score
            if improved:
                state.best_score, state.best_round = score, rnd
        else:
            improved = False
        for r in rows:
            r.setdefault("seconds", time.perf_counter() - start)
        state.round = rnd
        state.metrics += rows
        ckpt = checkpoint(state, strategy, exp.clients, opts)
        save_atomic(ckpt, run.last)
        if improved:
            save_atomic(ckpt, run.best)
        run.write_metrics(state.metrics)
        if rnd == rounds.start and rnd < opts.epochs:
            log.info(projection(rnd, opts.epochs, time.perf_counter() - start, rnd % opts.eval_every == 0,
                                opts.eval_every))
    log.table(final_table(state.metrics, exp.eval_sites, strategy.name)
              + (f"\n{strategy.privacy.summary()}" if strategy.privacy is not None else ""))
    return state


def baseline_rows(exp: Experiment, eval_sets: dict, opts: argparse.Namespace, device: torch.device) -> list[dict]:
    """Round 0: the task's model-free baseline (zero-filled for reconstruction) on every site."""
    rows = []
    for site in exp.eval_sites:
        scores = evaluate(exp.task, eval_sets[site], None, opts.bs, opts.num_workers, device)["baseline"]
        rows.append({"round": 0, "model": exp.task.baseline_name, "site": site, "split": "val", **scores})
    return rows
