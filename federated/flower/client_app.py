"""The ClientApp: what a site's SuperNode does with each message of the server.

Each handler builds the site's part of the study (`SiteNode`), does the work with the project's own
functions (`local_update` and the strategy's hooks, the per-volume evaluation) and replies. Any
failure becomes an error reply with one line saying why; the server leaves that client out.
"""
from __future__ import annotations

import functools
import json
import time

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from federated.client import local_update
from federated.exchange import (evaluate_model, failure_reason, global_latents, keep_local, shared_entries,
                                baseline_scores, start_round)
from federated.flower import secagg
from federated.flower.messages import (ARRAYS, CONFIG, CONTEXT, PAYLOAD, from_arrays, options_from_json,
                                       to_arrays, train_reply_content)
from federated.flower.site import SiteNode, node_site

CLIENT_ERROR = 1  # error code of a reply whose work failed; its reason says why

app = ClientApp()


def replies_errors(handler):
    """Turn any exception of `handler` into an error reply naming the site and the cause."""
    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as e:
            site = context.node_config.get("site", "?")
            return Message(Error(CLIENT_ERROR, f"site {site}: {failure_reason(e)}"), reply_to=msg)
    return wrapper


def study_of(msg: Message) -> dict:
    config = msg.content.config_records[CONFIG]
    return {"options": options_from_json(config["options"]), "study": config["study"],
            "train_sites": list(config["train_sites"]), "test_site": config["test_site"]}


@app.query("site")
@replies_errors
def site(msg: Message, context: Context) -> Message:
    return Message(RecordDict({CONFIG: ConfigRecord({"site": node_site(context.node_config)})}), reply_to=msg)


@app.query("clients")
@replies_errors
def clients(msg: Message, context: Context) -> Message:
    node = SiteNode(context.node_config, study_of(msg))
    return Message(RecordDict({CONFIG: ConfigRecord({"clients": [c.name for c in node.clients],
                                                     "num_slices": [c.num_slices for c in node.clients]})}),
                   reply_to=msg)


def arrays_on(msg: Message, key: str, device) -> dict:
    """The tensors of the message's `key` record on `device` (none when it has no such record)."""
    if key not in msg.content.array_records:
        return {}
    return {k: v.to(device) for k, v in from_arrays(msg.content.array_records[key]).items()}


@app.query("context")
@replies_errors
def start_of_round(msg: Message, context: Context) -> Message:
    """The site's start-of-round work with its own training data; only its result is sent back."""
    config = msg.content.config_records[CONFIG]
    node = SiteNode(context.node_config, study_of(msg))
    out = node.strategy.site_context(int(config["round"]), node.model, arrays_on(msg, ARRAYS, node.device),
                                     node.train_set(), int(config["seed"]))
    return Message(RecordDict({CONTEXT: to_arrays(out)}), reply_to=msg)


@app.train(mods=[secagg.client_mod])
@replies_errors
def train(msg: Message, context: Context) -> Message:
    """One client's local update; its reply carries the shared entries, or under --secagg none:
    the node keeps the update for the round's secure sum (`secagg.keep_update`)."""
    start = time.perf_counter()
    config = msg.content.config_records[CONFIG]
    node = SiteNode(context.node_config, study_of(msg))
    client, rnd = node.client(config["client"]), int(config["round"])
    resumed = node.restore(client, before=rnd)
    print(f"round {rnd}: client {client.name} trains "
          + (f"from its saved round {resumed} state" if resumed else "from a fresh state"), flush=True)
    global_state = arrays_on(msg, ARRAYS, node.device)
    start_round(node.strategy, rnd, node.model, global_state, [client], arrays_on(msg, PAYLOAD, node.device))
    result = local_update(client, node.model, node.strategy, global_state, node.opts, node.device, rnd=rnd)
    keep_local(client, node.strategy, result)
    node.save(client, rnd)
    shared = shared_entries(node.strategy, result.state)
    if node.opts.secagg:
        secagg.keep_update(node.state_dir, client.name, rnd, shared, global_state)
        shared = {}
    content = train_reply_content(shared, client.num_slices, result.loss, result.logs, time.perf_counter() - start)
    return Message(content, reply_to=msg)


@app.evaluate()
@replies_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Config `entries`: JSON [[label, client name or ""], ...] to score (the global model for "");
    `latents`: also the global model's pooled latents; `baseline`: the task's model-free baseline's
    scores (zero-filled for reconstruction)."""
    config = msg.content.config_records[CONFIG]
    node = SiteNode(context.node_config, study_of(msg))
    dataset = node.val_set()
    out: dict = {"scores": [], "seconds": []}
    records: dict = {}
    if config["baseline"]:
        out["baseline"] = baseline_scores(node.strategy, dataset, node.opts, node.device)
    entries = json.loads(config["entries"])
    if entries or config["latents"]:
        global_state = arrays_on(msg, ARRAYS, node.device)
        for _, name in entries:
            start = time.perf_counter()
            client = node.client(name) if name else None
            if client is not None:
                node.restore(client, before=int(config["round"]) + 1)
            out["scores"].append(evaluate_model(node.model, node.strategy, dataset, global_state, client,
                                                node.opts, node.device))
            out["seconds"].append(time.perf_counter() - start)
        if config["latents"]:
            records["latents"] = to_arrays({"latents": global_latents(node.model, node.strategy, global_state,
                                                                      dataset, node.device)})
    return Message(RecordDict({CONFIG: ConfigRecord({"result": json.dumps(out)}), **records}), reply_to=msg)
