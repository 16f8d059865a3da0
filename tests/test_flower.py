"""The Flower runner: messages, the server's check of replies, and studies that must equal the
in-process runner.

Fast tests drive the real ServerApp code (`serve`, `FlowerExchange`) and the real ClientApp through
`InProcessGrid`, which hands each message to the ClientApp of its node in this process (what a
SuperLink and SuperNodes do over HTTP, without them). Slow tests deploy real processes on localhost
(SuperLink + SuperNodes, TLS, SuperNode authentication) with `federated.flower.local`.
"""
from __future__ import annotations

import math
import threading
import time

import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from federated.flower import client_app  # noqa: E402
from federated.flower.messages import (ARRAYS, CONTEXT, METRICS, PAYLOAD, check_train_reply,  # noqa: E402
                                       from_arrays, to_arrays, train_reply_content)
from federated.flower.server_app import serve  # noqa: E402
from federated.strategies.fedbn import norm_keys  # noqa: E402
from models.unet import Unet  # noqa: E402
from tests.conftest import TINY_RUN, run_cli  # noqa: E402
from tests.test_dpsgd import opacus_epsilon  # noqa: E402
from tests.test_fl_mr import final_weights, read_metrics  # noqa: E402
from utils.seeding import capture_rng, restore_rng  # noqa: E402


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def assert_same_weights(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# ---- messages and reply checks -------------------------------------------------------------------
def test_state_dict_round_trips_bit_for_bit():
    model = Unet(chans=4, num_pool_layers=2, norm="batch")
    model.train()
    model(torch.randn(2, 1, 16, 16))  # running statistics and the int64 step counter move
    state = model.state_dict()
    back = from_arrays(to_arrays(state))
    assert list(back) == list(state)
    for k in state:
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k]), k


def _reply(state: dict, num_examples=8, loss=0.5) -> RecordDict:
    return train_reply_content(state, num_examples, loss, {"recon_loss": 0.4}, 1.0)


def test_reply_check_accepts_a_good_update_and_names_what_is_wrong_with_bad_ones():
    expected = {"w": torch.zeros(3, 2), "n": torch.tensor(3)}
    good = {"w": torch.ones(3, 2), "n": torch.tensor(4)}
    assert check_train_reply(_reply(good), expected, 8) is None
    cases = {
        "missing": ({"w": good["w"]}, "missing ['n']"),
        "extra": ({**good, "bn.weight": torch.ones(2)}, "unexpected ['bn.weight']"),
        "shape": ({**good, "w": torch.ones(2, 3)}, "'w' is float32[2, 3], expected float32[3, 2]"),
        "dtype": ({**good, "w": torch.ones(3, 2, dtype=torch.float64)}, "'w' is float64[3, 2]"),
        "nan": ({**good, "w": torch.full((3, 2), math.nan)}, "'w' holds non-finite values"),
        "inf": ({**good, "w": torch.full((3, 2), math.inf)}, "'w' holds non-finite values"),
    }
    for name, (state, reason) in cases.items():
        got = check_train_reply(_reply(state), expected, 8)
        assert got is not None and reason in got, (name, got)
    assert "num-examples is 9" in check_train_reply(_reply(good, num_examples=9), expected, 8)
    assert "num-examples is -1" in check_train_reply(_reply(good, num_examples=-1), expected, 8)
    assert "loss is nan" in check_train_reply(_reply(good, loss=math.nan), expected, 8)
    assert "no 'arrays'" in check_train_reply(RecordDict(), expected, 8)


# ---- the ServerApp and ClientApp, without processes -------------------------------------------
class InProcessGrid(Grid):
    """Each message goes to the real ClientApp of its node here; `tamper(site, reply)` may replace a
    reply; `sent` keeps every message the server sent (with its site), `received` every reply it got."""

    def __init__(self, node_configs: list[dict], tamper=None):
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config=cfg, state=RecordDict(),
                                          run_config={}) for i, cfg in enumerate(node_configs)}
        self.tamper = tamper
        self.sent: list[tuple[str, Message]] = []
        self.received: list[Message] = []

    def set_run(self, run_id):
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # as the SuperLink does
            context = self.contexts[m.metadata.dst_node_id]
            self.sent.append((context.node_config["site"], m))
            rng = capture_rng()  # a node is its own process: its seeding must not touch the server's
            try:
                reply = client_app.app(m, context)
            finally:
                restore_rng(rng)
            if self.tamper is not None:
                reply = self.tamper(context.node_config["site"], m, reply) or reply
            self.received.append(reply)
            replies.append(reply)
        return replies


@pytest.fixture
def task_identity():
    """Messages built outside a Flower runtime need a run id (flwr's private TaskIdentity)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


def node_configs(root, tmp_path, sites) -> list[dict]:
    return [{"site": s, "data-root": str(root), "state-dir": str(tmp_path / "nodes" / s)} for s in sites]


def flower_and_in_process(tiny_root, tmp_path, flags: list[str], sites: str, tamper=None, nodes: str | None = None):
    """The same study on the Flower code path (InProcessGrid, a node per site of `nodes`, by default
    the training sites) and in process; returns the grid."""
    common = TINY_RUN + ["--data_root", str(tiny_root), "--train_dataset", sites] + flags
    grid = InProcessGrid(node_configs(tiny_root, tmp_path, nodes or sites), tamper)
    assert serve(grid, common + ["--save_dir", str(tmp_path / "flower"), "--node_wait", "0"]) == 0
    assert run_cli(common + ["--save_dir", str(tmp_path / "local")]) == 0
    return grid


def test_fedavg_on_flower_equals_in_process(tiny_root, tmp_path, task_identity):
    flower_and_in_process(tiny_root, tmp_path, ["--epochs", "2", "--test_dataset", "H", "--seed", "2"], "BH")
    assert_same_weights(final_weights(tmp_path / "flower"), final_weights(tmp_path / "local"))
    assert without_seconds(read_metrics(tmp_path / "flower")) == without_seconds(read_metrics(tmp_path / "local"))


def test_fedbn_norm_weights_never_reach_the_server(tiny_root, tmp_path, task_identity):
    grid = flower_and_in_process(tiny_root, tmp_path, ["--strategy", "fedbn", "--norm", "batch", "--epochs", "2",
                                                       "--test_dataset", "F"], "BF")
    local_keys = norm_keys(Unet(chans=4, num_pool_layers=2, norm="batch"))
    train_replies = [r for r in grid.received if not r.has_error() and ARRAYS in r.content.array_records
                     and METRICS in r.content.metric_records]
    assert len(train_replies) == 4  # 2 clients x 2 rounds
    for reply in train_replies:
        sent = set(reply.content.array_records[ARRAYS].keys())
        assert sent and not sent & local_keys
    # The personalised evaluation (each client with its own norm layers) equals the in-process one.
    assert without_seconds(read_metrics(tmp_path / "flower")) == without_seconds(read_metrics(tmp_path / "local"))
    assert_same_weights(final_weights(tmp_path / "flower"), final_weights(tmp_path / "local"))


def test_fedprox_on_flower_equals_in_process(tiny_root, tmp_path, task_identity):
    flower_and_in_process(tiny_root, tmp_path, ["--strategy", "fedprox", "--mu", "0.1", "--test_dataset", "F"], "BF")
    assert_same_weights(final_weights(tmp_path / "flower"), final_weights(tmp_path / "local"))


def test_dpsgd_on_flower_equals_in_process_and_its_budget_stops_both_alike(tiny_root, tmp_path, task_identity):
    """The nodes keep each client's accountant; the server logs the same epsilons and, under
    --dp_max_epsilon (counted from those rows), stops before the same round."""
    budget = opacus_epsilon(1.1, 0.5, 4, 1e-5) * 1.001  # 2 rounds of 2 steps at q 0.5 fit, a third does not
    common = TINY_RUN + ["--data_root", str(tiny_root), "--train_dataset", "BF", "--test_dataset", "F",
                         "--dpsgd_noise", "1.1", "--dpsgd_clip", "1.0", "--epochs", "3",
                         "--dp_max_epsilon", str(budget)]
    grid = InProcessGrid(node_configs(tiny_root, tmp_path, "BF"))
    assert serve(grid, common + ["--save_dir", str(tmp_path / "flower"), "--node_wait", "0"]) == 1
    assert run_cli(common + ["--save_dir", str(tmp_path / "local")]) == 1
    for side in ("flower", "local"):
        assert torch.load(tmp_path / side / "last.pt", weights_only=True)["round"] == 2
    assert without_seconds(read_metrics(tmp_path / "flower")) == without_seconds(read_metrics(tmp_path / "local"))
    assert_same_weights(final_weights(tmp_path / "flower"), final_weights(tmp_path / "local"))


def train_messages(grid: InProcessGrid) -> list[tuple[str, Message]]:
    return [(site, m) for site, m in grid.sent if m.metadata.message_type == "train"]


def test_fedmri_on_flower_equals_in_process(tiny_root, tmp_path, task_identity):
    grid = flower_and_in_process(tiny_root, tmp_path, ["--strategy", "fedmri", "--epochs", "2", "--test_dataset", "F"],
                                 "BF")
    # Each client's own decoder is evaluated: the rows equal the in-process ones only if it trained alike.
    assert without_seconds(read_metrics(tmp_path / "flower")) == without_seconds(read_metrics(tmp_path / "local"))
    assert_same_weights(final_weights(tmp_path / "flower"), final_weights(tmp_path / "local"))
    # The contrastive term's negatives travel in the round's payload: none in round 1, then the two
    # encoders the clients sent in round 1, to each client.
    sent = train_messages(grid)
    assert [PAYLOAD in m.content.array_records for _, m in sent] == [False, False, True, True]
    replies = [from_arrays(r.content.array_records[ARRAYS]) for r in grid.received
               if METRICS in r.content.metric_records][:2]
    for _, m in sent[2:]:
        payload = from_arrays(m.content.array_records[PAYLOAD])
        assert payload and set(payload) <= set(replies[0])
        assert all(torch.equal(payload[k], torch.stack([r[k] for r in replies])) for k in payload)


def test_mrcm_features_on_flower_equals_in_process_and_only_latents_leave_the_target(tiny_root, tmp_path,
                                                                                     task_identity):
    grid = flower_and_in_process(tiny_root, tmp_path, ["--strategy", "mrcm", "--mrcm_target", "features",
                                                       "--mrcm_bank", "8", "--epochs", "2", "--test_dataset", "H"],
                                 "BF", nodes="BFH")
    assert_same_weights(final_weights(tmp_path / "flower"), final_weights(tmp_path / "local"))
    assert without_seconds(read_metrics(tmp_path / "flower")) == without_seconds(read_metrics(tmp_path / "local"))
    # The bank's seeds are drawn on the server, from the generator its checkpoint keeps.
    generators = [torch.load(tmp_path / run / "last.pt", weights_only=True)["strategy"]["bank_generator"]
                  for run in ("flower", "local")]
    assert torch.equal(*generators)

    # Each round the target's node (H, no client) computes the bank; the sources get it as payload.
    asked = [(site, m) for site, m in grid.sent if m.metadata.message_type == "query.context"]
    assert [site for site, _ in asked] == ["H", "H"]
    banks = [from_arrays(r.content.array_records[CONTEXT]) for r in grid.received if CONTEXT in r.content.array_records]
    assert len(banks) == 2 and all(set(b) == {"bank"} and b["bank"].shape == (8, 4 * 16) for b in banks)
    sent = train_messages(grid)
    assert sorted(site for site, _ in sent) == ["B", "B", "F", "F"]
    for i, (_, m) in enumerate(sent):
        assert torch.equal(from_arrays(m.content.array_records[PAYLOAD])["bank"], banks[i // 2]["bank"])
    # What the server receives: weights (train replies), pooled latent vectors (the bank and the
    # evaluation's domain gap, (N, 4C)) and numbers; never an image.
    weight_keys = set(final_weights(tmp_path / "local"))
    for reply in grid.received:
        assert not reply.has_error()
        for name, record in reply.content.array_records.items():
            state = from_arrays(record)
            if name == ARRAYS:
                assert set(state) <= weight_keys
            else:
                assert name in (CONTEXT, "latents") and all(v.ndim == 2 and v.shape[1] == 4 * 16
                                                            for v in state.values()), name


def test_pfl_on_flower_equals_in_process(tiny_root, tmp_path, task_identity):
    """Each node builds the model with the study's training sites (one-hot site codes over all of them)."""
    flower_and_in_process(tiny_root, tmp_path, ["--strategy", "pfl", "--epochs", "2", "--test_dataset", "F"], "BF")
    assert without_seconds(read_metrics(tmp_path / "flower")) == without_seconds(read_metrics(tmp_path / "local"))
    assert_same_weights(final_weights(tmp_path / "flower"), final_weights(tmp_path / "local"))


def test_pflsynth_without_dropout_on_flower_equals_in_process(tiny_root, tmp_path, task_identity):
    """Dropout draws from the process's global random stream, which in process runs on across clients
    and rounds and on a node starts afresh with each message: only without it are the runs equal."""
    flags = ["--task", "synthesis", "--ngf", "4", "--ndf", "4", "--n_blocks", "2", "--mapping_layers", "2",
             "--no_dropout", "--strategy", "pflsynth", "--pflsynth_shared_blocks", "1", "--epochs", "2", "--test_dataset", "I"]
    flower_and_in_process(tiny_root, tmp_path, flags, "BI")
    assert without_seconds(read_metrics(tmp_path / "flower")) == without_seconds(read_metrics(tmp_path / "local"))
    assert_same_weights(final_weights(tmp_path / "flower"), final_weights(tmp_path / "local"))


def test_bad_or_failing_replies_are_left_out_with_the_site_named(tiny_root, tmp_path, task_identity, capsys):
    def tamper(site, msg, reply):
        if msg.metadata.message_type != "train":
            return None
        if site == "B":  # NaN weights
            state = from_arrays(reply.content.array_records[ARRAYS])
            state = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in state.items()}
            metrics = reply.content.metric_records[METRICS]
            return Message(train_reply_content(state, metrics["num-examples"], metrics["loss"], {}, 1.0), reply_to=msg)
        if site == "I":  # the ClientApp raised
            return Message(Error(1, "site I: RuntimeError: disk full"), reply_to=msg)
        return None

    args = lambda run: TINY_RUN + ["--data_root", str(tiny_root), "--train_dataset", "BFI", "--test_dataset", "F",
                                   "--save_dir", str(tmp_path / run), "--node_wait", "0"]
    assert serve(InProcessGrid(node_configs(tiny_root, tmp_path, "BFI"), tamper), args("run")) == 0
    err = capsys.readouterr().err
    assert "client B (site B) left out of this round: its reply is refused: " in err and "non-finite" in err
    assert "client I (site I) left out of this round: site I: RuntimeError: disk full" in err
    rows = read_metrics(tmp_path / "run")
    assert {r["model"] for r in rows if r["split"] == "train"} == {"F"}
    assert all(torch.isfinite(v).all() for v in final_weights(tmp_path / "run").values() if v.is_floating_point())
    # Too few clients: the run stops (exit 1) with the last checkpoint intact.
    assert serve(InProcessGrid(node_configs(tiny_root, tmp_path, "BFI"), tamper), args("run2") + ["--min_clients", "2"]) == 1
    assert "fewer than --min_clients 2" in capsys.readouterr().err


def test_missing_site_and_unsupported_method_are_user_errors(tiny_root, tmp_path, task_identity, capsys):
    args = TINY_RUN + ["--data_root", str(tiny_root), "--train_dataset", "BF", "--test_dataset", "F",
                       "--save_dir", str(tmp_path / "run"), "--node_wait", "0"]
    assert serve(InProcessGrid(node_configs(tiny_root, tmp_path, "B")), args) == 2
    assert "unknown site 'F'" in capsys.readouterr().err
    refused = {"mrcm": "--mrcm_target images does not run on Flower: every source client would read the target "
                       "site's images; use --mrcm_target features",
               "central": "--strategy central does not run on Flower: it pools every training site's images"}
    for name, line in refused.items():
        assert serve(InProcessGrid(node_configs(tiny_root, tmp_path, "BF")), args + ["--strategy", name]) == 2
        err = capsys.readouterr().err
        assert line in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, line", [(["--node_wait", "-1"], "--node_wait -1: must be 0 or more"),
                                         (["--reply_timeout", "0"], "--reply_timeout 0: must be positive")])
def test_bad_waits_are_one_line_on_the_server_and_the_launcher(tmp_path, capsys, flags, line):
    from federated.flower.local import main
    args = TINY_RUN + ["--save_dir", str(tmp_path / "run")] + flags
    for entry in (lambda: serve(InProcessGrid([]), args), lambda: main(args)):
        code = entry()
        err = capsys.readouterr().err.strip()
        assert code == 2 and line in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


# ---- real processes on localhost ---------------------------------------------------------------
def processes_under(folder) -> list[int]:
    """PIDs of live processes whose FLWR_HOME lies under `folder` (every process a deployment
    there started, and what those spawned, inherit one)."""
    from pathlib import Path
    marker = f"FLWR_HOME={folder}".encode()
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "environ").read_bytes() and (proc / "stat").read_text().split()[2] != "Z":
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def deployed(tmp_path, argv: list[str]) -> int:
    """`python -m federated.flower local argv` in this process, its deployment under tmp_path."""
    import tempfile
    from federated.flower.local import main
    old = tempfile.tempdir
    tempfile.tempdir = str(tmp_path)
    try:
        return main(argv)
    finally:
        tempfile.tempdir = old


@pytest.mark.slow
def test_fedavg_over_localhost_tls_auth_equals_main_fl_mr(tiny_root, tmp_path):
    common = TINY_RUN + ["--data_root", str(tiny_root), "--train_dataset", "BFHI", "--test_dataset", "H",
                         "--epochs", "2", "--seed", "1"]
    assert deployed(tmp_path, common + ["--save_dir", str(tmp_path / "flower")]) == 0
    assert not processes_under(tmp_path)
    assert run_cli(common + ["--save_dir", str(tmp_path / "local")]) == 0
    assert_same_weights(final_weights(tmp_path / "flower"), final_weights(tmp_path / "local"))
    assert without_seconds(read_metrics(tmp_path / "flower")) == without_seconds(read_metrics(tmp_path / "local"))


@pytest.mark.slow
def test_mrcm_features_over_localhost_equals_in_process(tiny_root, tmp_path):
    """The target H has a node of its own (no client): it computes the bank each round."""
    common = TINY_RUN + ["--data_root", str(tiny_root), "--train_dataset", "BF", "--test_dataset", "H",
                         "--strategy", "mrcm", "--mrcm_target", "features", "--mrcm_bank", "8", "--epochs", "2"]
    assert deployed(tmp_path, common + ["--save_dir", str(tmp_path / "flower")]) == 0
    assert not processes_under(tmp_path)
    assert run_cli(common + ["--save_dir", str(tmp_path / "local")]) == 0
    assert_same_weights(final_weights(tmp_path / "flower"), final_weights(tmp_path / "local"))
    assert without_seconds(read_metrics(tmp_path / "flower")) == without_seconds(read_metrics(tmp_path / "local"))


def restart_until_active(d, site: str, timeout: float = 300.0) -> None:
    """Start `site`'s SuperNode again until the SuperLink activates it. It refuses (the node exits
    with code 305) while it still counts the stopped one online, which lasts until that one's
    heartbeats lapse (about a minute) when its own deactivation did not get through."""
    deadline = time.monotonic() + timeout
    while True:
        log = d.dir / f"node-{site}.log"
        offset = log.stat().st_size if log.exists() else 0
        proc = d.start_node(site)
        while proc.popen.poll() is None and time.monotonic() < deadline:
            with open(log, "rb") as f:
                f.seek(offset)
                if b"SuperNode ID:" in f.read():
                    return
            time.sleep(0.5)
        assert time.monotonic() < deadline, f"the SuperLink did not take the restarted node {site}; see {log}"
        d.stop(f"node-{site}")  # what it started (its SuperExec) goes with it
        time.sleep(2.0)


@pytest.mark.slow
def test_killed_supernode_is_left_out_and_rejoins_with_its_saved_state(tiny_root, tmp_path):
    from federated.flower.local import LocalDeployment
    sites = "BFH"
    argv = TINY_RUN + ["--data_root", str(tiny_root), "--train_dataset", sites, "--test_dataset", "H",
                       "--epochs", "3", "--reply_timeout", "60", "--save_dir", str(tmp_path / "run")]
    lines: list[str] = []
    with LocalDeployment(workdir=tmp_path / "deploy") as d:
        d.start_superlink()
        for s in sites:
            d.add_node(s, {"data-root": str(tiny_root), "state-dir": str(tmp_path / "run" / "nodes" / s)})
        result = {}
        study = threading.Thread(target=lambda: result.setdefault("code", d.run(argv, lines.append)))
        study.start()
        log = d.processes["node-F"].log
        deadline = time.monotonic() + 600
        while "round 2: client F trains" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        d.stop("node-F")  # during its round-2 update
        restart_until_active(d, "F")
        study.join(900)
        assert result.get("code") == 0, "\n".join(lines[-30:])
        assert "round 3: client F trains from its saved round 1 state" in d.processes["node-F"].log.read_text()
    assert not processes_under(tmp_path)
    train = [(r["round"], r["model"]) for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert ("2", "F") not in train and {("2", "B"), ("2", "H"), ("3", "F")} <= set(train)
    assert any("client F (site F) left out of this round" in line for line in lines)


@pytest.mark.slow
def test_ctrl_c_stops_every_process_it_started(tiny_root, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    argv = TINY_RUN + ["--data_root", str(tiny_root), "--train_dataset", "BF", "--test_dataset", "F",
                       "--epochs", "5", "--save_dir", str(tmp_path / "run")]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "federated.flower", "local", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not (tmp_path / "run" / "metrics.csv").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_under(tmp_path)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    assert "Continue with: python -m federated.flower local --resume" in out
    assert not processes_under(tmp_path)
