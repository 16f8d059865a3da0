"""The federated round loop. `run_study` repeats rounds, evaluates, checkpoints and resumes; one
round, top to bottom, is `run_round`. Clients are reached through an `Exchange`: in this process
(`train`) or over Flower (`federated/flower/server_app.py`); everything else is the same code."""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from federated import distributed, dpsgd
from federated.client import DPSGD_EPSILON, Client
from federated.domain_gap import mmd2
from federated.exchange import Exchange, InProcess, LeftOut
from federated.experiment import Experiment, build_experiment, eval_set
from federated.run_plan import describe_run, projection
from federated.strategies.base import State, Strategy
from utils.checkpoint import FORMAT, load_checkpoint, save_atomic
from utils.errors import UserError
from utils.report import final_table
from utils.runlog import RunDir
from utils.seeding import capture_rng, restore_rng, seed_everything



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


def run_round(rnd: int, strategy: Strategy, state: RunState, selected: list[Client], exchange: Exchange,
              opts: argparse.Namespace, log, exp: Experiment) -> list[dict]:
    """The strategy's start-of-round work at the sites that do some (their data stays there), the
    round's payload, the selected clients' local updates (all through `exchange`), then
    aggregation. Returns the round's training rows."""
    contexts = exchange.site_contexts(rnd, state.global_state, strategy.context_sites(rnd, exp))
    payload = strategy.round_payload(rnd, contexts)
    updates, rows = [], []
    for outcome in exchange.train(rnd, state.global_state, selected, payload):
        client = outcome.client
        if isinstance(outcome, LeftOut):
            log.warn(f"round {rnd}: client {client.name} (site {client.site}) left out of this round: {outcome.reason}")
            continue
        updates.append(outcome)
        logs = dict(outcome.logs)
        epsilon = logs.pop(DPSGD_EPSILON, None)
        rows.append({"round": rnd, "model": client.name, "site": client.site, "split": "train",
                     "loss": outcome.loss, "seconds": outcome.seconds, **logs})
        if epsilon is not None:
            rows.append(dpsgd.epsilon_row(rnd, client.name, client.site, epsilon, opts.dp_delta))
        log.verbose(f"round {rnd}: client {client.name} loss {outcome.loss:.4f} "
                    + " ".join(f"{k} {v:.4f}" for k, v in outcome.logs.items()))
    if len(updates) < max(opts.min_clients, 1):
        raise RunStopped(f"round {rnd}: only {len(updates)} of {len(selected)} clients finished, fewer than "
                         f"--min_clients {opts.min_clients}; the warnings above say why")
    weights = strategy.client_weights([u.client for u in updates])
    state.global_state = strategy.aggregate(state.global_state, [u.state for u in updates], weights)
    return rows


def evaluate_round(rnd: int, strategy: Strategy, exp: Experiment, state: RunState, exchange: Exchange,
                   log) -> list[dict]:
    """The global model (or each client's personalised model) on the validation split of the test
    site and of every training site."""
    plan = evaluation_plan(strategy, exp)
    sources = [s for s in exp.train_sites if s != exp.test_site]
    gap = not strategy.personalized and exp.task.has_latent
    latent_sites = sources + [exp.test_site] if sources and gap else []
    result = exchange.evaluate(state.global_state, plan, latent_sites)
    rows = []
    for (label, _, site), scores, seconds in zip(plan, result.scores, result.seconds):
        if scores is None:
            log.warn(f"round {rnd}: no validation scores for model {label} on site {site}")
            continue
        for part, part_scores in scores.items():
            rows.append({"round": rnd, "model": label, "site": site, "split": "val", **part_column(part),
                         **part_scores, "seconds": seconds})
    if gap:
        rows.append(domain_gap_row(rnd, exp, sources, result.latents))
    return rows


def domain_gap_row(rnd: int, exp: Experiment, sources: list[str], latents: dict[str, torch.Tensor]) -> dict:
    """MMD^2 between the global model's pooled latents on the source sites and on the target site
    (validation slices): the figure FL-MRCM is meant to shrink, logged for every shared-model method."""
    row = {"round": rnd, "model": "global", "site": exp.test_site, "split": "val"}
    if not sources or any(s not in latents for s in sources + [exp.test_site]):
        return {**row, "domain_gap": float("nan")}
    source = torch.cat([latents[s] for s in sources])
    return {**row, "domain_gap": mmd2(source, latents[exp.test_site])}


def evaluation_plan(strategy: Strategy, exp: Experiment) -> list[tuple[str, Client | None, str]]:
    """(model label, client whose model it is or None for the global one, site) to evaluate.

    Personalised methods: each client's model on its own site, and on every evaluated site where no
    client trains (the test site, `--val_dataset` sites): every client's model is evaluated there;
    no rule picks one for the user.
    """
    if not strategy.personalized:
        return [("global", None, site) for site in exp.eval_sites]
    plan = [(c.name, c, c.site) for c in exp.clients]
    trained = {c.site for c in exp.clients}
    plan += [(c.name, c, site) for site in exp.eval_sites if site not in trained for c in exp.clients]
    return plan


def test_site_score(rows: list[dict], test_site: str) -> float:
    """Mean validation SSIM on the test site over the evaluated models: what 'best' means."""
    vals = [r["ssim"] for r in rows if r["site"] == test_site and "ssim" in r]
    return sum(vals) / len(vals) if vals else float("-inf")


def checkpoint(state: RunState, strategy: Strategy, exchange: Exchange, opts: argparse.Namespace) -> dict:
    return {
        "format": FORMAT,
        "round": state.round,
        "options": vars(opts),
        "model": state.global_state,
        "clients": exchange.client_states(),
        "strategy": strategy.state_dict(),
        "rng": capture_rng(),
        "metrics": state.metrics,
        "best": {"score": state.best_score, "round": state.best_round},
        "server_generator": state.server_generator.get_state(),
        "privacy": strategy.privacy.state_dict() if strategy.privacy is not None else None,
    }


def restore(ckpt: dict, state: RunState, strategy: Strategy, exchange: Exchange, path: Path) -> None:
    exchange.load_client_states(ckpt["clients"], path)
    state.round = ckpt["round"]
    state.global_state = ckpt["model"]
    state.metrics = ckpt["metrics"]
    state.best_score, state.best_round = ckpt["best"]["score"], ckpt["best"]["round"]
    state.server_generator.set_state(ckpt["server_generator"])
    strategy.load_state_dict(ckpt["strategy"])
    if strategy.privacy is not None:
        strategy.privacy.load_state_dict(ckpt["privacy"])
    restore_rng(ckpt["rng"])


def train(opts: argparse.Namespace, strategy: Strategy, log) -> RunState:
    """The whole run in this process: every client's data and update here (under torchrun, every
    process runs it and shares each step's work: `federated/distributed.py`)."""
    group = distributed.current()
    error = None
    try:
        device = distributed.device_for(group, resolve_device(opts.device))
        run = RunDir(Path(opts.save_dir), vars(opts), resume=bool(opts.continues), overwrite=opts.overwrite,
                     writer=group.writer)
        seed_everything(opts.seed)
        exp = build_experiment(opts, strategy)
        log.info("clients: " + ", ".join(f"{c.name} ({c.num_slices} slices)" for c in exp.clients)
                 + f"; target site {exp.test_site}; device {device}"
                 + (f"; {group.world} processes" if group.active else ""))
        eval_sets = {site: eval_set(exp, site, "val", opts) for site in exp.eval_sites}
        for note in exp.task.notes():
            log.info(note)

        model = strategy.build_model(exp.train_sites)
        if opts.pretrained:
            exp.task.load_pretrained(model, Path(opts.pretrained))
        model.to(device)
        strategy.prepare(exp, model, device)
        for c in exp.clients:
            strategy.init_client(c, model)
        distributed.check_fits(group, opts, exp.clients, eval_sets, [model])
    except Exception as e:
        error = e
    # Under torchrun: a setup error on any process ends every process here, before the first step.
    group.agree(error)
    group.broadcast_state(model)
    exchange = InProcess(exp, model, strategy, eval_sets, opts, device, log)
    return run_study(run, exp, model, strategy, exchange, opts, log)


def run_study(run: RunDir, exp: Experiment, model: nn.Module, strategy: Strategy, exchange: Exchange,
              opts: argparse.Namespace, log) -> RunState:
    """Rounds from the first not yet done to --epochs: select, train, aggregate, evaluate, checkpoint.

    `model` holds the initial weights; `exp.clients` are the clients to draw from.
    """
    log.info(describe_run(opts, model, len(exp.clients)))
    state = RunState(global_state={k: v.detach().clone() for k, v in model.state_dict().items()},
                     server_generator=torch.Generator().manual_seed(opts.seed))
    if run.resume:
        ckpt = load_checkpoint(run.last, map_location=next(model.parameters()).device)
        restore(ckpt, state, strategy, exchange, run.last)
        log.info(f"continuing {run.path} after round {state.round}")
    if state.round == 0:
        # Before anything is written: a bad validation file ends the run with nothing half-made.
        state.metrics += baseline_rows(exp, exchange)
    run.create()
    run.write_metrics(state.metrics)

    rounds = range(state.round + 1, opts.epochs + 1)
    for rnd in tqdm(rounds, desc="rounds", disable=log.quiet_bars, unit="round"):
        start = time.perf_counter()
        selected = select_clients(exp.clients, opts.frac, state.server_generator)
        if strategy.privacy is not None and (why := strategy.privacy.stop_reason(len(selected), len(exp.clients))):
            raise RunStopped(f"round {rnd}: {why}")
        if why := dpsgd.stop_reason(selected, state.metrics, opts):
            raise RunStopped(f"round {rnd}: {why}")
        rows = run_round(rnd, strategy, state, selected, exchange, opts, log, exp)
        if strategy.privacy is not None:
            rows.append(strategy.privacy.spend(rnd, len(selected), len(exp.clients)))
        rows += strategy.end_round(rnd, model, state.global_state, exp.clients)
        if rnd % opts.eval_every == 0 or rnd == opts.epochs:
            val_rows = evaluate_round(rnd, strategy, exp, state, exchange, log)
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
        if run.writer:
            ckpt = checkpoint(state, strategy, exchange, opts)
            save_atomic(ckpt, run.last)
            if improved:
                save_atomic(ckpt, run.best)
        run.write_metrics(state.metrics)
        if rnd == rounds.start and rnd < opts.epochs:
            log.info(projection(rnd, opts.epochs, time.perf_counter() - start, rnd % opts.eval_every == 0,
                                opts.eval_every))
    log.table(final_table(state.metrics, exp.eval_sites, strategy.name, exp.task.baseline_name)
              + (f"\n{strategy.privacy.summary()}" if strategy.privacy is not None else "")
              + (f"\n{dpsgd.summary(state.metrics, opts)}" if dpsgd.enabled(opts) else ""))
    return state


def baseline_rows(exp: Experiment, exchange: Exchange) -> list[dict]:
    """Round 0: the task's model-free baseline (zero-filled for reconstruction) on every site."""
    scores = exchange.baseline(exp.eval_sites)
    return [{"round": 0, "model": exp.task.baseline_name, "site": site, "split": "val", **part_column(part),
             **part_scores} for site in exp.eval_sites for part, part_scores in scores[site].items()]


def part_column(part: str) -> dict[str, str]:
    """The `task` column of a metrics row scored on one part of a site (synthesis: a translation)."""
    return {"task": part} if part else {}
