"""Secure aggregation (`--secagg`): each round the server learns only the weighted mean of the
clients' updates, through Flower's SecAgg+ protocol. flwr 1.42 runs SecAgg+ only on its legacy API
(`SecAggPlusWorkflow` on a `LegacyContext` whose strategy gets `FitIns`/`FitRes`, and
`secaggplus_mod` on the client, which reads the reply as a `FitRes`); every use of that API is in
this file.

A round under `--secagg`:

1. The usual train message per client (`FlowerExchange.train`). The node trains the client as
   always but sends back only its metrics; it writes the client's update (new shared floating
   entries minus the global ones, float64) to its own disk (`keep_update`).
2. `secure_mean`: one SecAgg+ run over the nodes whose clients all trained, four message exchanges
   (setup, share keys, collect masked vectors, unmask). In "collect masked vectors" each node's
   `_node_fit` combines its trained clients' updates, weighted by the server's weights w_c, into
   one vector d = sum_c w_c u_c / W (W = sum_c w_c) and returns it with weight W; `secaggplus_mod`
   scales it by r = W / max_weight, quantises it, masks it and sends the masked integers only. The
   server unmasks the sum and gets sum_n r_n d_n / sum_n r_n: the weighted mean of the updates.

Quantisation (flwr's `quantize`): y = r d is clipped to [-clip, clip] and stochastically rounded
to the grid of step 2 clip / T (T = `--secagg_quantization`). Each node's error per entry is below
one step, so the mean's error per entry is below N (2 clip / T) / sum_n r_n with N nodes: with
equal weights (every r_n = 1) that is 2 clip / T, 3.8e-6 at the defaults (clip 8, T = 2^22). The
weights themselves are rounded to r_n = round(W_n / max_weight * T) / T. An update entry beyond
the clip would be clipped silently, so a node refuses to send one (its clients are left out).
Rounding draws from numpy's global generator; each node seeds it from --seed, the round and its
site, so a study is deterministic given --seed.

Integer shared entries (BatchNorm's step counter) are not aggregated: they keep the global value,
as under client-level DP.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from federated.client import ClientFailure
from federated.exchange import failure_reason
from federated.flower.options import SECAGG_MODULUS
from federated.flower.site import study_state_dir

State = dict[str, torch.Tensor]

CLIENT_ERROR = 1


def secure_keys(global_state: State, shared: list[str]) -> list[str]:
    """The shared entries that go through the secure sum: the floating ones, in `shared`'s order."""
    return [k for k in shared if global_state[k].is_floating_point()]


# ---- the node's side ---------------------------------------------------------------------------
def update_path(state_dir: Path, client: str, rnd: int) -> Path:
    return state_dir / client / f"secagg-{rnd}.pt"


def keep_update(state_dir: Path, client: str, rnd: int, new: State, global_state: State) -> None:
    """After client `client`'s local update in round `rnd`: write its update new - global (every
    floating entry of `new`, float64 on the CPU) for the secure sum, replacing any older one."""
    folder = state_dir / client
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("secagg-*.pt"):
        old.unlink(missing_ok=True)
    update = {k: v.detach().cpu().double() - global_state[k].detach().cpu().double()
              for k, v in new.items() if v.is_floating_point()}
    path = update_path(state_dir, client, rnd)
    tmp = path.with_suffix(".tmp")
    torch.save(update, tmp)
    tmp.replace(path)


def node_update(updates: list[State], weights: list[float], keys: list[str]) -> list[np.ndarray]:
    """sum_c w_c u_c / sum_c w_c for every entry of `keys`, as float64 arrays in that order."""
    total = float(sum(weights))
    return [(sum(w * u[k] for u, w in zip(updates, weights)) / total).numpy() for k in keys]


def _node_fit(msg: Message, context: Context) -> Message:
    """'Collect masked vectors', before masking: this node's weighted update of its clients that
    trained this round, as a legacy FitRes whose num_examples is their total weight."""
    config = compat.recorddict_to_fitins(msg.content, keep_input=True).config
    state_dir = study_state_dir(context.node_config, str(config["study"]))
    rnd, clip = int(config["round"]), float(config["clip"])
    weights: dict[str, float] = json.loads(str(config["clients"]))
    keys: list[str] = json.loads(str(config["keys"]))
    paths = [update_path(state_dir, name, rnd) for name in weights]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ClientFailure(f"no update of round {rnd} on this node ({missing[0]}); was it restarted?")
    updates = [torch.load(p, weights_only=True) for p in paths]
    vector = node_update(updates, list(weights.values()), keys)
    largest = max((float(np.abs(v).max()) for v in vector if v.size), default=0.0)
    if largest > clip:
        raise ClientFailure(f"its update has an entry of magnitude {largest:.3g}, beyond --secagg_clip {clip:g}, "
                            "which SecAgg+ would clip; start the study again with a larger --secagg_clip")
    for p in paths:
        p.unlink(missing_ok=True)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), num_examples=sum(weights.values()),
                    metrics={})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def client_mod(msg: Message, context: Context, call_next) -> Message:
    """ClientApp mod on train messages: the SecAgg+ stages (flwr's `secaggplus_mod`, whose
    'collect masked vectors' stage calls `_node_fit`); any other message goes on to the handler.
    A failure becomes an error reply naming the site."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    seed = None
    if msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS:
        seed = int(compat.recorddict_to_fitins(msg.content, keep_input=True).config["seed"])
    saved = np.random.get_state()
    try:
        if seed is not None:
            np.random.seed(seed)  # flwr's stochastic rounding draws from numpy's global generator
        return secaggplus_mod(msg, context, _node_fit)
    except Exception as e:
        site = context.node_config.get("site", "?")
        return Message(Error(CLIENT_ERROR, f"site {site}: {failure_reason(e)}"), reply_to=msg)
    finally:
        np.random.set_state(saved)


# ---- the server's side -------------------------------------------------------------------------
@dataclass
class Settings:
    """The SecAgg+ parameters of a study (`--secagg_*` flags) and the wait per exchange."""
    clip: float
    quantization: int
    threshold: float
    timeout: float


@dataclass
class SecureMean:
    """What one secure aggregation gave: the weighted mean update (None: the protocol halted),
    the nodes whose updates it holds, and why each other node is not in it."""
    mean: State | None
    nodes: set[int]
    problems: dict[int, str] = field(default_factory=dict)


class _RecordingGrid:
    """The grid as the workflow sees it, remembering the first failure of each node."""

    def __init__(self, grid: Grid, timeout: float):
        self.grid, self.timeout = grid, timeout
        self.problems: dict[int, str] = {}

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        answered = {r.metadata.src_node_id for r in replies}
        for r in replies:
            if r.has_error():
                self.problems.setdefault(r.metadata.src_node_id, r.error.reason or f"error {r.error.code}")
        for m in messages:
            if m.metadata.dst_node_id not in answered:
                self.problems.setdefault(m.metadata.dst_node_id,
                                         f"no reply within --reply_timeout {self.timeout:g} s")
        return replies


class _SumStrategy(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow drives: `configure_fit` names the nodes and their
    instructions; `aggregate_fit` receives the unmasked mean (flwr puts it in every FitRes)."""

    def __init__(self, proxies: list[GridClientProxy], configs: dict[int, dict]):
        self.proxies, self.configs = proxies, configs
        self.mean: list[np.ndarray] | None = None
        self.nodes: set[int] = set()

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(p, FitIns(Parameters([], "numpy.ndarray"), self.configs[p.node_id])) for p in self.proxies]

    def aggregate_fit(self, server_round, results, failures):
        if not results:
            return None, {}
        self.mean = parameters_to_ndarrays(results[0][1].parameters)
        self.nodes = {proxy.node_id for proxy, _ in results}
        return results[0][1].parameters, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def node_seed(seed: int, rnd: int, site: str) -> int:
    """The seed of a node's stochastic rounding in round `rnd`."""
    return zlib.crc32(f"{seed}:secagg:{rnd}:{site}".encode())


def secure_mean(grid: Grid, rnd: int, nodes: dict[int, tuple[str, dict[str, float]]], shapes: dict[str, torch.Size],
                study: str, seed: int, settings: Settings) -> SecureMean:
    """The weighted mean of the updates of the clients in `nodes` (node id -> (site, {client:
    weight})), securely aggregated over those nodes: {entry: float64 tensor of `shapes`}, the
    entries in `shapes`' order. At least two nodes; the server sees masked integers only."""
    if len(nodes) < 2:
        raise ValueError("secure aggregation needs at least two nodes")
    keys = list(shapes)
    configs = {nid: {"study": study, "round": rnd, "clip": settings.clip, "keys": json.dumps(keys),
                     "clients": json.dumps(clients), "seed": node_seed(seed, rnd, site)}
               for nid, (site, clients) in nodes.items()}
    recording = _RecordingGrid(grid, settings.timeout)
    proxies = [GridClientProxy(nid, recording, run_id=0) for nid in nodes]
    manager = SimpleClientManager()
    for p in proxies:
        manager.register(p)
    strategy = _SumStrategy(proxies, configs)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=strategy, client_manager=manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    max_weight = max(sum(clients.values()) for _, clients in nodes.values())
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=settings.threshold, max_weight=max_weight,
                                  clipping_range=settings.clip, quantization_range=settings.quantization,
                                  modulus_range=SECAGG_MODULUS, timeout=settings.timeout)
    workflow(recording, context)
    problems = {nid: recording.problems.get(nid, "the secure aggregation halted (see the server's log)")
                for nid in nodes if nid not in strategy.nodes}
    if strategy.mean is None:
        return SecureMean(None, set(), problems)
    mean = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)).reshape(shapes[k]) for k, v in zip(keys, strategy.mean)}
    return SecureMean(mean, strategy.nodes, problems)
