"""FL-MRCM does what the paper says: the adversarial term trains the U-Net encoder, and nothing else
about the method changes the U-Net's updates."""
from __future__ import annotations

import shlex

import pytest
import torch

from federated.client import Client
from federated.exchange import start_round
from federated.experiment import build_experiment, site_train_set
from federated.strategies.mrcm import MRCM
from options import parse_options
from tests.conftest import TINY_RUN, run_cli
from tests.test_fl_mr import read_metrics
from utils.seeding import seed_everything

SEED_COMMAND = ("--phase train --dataset mri --model unet --epochs 50 --challenge singlecoil --local_bs 16 "
                "--num_users 4 --local_ep 2 --train_dataset BFHI --test_dataset B --sequence T1 --accelerations 4 "
                "--center-fractions 0.08 --val_sample_rate 1.0 --save_dir {save_dir} --verbose")
UNSEEN = ["--train_dataset", "FHI", "--num_users", "3", "--test_dataset", "B"]


def one_step_grads(tiny_root, lambda_adv: float, mode: str = "images") -> dict[str, torch.Tensor]:
    """Gradients of one MRCM local step of the first source client."""
    opts = parse_options(TINY_RUN + UNSEEN + ["--data_root", str(tiny_root), "--lambda_adv", str(lambda_adv),
                                              "--mrcm_target", mode, "--resolution", "32"],
                         "main_fl_mrcm.py", "mrcm", "")
    seed_everything(0)
    strategy = MRCM(opts)
    exp = build_experiment(opts, strategy)
    model = strategy.build_model(exp.train_sites)
    device = torch.device("cpu")
    strategy.prepare(exp, model, device)
    client: Client = exp.clients[0]
    strategy.init_client(client, model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    contexts = {site: strategy.site_context(1, model, start, site_train_set(exp, site, opts), seed)
                for site, seed in strategy.context_sites(1, exp).items()}
    start_round(strategy, 1, model, start, [client], strategy.round_payload(1, contexts))
    client.dataset.set_epoch(1)
    batch = torch.utils.data.default_collate([client.dataset[i] for i in range(4)])
    loss, logs = strategy.training_loss(client, model, strategy.task.to_device(batch, device))
    assert {"adv_loss", "disc_loss", "disc_acc", "recon_loss"} <= set(logs)
    model.zero_grad()
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["images", "features"])
def test_adversarial_term_reaches_the_encoder_only(tiny_root, mode):
    with_adv, without = one_step_grads(tiny_root, 1.0, mode), one_step_grads(tiny_root, 0.0, mode)
    encoder = [k for k in with_adv if k.startswith(("down_sample_layers.", "conv."))]
    decoder = [k for k in with_adv if k not in encoder]
    assert any(not torch.equal(with_adv[k], without[k]) for k in encoder)
    assert all(torch.equal(with_adv[k], without[k]) for k in decoder)
    assert all(with_adv[k].abs().sum() > 0 for k in encoder)


def test_lambda_zero_equals_fl_mr_bit_for_bit(tiny_root, tmp_path):
    common = TINY_RUN + UNSEEN + ["--data_root", str(tiny_root), "--epochs", "2"]
    assert run_cli(common + ["--save_dir", str(tmp_path / "mr")], "main_fl_mr.py", "fedavg") == 0
    assert run_cli(common + ["--lambda_adv", "0", "--save_dir", str(tmp_path / "mrcm")], "main_fl_mrcm.py", "mrcm") == 0
    a = torch.load(tmp_path / "mr" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "mrcm" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_restores_discriminators_and_their_optimisers(tiny_root, tmp_path):
    common = TINY_RUN + UNSEEN + ["--data_root", str(tiny_root)]
    assert run_cli(common + ["--epochs", "2", "--save_dir", str(tmp_path / "straight")], "main_fl_mrcm.py", "mrcm") == 0
    assert run_cli(common + ["--epochs", "1", "--save_dir", str(tmp_path / "split")], "main_fl_mrcm.py", "mrcm") == 0
    assert run_cli(["--resume", str(tmp_path / "split"), "--epochs", "2"], "main_fl_mrcm.py", "mrcm") == 0
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for name in ("F", "H", "I"):
        da, db = a["clients"][name]["extra"], b["clients"][name]["extra"]
        assert all(torch.equal(da["disc"][k], db["disc"][k]) for k in da["disc"])
        sa, sb = da["disc_opt"]["state"], db["disc_opt"]["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["square_avg"], sb[i]["square_avg"]) for i in sa)


def test_seed_command_and_metrics(tiny_root, tmp_path):
    args = shlex.split(SEED_COMMAND.format(save_dir=tmp_path / "run")) + ["--epochs", "1", "--data_root", str(tiny_root)]
    assert run_cli(args, "main_fl_mrcm.py", "mrcm") == 0
    rows = read_metrics(tmp_path / "run")
    train = {r["model"]: r for r in rows if r["split"] == "train"}
    # B is the target and trains supervised only; the three sources report their discriminators.
    assert train["B"]["disc_loss"] == ""
    assert all(float(train[s]["disc_loss"]) > 0 and 0 <= float(train[s]["disc_acc"]) <= 1 for s in "FHI")
    assert any(r["domain_gap"] not in ("", None) for r in rows)


def test_unseen_target_features_mode_runs(tiny_root, tmp_path):
    args = TINY_RUN + UNSEEN + ["--data_root", str(tiny_root), "--mrcm_target", "features",
                                "--save_dir", str(tmp_path / "run")]
    assert run_cli(args, "main_fl_mrcm.py", "mrcm") == 0
    rows = read_metrics(tmp_path / "run")
    assert {r["model"] for r in rows if r["split"] == "train"} == {"F", "H", "I"}


def test_test_phase_evaluates_the_global_model_on_the_target_only(tiny_root, tmp_path):
    """The discriminators and the target's training images are for training: --phase test neither
    builds them nor reads any site but the one tested."""
    run = tmp_path / "run"
    assert run_cli(TINY_RUN + UNSEEN + ["--data_root", str(tiny_root), "--save_dir", str(run)],
                   "main_fl_mrcm.py", "mrcm") == 0
    assert run_cli(["--phase", "test", "--checkpoint", str(run / "last.pt"), "--data_root", str(tiny_root),
                    "--save_dir", str(run), "--quiet"], "main_fl_mrcm.py", "mrcm") == 0
    assert sorted(p.name for p in (run / "test" / "reconstructions").iterdir()) == ["B"]
    tested = (run / "test" / "metrics.csv").read_text().splitlines()[1:]
    assert [line.split(",")[1:3] for line in tested] == [["zero_filled", "B"], ["global", "B"]]
