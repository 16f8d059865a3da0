"""Secure aggregation (--secagg, SecAgg+) on Flower: the refusals, the node's weighted update, the
secure mean against the exact FedAvg mean round by round, and what the server receives.

The bound checked: a node sends y = r d (d its weighted update, r = W / max_weight <= 1),
stochastically rounded to the grid of step q = 2 clip / T; each node's error per entry is below q,
so the mean's is below N q / sum_n r_n over the N nodes of the round (with equal weights: q, which
is 3.8e-6 at clip 8, T = 2^22). Float32 rounding of the weights adds a few ulps (`FLOAT_SLACK`).

Fast tests drive the real ServerApp and ClientApp through `CopyingGrid` (InProcessGrid whose nodes
get their own copy of each message's configs, as over the wire: SecAgg+'s mod pops entries from
the config it receives, and its setup stage sends one content object to every node).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import ConfigRecord, RecordDict  # noqa: E402
from flwr.common import bytes_to_ndarray  # noqa: E402
from flwr.common.secure_aggregation.quantization import quantize  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key  # noqa: E402

from federated.flower import secagg  # noqa: E402
from federated.flower.messages import ARRAYS, CONFIG, from_arrays  # noqa: E402
from federated.flower.server_app import serve  # noqa: E402
from tests.conftest import TINY_RUN, run_cli  # noqa: E402
from tests.test_fl_mr import final_weights  # noqa: E402
from tests.test_flower import InProcessGrid, deployed, node_configs, processes_under, task_identity  # noqa: E402,F401

CLIP, LEVELS = 8.0, 2**22
STEP = 2 * CLIP / LEVELS
FLOAT_SLACK = 2.0**-21  # relative: a few float32 ulps of the weights (FedAvg's own sum, the final cast)


class CopyingGrid(InProcessGrid):
    def send_and_receive(self, messages, *, timeout=None):
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
        return super().send_and_receive([_own_copy(m) for m in messages], timeout=timeout)


def _own_copy(msg):
    out = copy.copy(msg)
    content = msg.content
    out.content = RecordDict({**content.array_records, **content.metric_records,
                              **{k: ConfigRecord(copy.deepcopy(dict(v))) for k, v in content.config_records.items()}})
    return out


def max_excess(got: dict, exact: dict, bound: float) -> float:
    """max over entries of |got - exact| - (bound + FLOAT_SLACK |exact|): <= 0 when within."""
    return max(float(((got[k].double() - exact[k].double()).abs()
                      - (bound + FLOAT_SLACK * exact[k].double().abs())).max()) for k in exact)


# ---- refusals ------------------------------------------------------------------------------------
def test_methods_and_flags_that_cannot_use_secure_aggregation_are_refused_in_one_line(tiny_root, tmp_path,
                                                                                    task_identity, capsys):
    args = TINY_RUN + ["--data_root", str(tiny_root), "--train_dataset", "BF", "--test_dataset", "F",
                       "--save_dir", str(tmp_path / "run"), "--node_wait", "0"]
    refused = {
        ("--secagg", "--strategy", "fedmri"): "--secagg with --strategy fedmri: its contrastive term needs each "
                                              "client's own encoder from the last round",
        ("--secagg", "--strategy", "local"): "--secagg with --strategy local: local training exchanges nothing",
        ("--secagg", "--dp_clip", "0.1", "--dp_noise", "1"): "--secagg with --dp_clip/--dp_noise: client-level DP "
                                                             "clips each client's update on the server",
        ("--secagg_clip", "2"): "--secagg_clip needs --secagg",
        ("--secagg", "--secagg_clip", "0"): "--secagg_clip 0.0: must be positive",
        ("--secagg", "--secagg_threshold", "1.5"): "--secagg_threshold 1.5: must be in (0, 1]",
        ("--secagg", "--secagg_quantization", str(2**31)): f"--secagg_quantization {2**31}: 2 sites' quantised "
                                                            "updates would overflow",
    }
    for flags, line in refused.items():
        assert serve(InProcessGrid(node_configs(tiny_root, tmp_path, "BF")), args + list(flags)) == 2, flags
        err = capsys.readouterr().err
        assert line in err and len(err.strip().splitlines()) == 1, err
    one_site = args[:args.index("--train_dataset")] + ["--train_dataset", "F"] + args[args.index("--test_dataset"):]
    assert serve(InProcessGrid(node_configs(tiny_root, tmp_path, "F")), one_site + ["--secagg"]) == 2
    assert "secure aggregation needs at least two training sites" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---- the pieces --------------------------------------------------------------------------------
def test_node_update_is_the_weighted_mean_of_its_clients_updates():
    a, b = {"w": torch.tensor([1.0, 2.0]), "v": torch.tensor([4.0])}, {"w": torch.tensor([4.0, -1.0]), "v": torch.tensor([1.0])}
    w, v = secagg.node_update([a, b], [1.0, 2.0], ["w", "v"])
    np.testing.assert_allclose(w, [3.0, 0.0])
    np.testing.assert_allclose(v, [2.0])


# ---- studies through the ServerApp and ClientApp -----------------------------------------------
def secure_study(tiny_root, tmp_path, flags: list[str]):
    """A --secagg study on CopyingGrid; also returns each client's update per round, read from its
    node's disk when it replies (the server never sees them), and each round's global weights."""
    updates: dict[tuple[int, str], dict] = {}

    def capture(site, msg, reply):
        if msg.metadata.message_type == "train" and CONFIG in msg.content.config_records:
            config = msg.content.config_records[CONFIG]
            path = secagg.update_path(tmp_path / "nodes" / site / config["study"], config["client"], config["round"])
            updates[(int(config["round"]), str(config["client"]))] = torch.load(path, weights_only=True)
        return None

    argv = TINY_RUN + ["--data_root", str(tiny_root), "--train_dataset", "BF", "--test_dataset", "F", "--secagg",
                       "--save_dir", str(tmp_path / "secure"), "--node_wait", "0"] + flags
    grid = CopyingGrid(node_configs(tiny_root, tmp_path, "BF"), capture)
    assert serve(grid, argv) == 0
    globals_ = {}
    for _, m in grid.sent:
        if m.metadata.message_type == "train" and CONFIG in m.content.config_records:
            globals_[int(m.content.config_records[CONFIG]["round"])] = from_arrays(m.content.array_records[ARRAYS])
    return grid, updates, globals_


def test_secure_mean_is_fedavg_within_the_quantisation_bound_every_round(tiny_root, tmp_path, task_identity):
    """4 clients on 2 nodes, 3 drawn each round: one node sends the weighted update of 2 clients
    (W = 2, r = 1), the other of 1 (W = 1, r = 1/2). Each round's new global weights equal the
    uniform FedAvg mean of that round's client updates within 2 q / (1 + 1/2)."""
    rounds = 3
    _, updates, globals_ = secure_study(tiny_root, tmp_path, ["--num_users", "4", "--frac", "0.75",
                                                             "--epochs", str(rounds), "--seed", "3"])
    globals_[rounds + 1] = final_weights(tmp_path / "secure")
    for rnd in range(1, rounds + 1):
        clients = [c for r, c in updates if r == rnd]
        assert len(clients) == 3
        per_node = [sum(c.startswith(s) for c in clients) for s in "BF"]
        assert sorted(per_node) == [1, 2], clients  # otherwise the weights would not be tested
        g = globals_[rnd]
        exact = {k: g[k].double() + sum(updates[(rnd, c)][k] for c in clients) / 3 for k in updates[(rnd, clients[0])]}
        assert max_excess(globals_[rnd + 1], exact, 2 * STEP / 1.5) <= 0, rnd
        moved = max(float((exact[k] - g[k].double()).abs().max()) for k in exact)
        assert moved > 100 * STEP  # the bound is far below what a round changes


def test_secure_round_equals_plain_fedavg_within_the_bound(tiny_root, tmp_path, task_identity):
    secure_study(tiny_root, tmp_path, ["--seed", "1"])
    args = TINY_RUN + ["--data_root", str(tiny_root), "--train_dataset", "BF", "--test_dataset", "F", "--seed", "1"]
    assert run_cli(args + ["--save_dir", str(tmp_path / "plain")]) == 0
    assert max_excess(final_weights(tmp_path / "secure"), final_weights(tmp_path / "plain"), STEP) <= 0


def test_the_server_never_receives_an_individual_update(tiny_root, tmp_path, task_identity):
    """Every reply the server gets: train replies carry no arrays; the only vectors are SecAgg+'s
    masked integers, and none of them is a node's quantised update (the same comparison finds the
    unmasked quantised update at once)."""
    grid, updates, globals_ = secure_study(tiny_root, tmp_path, ["--epochs", "2", "--seed", "4"])
    masked = []
    for reply in grid.received:
        assert not reply.has_error()
        if reply.metadata.message_type != "train":
            assert set(reply.content.array_records) <= {"latents"}  # evaluation: pooled latents only
            continue
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        if Key.MASKED_PARAMETERS in configs:
            site = grid.contexts[reply.metadata.src_node_id].node_config["site"]
            masked.append((site, [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]))
    assert sorted(site for site, _ in masked) == ["B", "B", "F", "F"]  # 2 nodes x 2 rounds

    def matching(vector: list[np.ndarray], update: list[np.ndarray]) -> float:
        """Fraction of the entries of a sent integer vector (its first: the weight) within two
        steps of the update's quantised value."""
        sent = np.concatenate([v.ravel() for v in vector[1:]]).astype(np.float64)
        expected = np.concatenate([u.ravel() for u in quantize(update, CLIP, LEVELS)]).astype(np.float64)
        return float(np.mean(np.abs(sent - expected) <= 2))

    keys = [k for k in globals_[1] if globals_[1][k].is_floating_point()]
    for i, (site, vector) in enumerate(masked):
        rnd = 1 + i // 2
        update = [updates[(rnd, site)][k].numpy() for k in keys]
        assert matching(vector, update) < 1e-3, (site, rnd)
        assert matching([np.zeros(1)] + quantize(update, CLIP, LEVELS), update) == 1.0
        # Nor the client's new weights.
        weights = [(globals_[rnd][k].double() + updates[(rnd, site)][k]).numpy() for k in keys]
        assert matching(vector, weights) < 1e-3


def test_a_node_whose_update_exceeds_the_clip_is_left_out_with_the_flag_named(tiny_root, tmp_path, task_identity,
                                                                            capsys):
    argv = TINY_RUN + ["--data_root", str(tiny_root), "--train_dataset", "BF", "--test_dataset", "F", "--secagg",
                       "--secagg_clip", "1e-6", "--save_dir", str(tmp_path / "run"), "--node_wait", "0"]
    assert serve(CopyingGrid(node_configs(tiny_root, tmp_path, "BF")), argv) == 1
    err = capsys.readouterr().err
    assert "left out of this round: secure aggregation: site " in err and "beyond --secagg_clip 1e-06" in err
    assert "fewer than --min_clients" in err


# ---- real processes on localhost ---------------------------------------------------------------
@pytest.mark.slow
def test_secagg_over_localhost_tls_auth_equals_fedavg_within_the_bound(tiny_root, tmp_path, task_identity):
    """SuperLink + 2 SuperNodes as processes (TLS, node authentication): one secure round gives the
    plain FedAvg weights within q (equal weights; plain Flower FedAvg equals main_fl_mr.py bit for
    bit, tests/test_flower.py), and exactly the weights of the same study on CopyingGrid."""
    common = TINY_RUN + ["--data_root", str(tiny_root), "--train_dataset", "BF", "--test_dataset", "F", "--seed", "5"]
    assert deployed(tmp_path, common + ["--secagg", "--save_dir", str(tmp_path / "deployed")]) == 0
    assert not processes_under(tmp_path)
    assert run_cli(common + ["--save_dir", str(tmp_path / "plain")]) == 0
    secure, plain = final_weights(tmp_path / "deployed"), final_weights(tmp_path / "plain")
    assert max_excess(secure, plain, STEP) <= 0
    assert any(not torch.equal(secure[k], plain[k]) for k in plain)  # it went through the quantiser

    grid = CopyingGrid(node_configs(tiny_root, tmp_path / "grid", "BF"))
    assert serve(grid, common + ["--secagg", "--save_dir", str(tmp_path / "grid-run"), "--node_wait", "0"]) == 0
    again = final_weights(tmp_path / "grid-run")
    assert all(torch.equal(secure[k], again[k]) for k in again)
