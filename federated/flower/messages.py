"""What travels between the ServerApp and a ClientApp, and the server's check of what arrives.

Every instruction's `config` carries the study (`study_config`: the run's resolved options as JSON,
its id, training sites and target site). A train instruction adds the global weights (`arrays`,
every entry of the global state_dict), the client's name and the round; the reply
carries only the entries the strategy aggregates (`arrays`; none under --secagg, where they go
through SecAgg+: `federated/flower/secagg.py`) and `metrics` (`num-examples`, `loss`,
`seconds` of the node's work and the strategy's logged values as `log.<name>`). A train instruction
also carries the round's `payload` when the strategy has one (`Strategy.round_payload`, e.g.
FedMRI's last encoders, FL-MRCM's target bank). A context instruction (`query.context`) asks a
site for its start-of-round work (`Strategy.site_context`) with the global weights and a `seed`;
its reply carries only what that returns (`context`). Tensors travel as numpy arrays (`np.save`
bytes): float32 and int64 round-trip bit for bit.
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

State = dict[str, torch.Tensor]

ARRAYS, CONFIG, METRICS, PAYLOAD, CONTEXT = "arrays", "config", "metrics", "payload", "context"
LOG_PREFIX = "log."

# Message types the ClientApp answers (flwr routes "<kind>.<action>" to @app.<kind>("<action>")).
SITE_QUERY = "query.site"          # which site is this node?
CLIENTS_QUERY = "query.clients"    # its clients in this study and their training slices
TRAIN = "train"                    # one client's local update
EVALUATE = "evaluate"              # validation scores, latents, zero-filled scores on the node's site
CONTEXT_QUERY = "query.context"    # the site's start-of-round work with its own data


def to_arrays(state: State) -> ArrayRecord:
    """An ArrayRecord with the keys of `state`, in its order."""
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def from_arrays(record: ArrayRecord) -> State:
    return record.to_torch_state_dict()


def options_to_json(opts: argparse.Namespace) -> str:
    return json.dumps(vars(opts), sort_keys=True)


def options_from_json(text: str) -> argparse.Namespace:
    return argparse.Namespace(**json.loads(text))


def study_config(opts: argparse.Namespace, study_id: str, train_sites: list[str], test_site: str) -> dict:
    """What every node needs to know of the study to build its site's part of it."""
    return {"options": options_to_json(opts), "study": study_id, "train_sites": list(train_sites),
            "test_site": test_site}


def train_content(global_state: State, study: dict, client: str, rnd: int, payload: State) -> RecordDict:
    records = {ARRAYS: to_arrays(global_state), CONFIG: ConfigRecord({**study, "client": client, "round": rnd})}
    if payload:
        records[PAYLOAD] = to_arrays(payload)
    return RecordDict(records)


def context_content(global_state: State, study: dict, rnd: int, seed: int) -> RecordDict:
    return RecordDict({ARRAYS: to_arrays(global_state), CONFIG: ConfigRecord({**study, "round": rnd, "seed": seed})})


def check_context_reply(content: RecordDict) -> str | None:
    """None when a context reply is usable (a `context` record, every floating value finite)."""
    if CONTEXT not in content.array_records:
        return f"the reply has no '{CONTEXT}'"
    for key, value in content.array_records[CONTEXT].items():
        v = value.numpy()
        if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
            return f"'{key}' holds non-finite values"
    return None


def train_reply_content(shared: State, num_examples: int, loss: float, logs: dict[str, float],
                        seconds: float) -> RecordDict:
    metrics = {"num-examples": int(num_examples), "loss": float(loss), "seconds": float(seconds),
               **{LOG_PREFIX + k: float(v) for k, v in logs.items()}}
    return RecordDict({ARRAYS: to_arrays(shared), METRICS: MetricRecord(metrics)})


def numpy_dtype(t: torch.Tensor) -> str:
    return torch.empty(0, dtype=t.dtype).numpy().dtype.name


def check_train_reply(content: RecordDict, expected: State, num_examples: int) -> str | None:
    """None when the reply is a usable update; otherwise why not, in one line.

    Usable: exactly the keys of `expected` (the shared entries), each with its shape and dtype,
    every floating value finite, a finite loss, and `num-examples` equal to the client's number of
    training slices announced at the start of the study (`num_examples`).
    """
    if ARRAYS not in content.array_records or METRICS not in content.metric_records:
        return f"the reply has no '{ARRAYS}' weights or no '{METRICS}'"
    arrays, metrics = content.array_records[ARRAYS], content.metric_records[METRICS]
    missing, unexpected = expected.keys() - arrays.keys(), arrays.keys() - expected.keys()
    if missing or unexpected:
        parts = [f"missing {sorted(missing)[:3]}" if missing else "", f"unexpected {sorted(unexpected)[:3]}" if unexpected else ""]
        return f"wrong weight keys ({', '.join(p for p in parts if p)})"
    for key, ref in expected.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(ref.shape) or got.dtype != numpy_dtype(ref):
            return f"'{key}' is {got.dtype}{list(got.shape)}, expected {numpy_dtype(ref)}{list(ref.shape)}"
        value = got.numpy()
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return f"'{key}' holds non-finite values"
    n = metrics.get("num-examples")
    if not isinstance(n, int) or n != num_examples:
        return f"num-examples is {n!r}, expected the client's {num_examples} training slices"
    loss = metrics.get("loss")
    if not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return f"loss is {loss!r}"
    return None


def reply_logs(metrics: MetricRecord) -> dict[str, float]:
    return {k[len(LOG_PREFIX):]: float(v) for k, v in metrics.items() if k.startswith(LOG_PREFIX)}
