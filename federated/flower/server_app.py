"""The ServerApp: the project's round loop (`federated.server.run_study`) with its clients on Flower
SuperNodes, one per site.

`flwr run . <connection> -c 'argv="--train_dataset BFHI --test_dataset H ..."'` starts it; `argv`
takes the flags of main_fl_mr.py plus those of `federated/flower/options.py`. The server holds no
images: every node trains its site's clients and evaluates on its site's validation split, and the
server checks every reply before it is aggregated.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import uuid
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from data.sites import parse_site_list
from federated.cli import resolve_options, resume_command
from federated.client import Client
from federated.exchange import ClientUpdate, Evaluation, LeftOut, PlanEntry, shared_entries
from federated.experiment import Experiment
from federated.flower.messages import (ARRAYS, CLIENTS_QUERY, CONFIG, CONTEXT, CONTEXT_QUERY, EVALUATE, METRICS,
                                       SITE_QUERY, TRAIN, check_context_reply, check_train_reply, context_content,
                                       from_arrays, reply_logs, study_config, to_arrays, train_content)
from federated.flower import secagg
from federated.flower.options import check_flower_support, check_secagg_sites, check_waits, parse_flower_options
from federated.server import RunStopped, run_study
from federated.strategies import STRATEGIES
from federated.strategies.base import State, Strategy
from utils.console import Console
from utils.errors import UserError
from utils.runlog import RunDir
from utils.seeding import seed_everything

PROG = "federated.flower"
POLL_SECONDS = 2.0

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    code = serve(grid, shlex.split(str(context.run_config.get("argv", ""))))
    if code:
        raise SystemExit(code)


def serve(grid: Grid, argv: list[str]) -> int:
    """The whole study; returns the exit code main_fl_mr.py would (0, 1 stopped, 2 user error)."""
    opts, flower = parse_flower_options(argv, PROG)
    log = Console(quiet=opts.quiet, verbose=opts.verbose)
    try:
        check_waits(flower)
        opts = resolve_options(opts, argv, log)
        strategy = STRATEGIES[opts.strategy](opts)
        check_flower_support(opts, strategy)
        run = RunDir(Path(opts.save_dir), vars(opts), resume=bool(opts.continues), overwrite=opts.overwrite)
        seed_everything(opts.seed)
        exchange = FlowerExchange(grid, strategy, opts, flower, log)
        exp = exchange.connect()
        log.info("clients: " + ", ".join(f"{c.name} ({c.num_slices} slices)" for c in exp.clients)
                 + f"; target site {exp.test_site}; {len(exchange.sites)} SuperNodes")
        model = strategy.build_model(exp.train_sites)
        if opts.pretrained:
            exp.task.load_pretrained(model, Path(opts.pretrained))
        run_study(run, exp, model, strategy, exchange, opts, log)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except RunStopped as e:
        print(f"{PROG}: stopped: {e}. The last complete round is in {opts.save_dir}/last.pt; continue "
              f"with: {resume_command('-m federated.flower local', opts.save_dir)}", file=sys.stderr, flush=True)
        return 1
    return 0


class FlowerExchange:
    """The round loop's clients on Flower SuperNodes reached through `grid`; every node says which
    site it holds (its --node-config), and a site's clients live on its node."""

    def __init__(self, grid: Grid, strategy: Strategy, opts: argparse.Namespace, flower: argparse.Namespace,
                 log: Console):
        self.grid, self.strategy, self.opts, self.flower, self.log = grid, strategy, opts, flower, log
        self.sites: dict[int, str] = {}  # node id -> site, in the order the nodes were first seen
        self.study_id = uuid.uuid4().hex
        self.study: dict = {}
        self.exp: Experiment | None = None
        self.round = 0

    # ---- nodes ---------------------------------------------------------------------------------
    def _send(self, outgoing: list[tuple[object, Message]], timeout: float) -> dict[object, Message | None]:
        """Send every message; the reply to each (None: none within `timeout` seconds)."""
        if not outgoing:
            return {}
        replies = self.grid.send_and_receive([m for _, m in outgoing], timeout=timeout)
        by_id = {r.metadata.reply_to_message_id: r for r in replies}
        return {key: by_id.get(m.metadata.message_id) for key, m in outgoing}

    def _refresh(self) -> None:
        """Learn the site of every node that connected since the last look; forget the gone ones."""
        online = set(self.grid.get_node_ids())
        for gone in set(self.sites) - online:
            del self.sites[gone]
        asks = [(nid, Message(RecordDict(), dst_node_id=nid, message_type=SITE_QUERY))
                for nid in sorted(online - set(self.sites))]
        for nid, reply in self._send(asks, self.flower.reply_timeout).items():
            if reply is None or reply.has_error():
                self.log.warn(f"SuperNode {nid} did not say which site it holds: "
                              f"{reply.error.reason if reply is not None else 'no reply'}")
            else:
                self.sites[nid] = str(reply.content.config_records[CONFIG]["site"])

    def node_of(self, site: str) -> int | None:
        """The node of `site`; the newest when a restarted node's old id is not yet gone."""
        nodes = [nid for nid, s in self.sites.items() if s == site]
        return nodes[-1] if nodes else None

    def connect(self) -> Experiment:
        """Wait (--node_wait) for a node per training and target site, then learn their clients."""
        o, deadline = self.opts, time.monotonic() + self.flower.node_wait
        while True:
            self._refresh()
            known = {s: None for s in self.sites.values()}
            try:
                train_sites = parse_site_list(o.train_dataset, known, "--train_dataset")
                test_sites = parse_site_list(o.test_dataset, known, "--test_dataset")
                break
            except UserError as e:
                if time.monotonic() >= deadline:
                    raise UserError(f"{e}; no SuperNode holds it after --node_wait {self.flower.node_wait:g} s "
                                    f"(connected sites: {', '.join(sorted(known)) or 'none'})") from None
                time.sleep(POLL_SECONDS)
        if len(test_sites) != 1:
            raise UserError(f"--test_dataset {o.test_dataset}: name exactly one target site")
        test_site = test_sites[0]
        check_secagg_sites(o, train_sites)
        if self.strategy.personalized and test_site not in train_sites:
            raise UserError(f"--strategy {o.strategy} on Flower: each client's model is evaluated on its own "
                            f"node's data, so --test_dataset must be one of the training sites {train_sites}")
        self.study = study_config(o, self.study_id, train_sites, test_site)
        asks = [(s, Message(RecordDict({CONFIG: ConfigRecord(self.study)}), dst_node_id=self.node_of(s),
                            message_type=CLIENTS_QUERY)) for s in train_sites]
        clients = []
        for s, reply in self._send(asks, self.flower.reply_timeout).items():
            if reply is None or reply.has_error():
                raise UserError(f"site {s} cannot take part: "
                                f"{reply.error.reason if reply is not None else 'its SuperNode did not answer'}")
            c = reply.content.config_records[CONFIG]
            clients += [Client(name=str(n), site=s, dataset=None, num_slices=int(k), generator=torch.Generator())
                        for n, k in zip(c["clients"], c["num_slices"])]
        eval_sites = [test_site] + [s for s in train_sites if s != test_site]
        self.exp = Experiment(self.strategy.task, {}, clients, train_sites, test_site, eval_sites, None)
        return self.exp

    # ---- the round -------------------------------------------------------------------------------
    def site_contexts(self, rnd: int, global_state: State, seeds: dict[str, int]) -> dict[str, State]:
        """Each site's start-of-round work, on its own node: the server sends the global weights and
        the seed and receives only the tensors `Strategy.site_context` returns."""
        if not seeds:
            return {}
        self._refresh()
        outgoing = []
        for site, seed in seeds.items():
            nid = self.node_of(site)
            if nid is None:
                raise RunStopped(f"round {rnd}: no SuperNode of site {site} is connected, and the round needs "
                                 f"its start-of-round work ({self.strategy.name})")
            outgoing.append((site, Message(context_content(global_state, self.study, rnd, seed), dst_node_id=nid,
                                           message_type=CONTEXT_QUERY, group_id=str(rnd))))
        out = {}
        for site, reply in self._send(outgoing, self.flower.reply_timeout).items():
            if reply is None:
                problem = f"no reply within --reply_timeout {self.flower.reply_timeout:g} s"
            elif reply.has_error():
                problem = reply.error.reason or f"error {reply.error.code}"
            else:
                problem = check_context_reply(reply.content)
            if problem:
                raise RunStopped(f"round {rnd}: site {site}'s start-of-round work failed: {problem}")
            out[site] = from_arrays(reply.content.array_records[CONTEXT])
        return out

    def train(self, rnd: int, global_state: State, clients: list[Client],
              payload: State) -> list[ClientUpdate | LeftOut]:
        """Each client's update; under --secagg every ClientUpdate holds the round's securely
        aggregated weighted mean instead (`_secure_round`)."""
        self.round = rnd
        self._refresh()
        outcome: dict[str, ClientUpdate | LeftOut] = {}
        outgoing = []
        for c in clients:
            nid = self.node_of(c.site)
            if nid is None:
                outcome[c.name] = LeftOut(c, f"no SuperNode of site {c.site} is connected")
                continue
            content = train_content(global_state, self.study, c.name, rnd, payload)
            outgoing.append((c.name, Message(content, dst_node_id=nid, message_type=TRAIN, group_id=str(rnd))))
        # Under --secagg a reply carries no weights: the node keeps its client's update.
        expected = {} if self.opts.secagg else shared_entries(self.strategy, global_state)
        by_name = {c.name: c for c in clients}
        for name, reply in self._send(outgoing, self.flower.reply_timeout).items():
            c = by_name[name]
            if reply is None:
                outcome[c.name] = LeftOut(c, f"no reply within --reply_timeout {self.flower.reply_timeout:g} s")
            elif reply.has_error():
                outcome[c.name] = LeftOut(c, reply.error.reason or f"error {reply.error.code}")
            elif problem := check_train_reply(reply.content, expected, c.num_slices):
                outcome[c.name] = LeftOut(c, f"its reply is refused: {problem}")
            else:
                metrics = reply.content.metric_records[METRICS]
                state = from_arrays(reply.content.array_records[ARRAYS])
                outcome[c.name] = ClientUpdate(c, state, float(metrics["loss"]), reply_logs(metrics),
                                               float(metrics["seconds"]))
        if self.opts.secagg:
            self._secure_round(rnd, global_state, outcome)
        return [outcome[c.name] for c in clients]

    def _secure_round(self, rnd: int, global_state: State, outcome: dict[str, ClientUpdate | LeftOut]) -> None:
        """The trained clients' weighted mean update by SecAgg+ over their nodes (`secagg.secure_mean`):
        each of their ClientUpdates gets global + mean as its state, the same tensors for all, so the
        strategy's weighted mean of them is that mean. A client whose node is not in the secure sum
        is left out. Shared integer entries keep their global value."""
        trained = [u.client for u in outcome.values() if isinstance(u, ClientUpdate)]
        weights = dict(zip((c.name for c in trained), self.strategy.client_weights(trained)))
        nodes: dict[int, tuple[str, dict[str, float]]] = {}
        for c in trained:
            nodes.setdefault(self.node_of(c.site), (c.site, {}))[1][c.name] = weights[c.name]
        if len(nodes) < 2:
            for c in trained:
                outcome[c.name] = LeftOut(c, "secure aggregation needs clients of at least two sites in a round; "
                                             f"only site {c.site}'s trained")
            return
        shared = shared_entries(self.strategy, global_state)
        keys = secagg.secure_keys(global_state, list(shared))
        o = self.opts
        settings = secagg.Settings(o.secagg_clip, o.secagg_quantization, o.secagg_threshold, self.flower.reply_timeout)
        result = secagg.secure_mean(self.grid, rnd, nodes, {k: global_state[k].shape for k in keys}, self.study_id,
                                    o.seed, settings)
        if result.mean is not None:
            state = {**shared,
                     **{k: (global_state[k].double() + result.mean[k].to(global_state[k].device)).to(global_state[k].dtype)
                        for k in keys}}
        for c in trained:
            nid = self.node_of(c.site)
            if nid in result.nodes:
                outcome[c.name].state = state
            else:
                problem = result.problems.get(nid, "its node is not in the secure sum")
                outcome[c.name] = LeftOut(c, f"secure aggregation: {problem}")

    def _evaluate_at(self, work: dict[str, dict], global_state: State | None) -> dict[str, dict | None]:
        """Send each site its evaluation work (config entries); each site's parsed result or None."""
        outgoing = []
        for site, config in work.items():
            nid = self.node_of(site)
            if nid is None:
                self.log.warn(f"site {site}: no SuperNode connected, not evaluated")
                continue
            records = {CONFIG: ConfigRecord({**self.study, "round": self.round, **config})}
            if global_state is not None:
                records[ARRAYS] = to_arrays(global_state)
            outgoing.append((site, Message(RecordDict(records), dst_node_id=nid, message_type=EVALUATE)))
        results = {site: None for site in work}
        for site, reply in self._send(outgoing, self.flower.reply_timeout).items():
            if reply is None or reply.has_error():
                self.log.warn(f"site {site}: evaluation failed: "
                              f"{reply.error.reason if reply is not None else 'no reply'}")
                continue
            result = json.loads(reply.content.config_records[CONFIG]["result"])
            if "latents" in reply.content.array_records:
                result["latents"] = from_arrays(reply.content.array_records["latents"])["latents"]
            results[site] = result
        return results

    def evaluate(self, global_state: State, plan: list[PlanEntry], latent_sites: list[str]) -> Evaluation:
        work: dict[str, dict] = {}
        for label, client, site in plan:
            w = work.setdefault(site, {"entries": [], "latents": False, "baseline": False})
            w["entries"].append([label, client.name if client is not None else ""])
        for site in latent_sites:
            work.setdefault(site, {"entries": [], "latents": False, "baseline": False})["latents"] = True
        results = self._evaluate_at({s: {**w, "entries": json.dumps(w["entries"])} for s, w in work.items()},
                                    global_state)
        out, taken = Evaluation([], []), {site: 0 for site in work}
        for _, _, site in plan:
            result, i = results[site], taken[site]
            taken[site] += 1
            out.scores.append(result["scores"][i] if result else None)
            out.seconds.append(result["seconds"][i] if result else 0.0)
        out.latents = {s: results[s]["latents"] for s in latent_sites if results[s] and "latents" in results[s]}
        return out

    def baseline(self, sites: list[str]) -> dict[str, dict]:
        results = self._evaluate_at({s: {"entries": "[]", "latents": False, "baseline": True} for s in sites}, None)
        missing = [s for s in sites if results[s] is None]
        if missing:
            raise UserError(f"site {', '.join(missing)}: no baseline validation scores (see the warnings above)")
        return {s: results[s]["baseline"] for s in sites}

    # ---- checkpoint --------------------------------------------------------------------------------
    def client_states(self) -> dict:
        """The clients' state is on their nodes, filed under this study's id."""
        return {"flower_study": self.study_id}

    def load_client_states(self, saved: dict, path) -> None:
        if set(saved) != {"flower_study"}:
            raise UserError(f"{path}: not the checkpoint of a Flower run; continue it with main_fl_mr.py --resume")
        self.study_id = saved["flower_study"]
        self.study["study"] = self.study_id
