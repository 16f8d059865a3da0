"""Sample-level DP-SGD (federated/dpsgd.py): Opacus's per-sample clipping and noise against a manual
per-sample loop on the same batch, the per-client epsilon against Opacus's RDP analysis, resume, and
the one-line refusals."""
from __future__ import annotations

import argparse
import csv
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from federated.dpsgd import PrivateTraining, check_dpsgd_options, epsilon_after, sampling
from federated.strategies import STRATEGIES
from federated.tasks import TASKS
from models.unet import Unet
from tests.conftest import TINY, TINY_RUN, run_cli, straight_and_resumed
from utils.errors import UserError

B = 4  # the batch in the gradient tests: N / ceil(N / local_bs) = 8 / 2, the expected Poisson batch


def dp_opts(noise: float, clip: float, **kw) -> argparse.Namespace:
    return argparse.Namespace(dpsgd_noise=noise, dpsgd_clip=clip, dp_delta=1e-5, local_bs=B, **kw)


def model_and_batch(norm: str, seed: int = 0):
    torch.manual_seed(seed)
    model = Unet(chans=4, num_pool_layers=2, norm=norm)
    image, target = torch.randn(B, 1, 16, 16), torch.randn(B, 1, 16, 16)
    return model, image, target


def manual_per_sample_grads(model: nn.Module, image, target) -> list[list[torch.Tensor]]:
    """The gradient of each sample's own loss, one backward per sample, without any hooks."""
    grads = []
    for i in range(len(image)):
        model.zero_grad(set_to_none=True)
        F.l1_loss(model(image[i:i + 1]), target[i:i + 1]).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


def dp_gradient(model: nn.Module, optimizer, image, target, noise: float, clip: float) -> list[torch.Tensor]:
    """The gradient DP-SGD hands the optimiser for this batch (Opacus's clip, sum, noise, scale)."""
    with PrivateTraining(model, optimizer, 2 * B, dp_opts(noise, clip), torch.Generator().manual_seed(0),
                         None, torch.device("cpu")) as private:
        private.optimizer.zero_grad(set_to_none=True)
        F.l1_loss(model(image), target).backward()
        assert private.optimizer.pre_step()
        return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("norm", ["instance", "instance_affine"])
def test_no_noise_large_clip_is_the_plain_gradient_and_step(norm):
    model, image, target = model_and_batch(norm)
    per_sample = manual_per_sample_grads(model, image, target)
    norms = [math.sqrt(sum(float(g.square().sum()) for g in gs)) for gs in per_sample]
    big = 10 * max(norms)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    dp = dp_gradient(model, torch.optim.RMSprop(model.parameters(), lr=1e-3), image, target, 0.0, big)
    mean = [sum(gs[j] for gs in per_sample) / B for j in range(len(dp))]
    model.zero_grad(set_to_none=True)
    F.l1_loss(model(image), target).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    for d, m, p in zip(dp, mean, plain):
        torch.testing.assert_close(d, m, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(d, p, rtol=1e-4, atol=1e-7)

    # One RMSprop step each from the same weights: DP-SGD's equals the plain one.
    def one_step(private: bool) -> dict:
        model.load_state_dict(start)
        opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
        if private:
            with PrivateTraining(model, opt, 2 * B, dp_opts(0.0, big), torch.Generator().manual_seed(0), None,
                                 torch.device("cpu")) as p:
                p.optimizer.zero_grad(set_to_none=True)
                F.l1_loss(model(image), target).backward()
                p.step()
        else:
            opt.zero_grad(set_to_none=True)
            F.l1_loss(model(image), target).backward()
            opt.step()
        return {k: v.clone() for k, v in model.state_dict().items()}
    a, b = one_step(True), one_step(False)
    assert any(not torch.equal(a[k], start[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_small_clip_bounds_every_per_sample_contribution():
    model, image, target = model_and_batch("instance_affine")
    per_sample = manual_per_sample_grads(model, image, target)
    norms = [math.sqrt(sum(float(g.square().sum()) for g in gs)) for gs in per_sample]
    clip = 0.5 * min(norms)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected_batch = B  # int(2B * 1/2)
    for i in range(B):
        # A batch of one sample: the released gradient times the expected batch is its clipped gradient.
        g = dp_gradient(model, opt, image[i:i + 1], target[i:i + 1], 0.0, clip)
        contribution = math.sqrt(sum(float((x * expected_batch).square().sum()) for x in g))
        assert contribution <= clip * (1 + 1e-5)
        assert contribution == pytest.approx(clip, rel=1e-4)  # clipped to the bound, not below
    # The whole batch: the sum of each sample's gradient scaled to the clip (manual loop).
    g = dp_gradient(model, opt, image, target, 0.0, clip)
    for j, x in enumerate(g):
        ref = sum(gs[j] * min(1.0, clip / (n + 1e-6)) for gs, n in zip(per_sample, norms)) / expected_batch
        # atol: float32 rounding of near-zero entries; AVX2 and AVX-512 kernels sum in other orders.
        torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-7)


def test_noise_std_and_the_empty_draw():
    model, _, _ = model_and_batch("instance")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    noise, clip = 1.5, 2.0
    with PrivateTraining(model, opt, 2 * B, dp_opts(noise, clip), torch.Generator().manual_seed(0), None,
                         torch.device("cpu")) as private:
        private.optimizer.zero_grad(set_to_none=True)
        for p in private.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape))
        assert private.optimizer.pre_step()
        released = torch.cat([p.grad.flatten() for p in model.parameters()])
        # An empty Poisson draw releases noise only, and is accounted as a step.
        private.empty_step()
        assert private.accountant.history == [(noise, 0.5, 1)]
    assert released.std().item() == pytest.approx(noise * clip / B, rel=0.05)
    # The hooks are gone and the LeakyReLUs are in place again: the shared model is as before.
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.LeakyReLU))
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_varnet_really_fails_in_opacus_hooks():
    """The reason --model varnet is refused; if Opacus learns VarNet, this fails and the refusal goes."""
    from opacus import GradSampleModule
    from models.varnet import VarNet
    model = VarNet(num_cascades=1, sens_chans=2, sens_pools=1, chans=2, pools=1)
    for m in model.modules():
        if isinstance(m, nn.LeakyReLU):
            m.inplace = False
    g = torch.Generator().manual_seed(0)
    kspace = torch.randn((2, 2, 16, 12), dtype=torch.complex64, generator=g)
    mask = torch.rand(2, 1, 1, 12, generator=g) < 0.3
    mask[..., 4:8] = True
    with torch.no_grad():
        assert model(kspace * mask, mask, None).shape == (2, 16, 12)  # the plain model runs
    gsm = GradSampleModule(model)
    with pytest.raises(TypeError, match="missing 3 required positional arguments"):
        model(kspace * mask, mask, None).abs().mean().backward()
    gsm._close()


# ---- through the runner ------------------------------------------------------------------------
DPSGD = ["--dpsgd_noise", "1.1", "--dpsgd_clip", "1.0", "--train_dataset", "BF", "--test_dataset", "H"]


def epsilon_rows(run):
    with open(run / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r["split"] == "privacy" and r.get("mechanism") == "dpsgd"]


def opacus_epsilon(noise: float, sample_rate: float, steps: int, delta: float) -> float:
    """Opacus's RDP analysis directly (not its accountant object)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise, steps=steps, orders=orders)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


def test_epsilon_per_client_is_opacus_and_resume_is_the_same_run(tiny_root, tmp_path):
    base = TINY_RUN + ["--data_root", str(tiny_root)] + DPSGD
    full, part = straight_and_resumed(base, tmp_path)

    rows = epsilon_rows(full)
    assert sorted((int(r["round"]), r["model"]) for r in rows) == [(r, c) for r in (1, 2, 3) for c in "BF"]
    slices = TINY.train * TINY.slices  # each training site's slices
    q, steps_per_round = sampling(slices, 4)
    assert (q, steps_per_round) == (0.5, 2)
    opts = argparse.Namespace(local_bs=4, local_ep=1, dpsgd_noise=1.1, dp_delta=1e-5)
    for r in rows:
        ref = opacus_epsilon(1.1, q, steps_per_round * int(r["round"]), 1e-5)
        assert float(r["epsilon"]) == pytest.approx(ref, rel=1e-5)  # metrics.csv keeps 6 digits
        # what the budget stop computes server-side from the rounds trained
        assert epsilon_after(slices, int(r["round"]), opts) == pytest.approx(ref, rel=1e-9)
        assert r["site"] == r["model"] and float(r["delta"]) == 1e-5

    assert [(r["round"], r["model"], r["epsilon"]) for r in epsilon_rows(part)] == \
        [(r["round"], r["model"], r["epsilon"]) for r in rows]
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["clients"]["B"]["dpsgd_history"] == b["clients"]["B"]["dpsgd_history"] == [[1.1, 0.5, 6]]


def test_max_epsilon_stops_a_dpsgd_run_before_a_client_would_pass_it(tiny_root, tmp_path, capsys):
    q, steps_per_round = sampling(TINY.train * TINY.slices, 4)
    budget = opacus_epsilon(1.1, q, 2 * steps_per_round, 1e-5) * 1.001  # rounds 1 and 2 fit, 3 does not
    run = tmp_path / "run"
    args = TINY_RUN + ["--data_root", str(tiny_root), "--epochs", "3", "--save_dir", str(run),
                       "--dp_max_epsilon", str(budget)] + DPSGD
    assert run_cli(args) == 1
    err = capsys.readouterr().err
    assert "round 3: one more round would take client B's DP-SGD epsilon to" in err
    assert f"--dp_max_epsilon {budget:g}" in err
    assert torch.load(run / "last.pt", weights_only=True)["round"] == 2
    assert sorted({int(r["round"]) for r in epsilon_rows(run)}) == [1, 2]


@pytest.mark.parametrize("flags,message", [
    (["--dpsgd_noise", "-1", "--dpsgd_clip", "1"], "--dpsgd_noise -1.0: must be 0 or more"),
    (["--dpsgd_noise", "1", "--dpsgd_clip", "0"], "--dpsgd_clip 0.0: must be positive"),
    (["--dpsgd_noise", "1", "--dpsgd_clip", "-2"], "--dpsgd_clip -2.0: must be positive"),
    (["--dpsgd_noise", "1"], "--dpsgd_noise and --dpsgd_clip go together"),
    (["--dpsgd_noise", "1", "--dpsgd_clip", "1", "--dp_delta", "0"], "--dp_delta 0.0: must be in (0, 1)"),
    (["--dpsgd_noise", "1", "--dpsgd_clip", "1", "--dp_max_epsilon", "0"], "--dp_max_epsilon 0.0: must be positive"),
    (["--dp_max_epsilon", "5"], "--dp_max_epsilon needs DP"),
    (["--dpsgd_noise", "1", "--dpsgd_clip", "1", "--norm", "batch"], "--norm batch: Opacus cannot train"),
    (["--dpsgd_noise", "1", "--dpsgd_clip", "1", "--model", "varnet"], "--model varnet with DP-SGD"),
    (["--dpsgd_noise", "1", "--dpsgd_clip", "1", "--task", "synthesis"], "--task synthesis with DP-SGD"),
    (["--dpsgd_noise", "1", "--dpsgd_clip", "1", "--strategy", "mrcm"], "--strategy mrcm with DP-SGD"),
    (["--dpsgd_noise", "1", "--dpsgd_clip", "1", "--strategy", "pfl"], "--strategy pfl with DP-SGD"),
    (["--dpsgd_noise", "1", "--dpsgd_clip", "1", "--amp", "bf16"], "--amp bf16: not supported with DP-SGD"),
    (["--dp_noise", "1", "--dp_clip", "1", "--strategy", "local"], "--dp_clip with --strategy local"),
    (["--dp_noise", "1", "--dp_clip", "1", "--strategy", "central"], "--dp_clip with --strategy central"),
])
def test_bad_dpsgd_flags_one_line_exit_2(tiny_root, tmp_path, capsys, flags, message):
    run = tmp_path / "run"
    assert run_cli(TINY_RUN + ["--data_root", str(tiny_root), "--save_dir", str(run)] + flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not run.exists()


def test_dpsgd_under_torchrun_is_refused():
    opts = argparse.Namespace(dpsgd_noise=1.0, dpsgd_clip=1.0, dp_delta=1e-5, amp="off", norm="instance",
                              chans=4, num_pools=2, drop_prob=0.0)
    check_dpsgd_options(opts, TASKS["unet"](opts), STRATEGIES["fedavg"], under_torchrun=False)
    with pytest.raises(UserError, match="run without torchrun"):
        check_dpsgd_options(opts, TASKS["unet"](opts), STRATEGIES["fedavg"], under_torchrun=True)


@pytest.mark.parametrize("strategy", ["fedavg", "fedbn", "local", "central", "fedprox", "fedmri"])
def test_dpsgd_runs_with_the_supported_strategies(tiny_root, tmp_path, strategy):
    run = tmp_path / "run"
    norm = ["--norm", "instance_affine"] if strategy == "fedbn" else []
    assert run_cli(TINY_RUN + ["--data_root", str(tiny_root), "--save_dir", str(run), "--strategy", strategy,
                               "--epochs", "2"] + DPSGD + norm) == 0
    rows = epsilon_rows(run)
    clients = {"central": 1}.get(strategy, 2)
    assert len(rows) == 2 * clients and all(float(r["epsilon"]) > 0 for r in rows)
    if strategy in ("fedprox", "fedmri"):  # the weight term is there in round 2 (FedMRI's from round 2 on)
        with open(run / "metrics.csv") as f:
            train = [r for r in csv.DictReader(f) if r["split"] == "train" and r["round"] == "2"]
        term = {"fedprox": "prox", "fedmri": "contrastive"}[strategy]
        assert all(float(r[term]) > 0 and float(r["recon_loss"]) > 0 for r in train)


def test_weight_term_gradient_is_added_after_the_noise():
    """FedProx's proximal term under DP-SGD: with noise 0 and a large clip the step is the plain step
    on data loss + term, so the term is neither dropped nor clipped."""
    model, image, target = model_and_batch("instance")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    anchor = {k: v.detach() + 0.05 * torch.randn_like(v) for k, v in model.named_parameters()}
    mu = 3.0

    def term():
        return mu / 2 * sum((p - anchor[k]).square().sum() for k, p in model.named_parameters())

    def one_step(private: bool, with_term: bool = True) -> dict:
        model.load_state_dict(start)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if private:
            with PrivateTraining(model, opt, 2 * B, dp_opts(0.0, 1e6), torch.Generator().manual_seed(0), None,
                                 torch.device("cpu")) as p:
                p.optimizer.zero_grad(set_to_none=True)
                F.l1_loss(model(image), target).backward()
                p.step(term() if with_term else None)
        else:
            opt.zero_grad(set_to_none=True)
            (F.l1_loss(model(image), target) + term()).backward()
            opt.step()
        return {k: v.clone() for k, v in model.state_dict().items()}
    a, b, dropped = one_step(True), one_step(False), one_step(True, with_term=False)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert any((dropped[k] - b[k]).abs().max() > 1e-3 for k in a)  # the term matters at this mu
