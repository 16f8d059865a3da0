"""Client-level differential privacy for shared-model aggregation (DP-FedAvg, McMahan et al. 2018),
with its privacy accounting by Google's `dp-accounting` (RDP).

One round's release, over the shared floating entries only:

    update_i  = client_i - global                          (all shared float entries as one vector)
    clipped_i = update_i * min(1, clip / ||update_i||_2)
    new       = global + (sum_i clipped_i + N(0, (noise * clip)^2 I)) / k     k = clients that sent

Uniform weights are part of the mechanism (the accounting assumes every client's contribution is
bounded by `clip`). Shared integer buffers (BatchNorm's step counter) are not released: they keep the
global value. Entries a personalised method keeps local never reach the server and are not covered.

`dp_fedavg` is a pure function of the client states, the global state and a generator, so the
in-process server and a Flower server compute the same numbers from the same seed.

Accounting (`ClientLevelAccountant`) follows how the server samples: every client every round is a
Gaussian mechanism (add/remove-one client, sensitivity `clip`); a fixed number of clients drawn without
replacement (`--frac` < 1) is the subsampled Gaussian of Wang, Balle and Kasiviswanathan (2019), which
dp-accounting supports only for replace-one neighbours, where the sum's sensitivity is 2 * clip: its
noise multiplier is therefore noise / 2. (Accounting fixed-size sampling as Poisson sampling at
q = selected / total would understate epsilon.)
"""
from __future__ import annotations

import zlib
from typing import Sequence

import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from federated.aggregation import weighted_average
from utils.errors import UserError

State = dict[str, torch.Tensor]


def update_norm(client_state: State, global_state: State, keys: Sequence[str]) -> float:
    """L2 norm of client - global over all `keys` together (per-entry norms in their dtype, their
    squares summed in float64)."""
    norms = torch.stack([torch.linalg.vector_norm(client_state[k] - global_state[k]) for k in keys])
    return float(norms.double().square().sum().sqrt())


def clip_state(client_state: State, global_state: State, keys: Sequence[str], clip: float) -> State:
    """The client's state with its update scaled to L2 norm <= `clip`; returned unchanged (the same
    tensors, no arithmetic) when its update is already within the clip."""
    norm = update_norm(client_state, global_state, keys)
    if norm <= clip:
        return client_state
    scale = clip / norm
    return {**client_state,
            **{k: global_state[k] + (client_state[k] - global_state[k]) * scale for k in keys}}


def float_keys(global_state: State, keys: Sequence[str]) -> list[str]:
    return [k for k in keys if global_state[k].is_floating_point()]


def dp_fedavg(global_state: State, client_states: Sequence[State], keys: Sequence[str], clip: float,
              noise_multiplier: float, generator: torch.Generator) -> State:
    """New values of the shared `keys`: the uniform mean of the clipped client states plus Gaussian
    noise of std noise_multiplier * clip / k per entry (k = len(client_states)).

    The noise is drawn on the CPU from `generator` in the order of `keys`, so the result does not
    depend on the device. With noise 0 and a clip above every update norm this is FedAvg's uniform
    `weighted_average` bit for bit. Integer entries among `keys` keep their global value.
    """
    if clip <= 0 or noise_multiplier < 0:
        raise ValueError(f"clip must be positive and noise_multiplier 0 or more, got {clip}, {noise_multiplier}")
    floats = float_keys(global_state, keys)
    clipped = [clip_state(s, global_state, floats, clip) for s in client_states]
    mean = weighted_average(clipped, [1.0] * len(clipped), floats)
    std = noise_multiplier * clip / len(client_states)
    for k in floats:
        noise = torch.randn(mean[k].shape, generator=generator, dtype=mean[k].dtype)
        mean[k] = mean[k] + (noise * std).to(mean[k].device)
    return {**{k: global_state[k] for k in keys}, **mean}


class ClientLevelAccountant:
    """Epsilon at `delta` of the rounds released so far, by dp-accounting's RDP accountant.

    Every round samples `sample_size` of `population` clients (the same each round of a run).
    """

    def __init__(self, noise_multiplier: float, delta: float):
        self.noise_multiplier, self.delta = noise_multiplier, delta
        self.rounds = 0
        self.sampling: tuple[int, int] | None = None  # (sample_size, population)

    def event(self, sample_size: int, population: int) -> tuple[dp_event.DpEvent, rdp.NeighborRel]:
        """One round's DP event and the neighbouring relation it is accounted under."""
        if sample_size >= population:
            return dp_event.GaussianDpEvent(self.noise_multiplier), rdp.NeighborRel.ADD_OR_REMOVE_ONE
        return (dp_event.SampledWithoutReplacementDpEvent(
                    population, sample_size, dp_event.GaussianDpEvent(self.noise_multiplier / 2)),
                rdp.NeighborRel.REPLACE_ONE)

    def epsilon(self, rounds: int | None = None) -> float:
        """Epsilon after `rounds` rounds (default: those spent); 0 before any."""
        rounds = self.rounds if rounds is None else rounds
        if rounds == 0 or self.sampling is None:
            return 0.0
        event, relation = self.event(*self.sampling)
        accountant = rdp.RdpAccountant(neighboring_relation=relation)
        accountant.compose(event, rounds)
        return float(accountant.get_epsilon(self.delta))

    def would_exceed(self, max_epsilon: float, sample_size: int, population: int) -> bool:
        """Whether one more round would take epsilon above `max_epsilon`."""
        self._check_sampling(sample_size, population)
        saved, self.sampling = self.sampling, (sample_size, population)
        try:
            return self.epsilon(self.rounds + 1) > max_epsilon
        finally:
            self.sampling = saved

    def spend(self, sample_size: int, population: int) -> float:
        """Account one released round; returns the epsilon after it."""
        self._check_sampling(sample_size, population)
        self.sampling = (sample_size, population)
        self.rounds += 1
        return self.epsilon()

    def _check_sampling(self, sample_size: int, population: int) -> None:
        if self.sampling is not None and self.sampling != (sample_size, population):
            raise ValueError(f"the accounting assumes the same sampling every round: {self.sampling} "
                             f"then {(sample_size, population)}")

    def state_dict(self) -> dict:
        return {"rounds": self.rounds, "sampling": self.sampling}

    def load_state_dict(self, state: dict) -> None:
        self.rounds = state["rounds"]
        self.sampling = tuple(state["sampling"]) if state["sampling"] is not None else None


def add_privacy_arguments(group) -> None:
    group.add_argument("--dp_clip", type=float, default=None,
                       help="client-level DP (DP-FedAvg): L2 clip of each client's update of the shared "
                            "weights; with --dp_noise. Aggregation is then uniform")
    group.add_argument("--dp_noise", type=float, default=None,
                       help="noise multiplier: Gaussian noise of std dp_noise * dp_clip added to the sum of "
                            "the clipped updates")
    group.add_argument("--dp_delta", type=float, default=1e-5, help="delta at which epsilon is reported")
    group.add_argument("--dp_max_epsilon", type=float, default=None,
                       help="stop the run before a round would take epsilon above this: client-level DP's, "
                            "or with DP-SGD any selected client's")


def check_privacy_options(opts) -> None:
    """One-line errors for the DP flags (before anything is written)."""
    if (opts.dp_clip is None) != (opts.dp_noise is None):
        raise UserError("--dp_clip and --dp_noise go together: give both (or neither)")
    if opts.dp_max_epsilon is not None and opts.dp_max_epsilon <= 0:
        raise UserError(f"--dp_max_epsilon {opts.dp_max_epsilon}: must be positive")
    if opts.dp_clip is None:
        if opts.dp_max_epsilon is not None and getattr(opts, "dpsgd_noise", None) is None:
            raise UserError("--dp_max_epsilon needs DP: add --dp_clip and --dp_noise (client-level) or "
                            "--dpsgd_noise and --dpsgd_clip (DP-SGD)")
        return
    if opts.dp_clip <= 0:
        raise UserError(f"--dp_clip {opts.dp_clip}: must be positive")
    if opts.dp_noise < 0:
        raise UserError(f"--dp_noise {opts.dp_noise}: must be 0 or more")
    if not 0 < opts.dp_delta < 1:
        raise UserError(f"--dp_delta {opts.dp_delta}: must be in (0, 1)")
    if opts.weighting == "samples":
        raise UserError("--weighting samples: DP-FedAvg's accounting needs uniform weights; drop --weighting "
                        "samples or the --dp_ flags")


class ClientLevelDP:
    """DP-FedAvg for one run: the noise generator (seeded from --seed, saved in checkpoints), the
    accountant and the budget."""

    def __init__(self, opts):
        self.clip, self.noise, self.max_epsilon = opts.dp_clip, opts.dp_noise, opts.dp_max_epsilon
        self.generator = torch.Generator().manual_seed(zlib.crc32(f"{opts.seed}:dp_fedavg".encode()))
        self.accountant = ClientLevelAccountant(opts.dp_noise, opts.dp_delta)

    @classmethod
    def from_options(cls, opts) -> "ClientLevelDP | None":
        return cls(opts) if opts.dp_clip is not None else None

    def aggregate(self, global_state: State, client_states: Sequence[State], keys: Sequence[str]) -> State:
        return dp_fedavg(global_state, client_states, keys, self.clip, self.noise, self.generator)

    def stop_reason(self, sample_size: int, population: int) -> str | None:
        """Why the next round must not run (None: it may)."""
        if self.max_epsilon is None or not self.accountant.would_exceed(self.max_epsilon, sample_size, population):
            return None
        return (f"one more round would take epsilon above --dp_max_epsilon {self.max_epsilon:g} "
                f"(delta {self.accountant.delta:g}); spent so far: {self.accountant.epsilon():.4g}")

    def spend(self, rnd: int, sample_size: int, population: int) -> dict:
        """Accounts round `rnd`; its metrics row."""
        eps = self.accountant.spend(sample_size, population)
        return {"round": rnd, "model": "global", "site": "all", "split": "privacy",
                "epsilon": eps, "delta": self.accountant.delta}

    def summary(self) -> str:
        return (f"client-level DP: epsilon {self.accountant.epsilon():.4g} at delta {self.accountant.delta:g} "
                f"after {self.accountant.rounds} rounds (--dp_clip {self.clip:g}, --dp_noise {self.noise:g})")

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.accountant.load_state_dict(state["accountant"])
