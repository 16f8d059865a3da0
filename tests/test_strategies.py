"""Each federated method's defining property: which weights it shares, what it adds to the local step,
what it evaluates. Hook-level checks use a tiny model; run-level checks go through the CLI on the
tiny synthetic sites."""
from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

import pytest
import torch

from federated.strategies import STRATEGIES  # first: federated.experiment imported first is circular
from federated.experiment import build_experiment
from models.personalized_unet import PersonalizedUnet
from models.unet import Unet
from options import parse_options
from tests.conftest import TINY_RUN, run_cli
from utils.errors import UserError

TINY = TINY_RUN + ["--resolution", "32"]
NORM_KEY = re.compile(r"\.layers\.[15]\.")  # where Unet puts its normalisation layers
ENCODER_KEY = re.compile(r"^(down_sample_layers|conv)\.")


def options(*flags: str) -> argparse.Namespace:
    return parse_options(["--chans", "4", "--num_pools", "2", *flags], "test", "fedavg", "")


def strategy_and_state(name: str, *flags: str):
    """A strategy and the initial state of its model, for two clients at sites F and B."""
    strategy = STRATEGIES[name](options("--strategy", name, *flags))
    model = strategy.build_model(["F", "B"])
    return strategy, {k: v.clone() for k, v in model.state_dict().items()}


def run(root: Path, save_dir: Path, *flags: str) -> Path:
    assert run_cli(TINY + ["--data_root", str(root), "--save_dir", str(save_dir), *flags]) == 0
    return save_dir


def checkpoint(save_dir: Path) -> dict:
    return torch.load(save_dir / "last.pt", weights_only=True)


def metrics(save_dir: Path) -> list[dict]:
    with open(save_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- every method, hook level --------------------------------------------------------------------

def test_every_method_is_listed_with_a_one_line_summary(capsys):
    assert run_cli(["--strategy", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == list(STRATEGIES)
    assert {"fedprox", "fedbn", "fedmri", "pfl", "local", "central"} <= set(STRATEGIES)


SHARED = {  # method, flags -> the oracle for "this key is aggregated"
    ("fedavg", ()): lambda k: True,
    ("fedprox", ()): lambda k: True,
    ("central", ()): lambda k: True,
    ("fedbn", ("--norm", "batch")): lambda k: not NORM_KEY.search(k),
    ("fedbn", ("--norm", "instance_affine")): lambda k: not NORM_KEY.search(k),
    ("fedmri", ()): lambda k: bool(ENCODER_KEY.match(k)),
    ("local", ()): lambda k: False,
    ("pfl", ("--pfl_shared", "decoder")): lambda k: k.startswith(("mapper.", "up_transpose_conv.", "up_conv.")),
    ("pfl", ("--pfl_shared", "encoder")): lambda k: k.startswith("mapper.") or bool(ENCODER_KEY.match(k)),
    ("pfl", ("--pfl_shared", "all")): lambda k: not k.startswith("personal_blocks."),
}


@pytest.mark.parametrize("name, flags", list(SHARED))
def test_aggregate_changes_exactly_the_shared_keys(name, flags):
    strategy, global_state = strategy_and_state(name, *flags)
    clients = [{k: v + 1 for k, v in global_state.items()}, {k: v + 3 for k, v in global_state.items()}]
    new = strategy.aggregate(global_state, clients, [1.0, 1.0])
    assert new.keys() == global_state.keys()
    shared = SHARED[name, flags]
    for k, v in new.items():
        assert strategy.is_shared(k) == shared(k), k
        if shared(k):
            torch.testing.assert_close(v, global_state[k] + 2, msg=k)
        else:
            assert torch.equal(v, global_state[k]), k
    assert any(map(shared, new)) == (name != "local")


def test_fedbn_finds_norm_layers_by_type_with_batch_norm_buffers():
    strategy, state = strategy_and_state("fedbn", "--norm", "batch")
    local = {k for k in state if not strategy.is_shared(k)}
    assert {"down_sample_layers.0.layers.1.running_mean", "up_transpose_conv.0.layers.1.num_batches_tracked",
            "conv.layers.5.weight"} <= local
    assert all(".weight" not in k or k.endswith(("layers.1.weight", "layers.5.weight")) for k in local)


def test_fedbn_with_parameter_free_instance_norm_is_a_user_error(tiny_root, tmp_path, capsys):
    with pytest.raises(UserError, match="--norm instance_affine or --norm batch"):
        STRATEGIES["fedbn"](options("--norm", "instance"))
    assert run_cli(TINY + ["--data_root", str(tiny_root), "--save_dir", str(tmp_path / "r"),
                           "--strategy", "fedbn", "--norm", "instance"]) == 2
    assert "--strategy fedbn needs a U-Net norm with parameters" in capsys.readouterr().err


def test_pfl_blocks_make_the_output_depend_on_the_site_code():
    torch.manual_seed(0)
    model = PersonalizedUnet(code_size=3, chans=4, num_pool_layers=2).eval()
    image = torch.randn(2, 1, 32, 32)
    codes = torch.eye(3)
    outputs = [model(image, code) for code in codes]
    assert outputs[0].shape == (2, 1, 32, 32)
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])
    # A per-sample code gives each sample its own site's reconstruction.
    mixed = model(image, codes[[0, 1]])
    torch.testing.assert_close(mixed[0], outputs[0][0])
    torch.testing.assert_close(mixed[1], outputs[1][1])


def test_pfl_keeps_every_unet_key_and_names_all_stages():
    model = PersonalizedUnet(code_size=2, chans=4, num_pool_layers=2)
    unet_keys = set(Unet(chans=4, num_pool_layers=2).state_dict())
    keys = set(model.state_dict())
    assert unet_keys <= keys
    assert all(k.startswith(("mapper.", "personal_blocks.")) for k in keys - unet_keys)
    staged = [k for k in unet_keys if any(k.startswith(p) for stage in model.stages() for p in stage)]
    assert sorted(staged) == sorted(unet_keys)
    assert len(model.stages()) == len(model.personal_blocks) == 5


# ---- every method, run level ---------------------------------------------------------------------

def test_fedprox_mu_zero_is_fedavg_bit_for_bit(tiny_root, tmp_path):
    common = ["--epochs", "2", "--train_dataset", "FB"]
    fedavg = checkpoint(run(tiny_root, tmp_path / "avg", *common))["model"]
    prox0 = checkpoint(run(tiny_root, tmp_path / "p0", *common, "--strategy", "fedprox", "--mu", "0"))["model"]
    prox = checkpoint(run(tiny_root, tmp_path / "p1", *common, "--strategy", "fedprox", "--mu", "10"))["model"]
    assert same(fedavg, prox0)
    assert not same(fedavg, prox)
    rounds = [r for r in metrics(tmp_path / "p1") if r["split"] == "train"]
    assert float(rounds[0]["prox"]) > 0


def test_fedbn_keeps_norm_layers_per_client(tiny_root, tmp_path):
    ckpt = checkpoint(run(tiny_root, tmp_path / "bn", "--strategy", "fedbn", "--norm", "batch",
                          "--train_dataset", "FB"))
    f, b = (ckpt["clients"][c]["local_weights"] for c in "FB")
    assert f.keys() == b.keys() == {k for k in ckpt["model"] if NORM_KEY.search(k)}
    assert not torch.equal(f["down_sample_layers.0.layers.1.running_mean"],
                           b["down_sample_layers.0.layers.1.running_mean"])
    assert not torch.equal(f["conv.layers.5.weight"], b["conv.layers.5.weight"])


def test_fedmri_contrastive_term_starts_in_round_two_and_resumes_exactly(tiny_root, tmp_path):
    common = ["--strategy", "fedmri", "--train_dataset", "FB"]
    straight = run(tiny_root, tmp_path / "straight", *common, "--epochs", "2")
    train_rows = [r for r in metrics(straight) if r["split"] == "train"]
    assert [float(r["contrastive"]) for r in train_rows if r["round"] == "1"] == [0.0, 0.0]
    assert all(float(r["contrastive"]) > 0 for r in train_rows if r["round"] == "2")
    ckpt = checkpoint(straight)
    f, b = (ckpt["clients"][c]["local_weights"] for c in "FB")
    assert f.keys() == {k for k in ckpt["model"] if not ENCODER_KEY.match(k)}
    assert all(not torch.equal(f[k], b[k]) for k in f)
    # Round 2's negatives are round 1's client encoders: a resumed run must have kept them.
    split = run(tiny_root, tmp_path / "split", *common, "--epochs", "1")
    assert run_cli(["--resume", str(split), "--epochs", "2"]) == 0
    assert same(checkpoint(split)["model"], ckpt["model"])


def test_pfl_personalises_on_its_own_and_an_unseen_site(tiny_root, tmp_path):
    save_dir = run(tiny_root, tmp_path / "pfl", "--strategy", "pfl", "--train_dataset", "FB", "--test_dataset", "H")
    ckpt = checkpoint(save_dir)
    f, b = (ckpt["clients"][c]["local_weights"] for c in "FB")
    assert any(k.startswith("personal_blocks.") for k in f)
    assert not any(k.startswith(("mapper.", "up_conv.")) for k in f)
    # At --chans 4 a gate has one hidden ReLU unit (C/8 rounded up), which may be off for both sites.
    assert all(not torch.equal(f[k], b[k]) for k in f if ".gate." not in k)
    val = {(r["model"], r["site"]) for r in metrics(save_dir) if r["split"] == "val" and r["round"] == "1"}
    assert val == {("F", "F"), ("B", "B"), ("F", "H"), ("B", "H")}


def test_pfl_starts_from_fastmri_weights_with_fresh_personalisation_blocks(tiny_root, tmp_path, monkeypatch):
    weights = Unet(chans=4, num_pool_layers=2).state_dict()
    torch.save(weights, tmp_path / "unet.pt")
    started: dict[str, torch.Tensor] = {}
    prepare = STRATEGIES["pfl"].prepare

    def capture_start(self, exp, model, device):
        started.update({k: v.clone() for k, v in model.state_dict().items()})
        return prepare(self, exp, model, device)

    monkeypatch.setattr(STRATEGIES["pfl"], "prepare", capture_start)
    run(tiny_root, tmp_path / "pfl", "--strategy", "pfl", "--train_dataset", "FB", "--pretrained", str(tmp_path / "unet.pt"))
    assert all(torch.equal(started[k], v) for k, v in weights.items())
    assert any(k.startswith("personal_blocks.") for k in set(started) - set(weights))


def test_local_never_exchanges_weights(tiny_root, tmp_path, monkeypatch):
    initial: dict[str, torch.Tensor] = {}
    build = STRATEGIES["local"].build_model

    def capture_initial(self, clients):
        model = build(self, clients)
        initial.update({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(STRATEGIES["local"], "build_model", capture_initial)
    ckpt = checkpoint(run(tiny_root, tmp_path / "FB", "--strategy", "local", "--train_dataset", "FB", "--epochs", "2"))
    assert same(ckpt["model"], initial)
    f, b = ckpt["clients"]["F"]["local_weights"], ckpt["clients"]["B"]["local_weights"]
    assert f.keys() == b.keys() == initial.keys()
    assert all(not torch.equal(f[k], b[k]) for k in f)
    # Client F ends where it would have had it been the only client.
    alone = checkpoint(run(tiny_root, tmp_path / "F", "--strategy", "local", "--train_dataset", "F", "--epochs", "2"))
    assert same(alone["clients"]["F"]["local_weights"], f)


def test_central_pools_every_site_into_one_client(tiny_root, tmp_path):
    flags = TINY + ["--data_root", str(tiny_root), "--num_users", "8", "--test_dataset", "H"]
    federated = build_experiment(parse_options(flags, "test", "fedavg", ""), STRATEGIES["fedavg"](options()))
    pooled = build_experiment(parse_options(flags, "test", "central", ""), STRATEGIES["central"](options()))
    assert len(federated.clients) == 8 and len(pooled.clients) == 1
    assert pooled.clients[0].num_slices == len(pooled.clients[0].dataset) == sum(
        c.num_slices for c in federated.clients)

    save_dir = run(tiny_root, tmp_path / "central", "--strategy", "central")
    rows = metrics(save_dir)
    assert [r["model"] for r in rows if r["split"] == "train"] == ["B+F+H+I"]
    assert {r["site"] for r in rows if r["split"] == "val" and r["model"] == "global"} == {"B", "F", "H", "I"}
