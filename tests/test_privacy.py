"""Client-level DP-FedAvg (federated/privacy.py): clipping, noise and accounting."""
import math

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from federated.aggregation import weighted_average
from federated.privacy import ClientLevelAccountant, dp_fedavg, update_norm
from models.unet import Unet


def states(n: int = 4, scale: float = 1e-2):
    torch.manual_seed(0)
    model = Unet(chans=4, num_pool_layers=2, norm="batch")  # has integer buffers too
    g = {k: v.clone() for k, v in model.state_dict().items()}
    clients = []
    for _ in range(n):
        s = {k: (v + scale * torch.randn_like(v)) if v.is_floating_point() else v + 3 for k, v in g.items()}
        clients.append(s)
    return g, clients


def test_no_noise_large_clip_is_fedavg_bit_for_bit():
    g, clients = states()
    keys = [k for k in g if g[k].is_floating_point()]
    big = 10 * max(update_norm(s, g, keys) for s in clients)
    out = dp_fedavg(g, clients, list(g), big, 0.0, torch.Generator().manual_seed(1))
    ref = weighted_average(clients, [1.0] * len(clients), keys)
    for k in keys:
        assert torch.equal(out[k], ref[k]), k
    # Integer buffers are not released: they keep the global value.
    for k in g:
        if not g[k].is_floating_point():
            assert torch.equal(out[k], g[k])


def test_small_clip_bounds_every_contribution():
    from federated.privacy import clip_state, float_keys
    g, clients = states(scale=1.0)
    keys = float_keys(g, list(g))
    clip = 0.5
    assert all(update_norm(s, g, keys) > clip for s in clients)
    for s in clients:
        assert update_norm(clip_state(s, g, keys, clip), g, keys) <= clip * (1 + 1e-5)
    # The aggregate moves by at most the clip (the mean of vectors each within the clip).
    out = dp_fedavg(g, clients, list(g), clip, 0.0, torch.Generator().manual_seed(1))
    assert update_norm(out, g, keys) <= clip * (1 + 1e-5)


def test_noise_std_is_noise_times_clip_over_clients():
    g = {"w": torch.zeros(200_000)}
    clients = [{"w": torch.zeros(200_000)} for _ in range(5)]
    out = dp_fedavg(g, clients, ["w"], 2.0, 1.5, torch.Generator().manual_seed(3))
    expected = 1.5 * 2.0 / 5
    assert out["w"].std().item() == pytest.approx(expected, rel=0.01)
    assert abs(out["w"].mean().item()) < 5 * expected / math.sqrt(200_000)


def test_noise_is_reproducible_from_the_generator_state():
    g, clients = states()
    gen = torch.Generator().manual_seed(7)
    saved = gen.get_state()
    a = dp_fedavg(g, clients, list(g), 0.1, 1.0, gen)
    gen.set_state(saved)
    b = dp_fedavg(g, clients, list(g), 0.1, 1.0, gen)
    assert all(torch.equal(a[k], b[k]) for k in g)


@pytest.mark.parametrize("sample_size,population", [(4, 4), (2, 8)])
def test_epsilon_is_dp_accountings_own(sample_size, population):
    noise, delta, rounds = 1.1, 1e-5, 7
    acc = ClientLevelAccountant(noise, delta)
    for _ in range(rounds):
        eps = acc.spend(sample_size, population)
    if sample_size == population:
        ref = rdp.RdpAccountant(neighboring_relation=rdp.NeighborRel.ADD_OR_REMOVE_ONE)
        ref.compose(dp_event.GaussianDpEvent(noise), rounds)
    else:  # replace-one: the clipped sum's sensitivity is 2 * clip
        ref = rdp.RdpAccountant(neighboring_relation=rdp.NeighborRel.REPLACE_ONE)
        ref.compose(dp_event.SampledWithoutReplacementDpEvent(
            population, sample_size, dp_event.GaussianDpEvent(noise / 2)), rounds)
    assert eps == ref.get_epsilon(delta)
    assert math.isfinite(eps) and eps > 0


def test_budget_check_and_resume_of_the_accountant():
    acc = ClientLevelAccountant(1.0, 1e-5)
    eps1 = acc.spend(4, 4)
    assert not acc.would_exceed(eps1 * 10, 4, 4)
    assert acc.would_exceed(eps1, 4, 4)  # a second round costs more than the first alone
    restored = ClientLevelAccountant(1.0, 1e-5)
    restored.load_state_dict(acc.state_dict())
    assert restored.spend(4, 4) == acc.spend(4, 4)
    assert ClientLevelAccountant(0.0, 1e-5).spend(4, 4) == math.inf


# ---- through the runner ------------------------------------------------------------------------
import csv

from tests.conftest import TINY_RUN, run_cli, straight_and_resumed

DP = ["--dp_clip", "0.05", "--dp_noise", "1.0", "--train_dataset", "BF", "--test_dataset", "H"]


def read_rows(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_run_logs_epsilon_and_resumes_bit_for_bit(tiny_root, tmp_path):
    base = TINY_RUN + ["--data_root", str(tiny_root)] + DP
    full, part = straight_and_resumed(base, tmp_path)
    eps = [float(r["epsilon"]) for r in read_rows(full) if r["split"] == "privacy"]
    ref = ClientLevelAccountant(1.0, 1e-5)
    assert eps == pytest.approx([ref.spend(2, 2) for _ in range(3)], rel=1e-5)  # metrics.csv keeps 6 digits
    a = torch.load(full / "last.pt", weights_only=True)["model"]
    b = torch.load(part / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_max_epsilon_stops_before_the_round(tiny_root, tmp_path):
    first = ClientLevelAccountant(1.0, 1e-5).spend(2, 2)
    run = tmp_path / "run"
    args = TINY_RUN + ["--data_root", str(tiny_root), "--epochs", "3", "--save_dir", str(run),
                       "--dp_max_epsilon", str(first * 1.01)] + DP
    assert run_cli(args) == 1
    assert torch.load(run / "last.pt", weights_only=True)["round"] == 1


@pytest.mark.parametrize("flags,message", [
    (["--dp_clip", "1", "--dp_noise", "-1"], "--dp_noise -1.0: must be 0 or more"),
    (["--dp_clip", "0", "--dp_noise", "1"], "--dp_clip 0.0: must be positive"),
    (["--dp_clip", "1", "--dp_noise", "1", "--dp_delta", "1"], "--dp_delta 1.0: must be in (0, 1)"),
    (["--dp_clip", "1", "--dp_noise", "1", "--weighting", "samples"], "--weighting samples"),
    (["--dp_clip", "1"], "--dp_clip and --dp_noise go together"),
])
def test_bad_dp_flags_one_line_exit_2(tiny_root, tmp_path, capsys, flags, message):
    run = tmp_path / "run"
    assert run_cli(TINY_RUN + ["--data_root", str(tiny_root), "--save_dir", str(run)] + flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not run.exists()
