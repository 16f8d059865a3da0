"""Sample-level differential privacy inside a client's local update: DP-SGD (Abadi et al. 2016) with
Opacus (`--dpsgd_noise`, `--dpsgd_clip`), accounted per client by Opacus's RDP accountant.

One local step, over the client's trainable parameters (the shared and the local ones alike):

    batch     = Poisson sample: every training slice joins with probability q, independently
    g_i       = per-sample gradient of slice i's loss (Opacus's GradSampleModule hooks)
    grad      = (sum_i g_i * min(1, clip / ||g_i||_2) + N(0, (noise * clip)^2 I)) / int(q * N)
    then the task's optimiser (RMSprop or Adam) steps with `grad`.

Sampling is Opacus's `UniformWithReplacementSampler` (what `DPDataLoader` uses) driven by the
client's own generator, with DPDataLoader's rate: q = 1 / ceil(N / --local_bs), ceil(N / --local_bs)
steps per local epoch (expected batch N / ceil(N / local_bs) <= local_bs). An empty draw still
releases a noise-only step, as the accounting assumes. Every step is one Sampled Gaussian Mechanism
(noise, q) in the client's RDP accountant; the accountant's history is client state, saved in
checkpoints, so epsilon after a resume is that of the uninterrupted run.

What epsilon means: the client's released model sequence is (epsilon, delta)-DP with respect to
adding or removing one of *that client's* training slices (one slice, not one patient: a volume's
slices are separate records). Clients' guarantees are separate (their data are disjoint). The noise
is drawn from a seeded torch generator (reproducible runs), not Opacus's `secure_mode`.

Supported: the U-Net task with `--norm instance` (no parameters in its norm layers) or
`instance_affine` (Opacus has a per-sample rule for affine InstanceNorm). `--norm batch` mixes
samples within a batch and Opacus's ModuleValidator refuses it. Opacus's backward hooks refuse an
in-place write to a hooked layer's output (affine InstanceNorm, then LeakyReLU(inplace=True), raises),
so during DP-SGD the model's LeakyReLUs run out of place (same values; restored afterwards).

A method's loss term on the weights alone (FedProx's proximal term, FedMRI's contrastive term:
`Strategy.weight_term`) is not per-sample, and Opacus would drop it: its gradient is added after the
clipping and noise (it reads no data, so the step stays private) and the method's objective is kept.
Tasks and strategies where DP-SGD would be wrong or fails refuse in one line (`Task.dpsgd_refusal`,
`Strategy.dpsgd_refusal`).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from typing import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from utils.errors import UserError



def _opacus():
    """Opacus, imported when DP-SGD is asked for (it takes seconds to import)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import opacus
        import opacus.accountants
        import opacus.optimizers
        import opacus.utils.uniform_sampler
        import opacus.validators
    return opacus


def add_dpsgd_arguments(group) -> None:
    group.add_argument("--dpsgd_noise", type=float, default=None,
                       help="sample-level DP-SGD (Opacus) inside every local update: noise multiplier "
                            "(Gaussian noise of std dpsgd_noise * dpsgd_clip on each step's sum of clipped "
                            "per-sample gradients); with --dpsgd_clip. Epsilon per client at --dp_delta")
    group.add_argument("--dpsgd_clip", type=float, default=None,
                       help="DP-SGD: L2 clip of each training slice's gradient (Opacus's max_grad_norm)")


def enabled(opts) -> bool:
    return getattr(opts, "dpsgd_noise", None) is not None


def check_dpsgd_options(opts, task, strategy_cls, under_torchrun: bool) -> None:
    """One-line errors for the DP-SGD flags (before anything is written)."""
    noise, clip = getattr(opts, "dpsgd_noise", None), getattr(opts, "dpsgd_clip", None)
    if (noise is None) != (clip is None):
        raise UserError("--dpsgd_noise and --dpsgd_clip go together: give both (or neither)")
    if noise is None:
        return
    if noise < 0:
        raise UserError(f"--dpsgd_noise {noise}: must be 0 or more")
    if clip <= 0:
        raise UserError(f"--dpsgd_clip {clip}: must be positive")
    if not 0 < opts.dp_delta < 1:
        raise UserError(f"--dp_delta {opts.dp_delta}: must be in (0, 1)")
    if under_torchrun:
        raise UserError("DP-SGD (--dpsgd_noise) runs in one process per client: run without torchrun")
    if getattr(opts, "amp", None) not in (None, "off", False):
        raise UserError(f"--amp {opts.amp}: not supported with DP-SGD (per-sample gradients in float32); "
                        "drop --amp or the --dpsgd_ flags")
    if task.dpsgd_refusal:
        raise UserError(task.dpsgd_refusal)
    if strategy_cls.dpsgd_refusal:
        raise UserError(f"--strategy {strategy_cls.name} with DP-SGD: {strategy_cls.dpsgd_refusal}")
    errors = _opacus().validators.ModuleValidator.validate(task.build_model(), strict=False)
    if errors:
        first = str(errors[0]).split(". ")[0]
        raise UserError(f"--norm {opts.norm}: Opacus cannot train this model with DP-SGD ({first}); "
                        "use --norm instance or instance_affine")


def sampling(num_samples: int, batch_size: int) -> tuple[float, int]:
    """(q, steps per epoch): DPDataLoader's rate 1 / ceil(N / B) and as many steps."""
    steps = math.ceil(num_samples / batch_size)
    return 1.0 / steps, steps


def _collate_or_none(items: list):
    """An empty Poisson draw becomes None (a noise-only step); others collate as usual."""
    return default_collate(items) if items else None


class PrivateTraining:
    """DP-SGD for one client's local update: per-sample gradient hooks on `model`, the DP optimiser
    around the task's `optimizer`, Poisson batches, and the client's accountant.

    Use as a context manager: on exit the hooks are removed from the (shared) model whatever happened.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, num_samples: int, opts,
                 generator: torch.Generator, history: list | None, device: torch.device):
        self.model, self.opts, self.generator = model, opts, generator
        self.noise, self.clip, self.delta = opts.dpsgd_noise, opts.dpsgd_clip, opts.dp_delta
        self.num_samples = num_samples
        self.sample_rate, self.steps_per_epoch = sampling(num_samples, opts.local_bs)
        opacus = _opacus()
        self.accountant = opacus.accountants.RDPAccountant()
        if history:
            self.accountant.history = [tuple(h) for h in history]
        # Noise from a generator of its own, seeded from the client's (checkpointed) generator.
        noise_seed = int(torch.randint(2**62, (1,), generator=generator))
        noise_generator = torch.Generator(device=device).manual_seed(noise_seed)
        # Opacus's own expected batch (make_private's int(N * q)): the mean loss's gradient is divided by it.
        self.optimizer = opacus.optimizers.DPOptimizer(
            optimizer, noise_multiplier=self.noise, max_grad_norm=self.clip,
            expected_batch_size=max(1, int(num_samples * self.sample_rate)), loss_reduction="mean",
            generator=noise_generator)
        self.inplace: list[nn.Module] = []
        self.gsm = None  # the GradSampleModule while training
        self.quiet = warnings.catch_warnings()

    def __enter__(self) -> "PrivateTraining":
        self.quiet.__enter__()
        # The images need no gradient; PyTorch warns that the full backward hooks then fire on outputs.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for m in self.model.modules():
            if getattr(m, "inplace", False) and isinstance(m, (nn.LeakyReLU, nn.ReLU)):
                m.inplace = False
                self.inplace.append(m)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Hooks on the model's own submodules: the strategy keeps calling the plain model.
            self.gsm = _opacus().GradSampleModule(self.model, batch_first=True, loss_reduction="mean")
        return self

    def __exit__(self, *exc) -> None:
        if self.gsm is not None:
            self.gsm._close()  # removes the hooks and every p.grad_sample
        for m in self.inplace:
            m.inplace = True
        self.quiet.__exit__(*exc)

    def batches(self, dataset: Dataset, num_workers: int, device: torch.device) -> Iterator:
        """One epoch of Poisson batches (None for an empty draw)."""
        poisson = _opacus().utils.uniform_sampler.UniformWithReplacementSampler
        sampler = poisson(num_samples=self.num_samples, sample_rate=self.sample_rate, generator=self.generator,
                          steps=self.steps_per_epoch)
        return iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate_or_none,
                               num_workers=num_workers, pin_memory=device.type == "cuda"))

    def step(self, weight_term: torch.Tensor | None = None) -> None:
        """Clip, sum, noise and scale the per-sample gradients (after backward on a batch's data
        loss), add the gradient of the method's `weight_term` (a loss on the weights alone, reading
        no data: `Strategy.weight_term`), and step the task's optimiser; accounts the step."""
        params = self.optimizer.params
        extra = (torch.autograd.grad(weight_term, params, allow_unused=True)
                 if weight_term is not None else [None] * len(params))
        if self.optimizer.pre_step():  # p.grad = (sum of clipped per-sample gradients + noise) / (q N)
            for p, g in zip(params, extra):
                if g is not None:
                    p.grad += g
            self.optimizer.original_optimizer.step()
        self.accountant.step(noise_multiplier=self.noise, sample_rate=self.sample_rate)

    def empty_step(self, weight_term: torch.Tensor | None = None) -> None:
        """The step of an empty Poisson draw: noise only (zero per-sample gradients), plus the
        gradient of the method's weight term."""
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.step(weight_term)

    def history(self) -> list:
        return [list(h) for h in self.accountant.history]

    def epsilon(self) -> float:
        return float(self.accountant.get_epsilon(self.delta)) if self.accountant.history else 0.0


def private_training(client, model: nn.Module, optimizer: torch.optim.Optimizer, opts,
                     device: torch.device) -> contextlib.AbstractContextManager:
    """A PrivateTraining for `client`'s local update, or a no-op context (None) without DP-SGD."""
    if not enabled(opts):
        return contextlib.nullcontext()
    return PrivateTraining(model, optimizer, len(client.dataset), opts, client.generator,
                           client.dpsgd_history, device)


def epsilon_after(num_samples: int, rounds: int, opts) -> float:
    """A client's epsilon at --dp_delta after `rounds` local updates of --local_ep epochs over
    `num_samples` slices, as `PrivateTraining` accounts them (Opacus's RDP accountant: every epoch
    ceil(N / B) Poisson steps at rate 1 / ceil(N / B))."""
    q, steps = sampling(num_samples, opts.local_bs)
    accountant = _opacus().accountants.RDPAccountant()
    accountant.history = [(opts.dpsgd_noise, q, steps * opts.local_ep * rounds)]
    return float(accountant.get_epsilon(opts.dp_delta))


def stop_reason(selected: list, metrics: list[dict], opts) -> str | None:
    """Why the next round must not run under --dp_max_epsilon: a selected client whose DP-SGD epsilon
    would pass the budget in it (None: it may). The rounds a client trained in are its epsilon rows in
    `metrics` (checkpointed with the run), so the server decides it with the clients' state elsewhere
    (on Flower, on the nodes)."""
    if opts.dp_max_epsilon is None or not enabled(opts):
        return None
    trained = Counter(r["model"] for r in metrics if r.get("split") == "privacy" and r.get("mechanism") == "dpsgd")
    for client in selected:
        epsilon = epsilon_after(client.num_slices, trained[client.name] + 1, opts)
        if epsilon > opts.dp_max_epsilon:
            spent = epsilon_after(client.num_slices, trained[client.name], opts) if trained[client.name] else 0.0
            return (f"one more round would take client {client.name}'s DP-SGD epsilon to {epsilon:.4g}, above "
                    f"--dp_max_epsilon {opts.dp_max_epsilon:g} (delta {opts.dp_delta:g}); spent so far: {spent:.4g}")
    return None


def epsilon_row(rnd: int, client_name: str, site: str, epsilon: float, delta: float) -> dict:
    """The metrics row of a client's sample-level epsilon after round `rnd`."""
    return {"round": rnd, "model": client_name, "site": site, "split": "privacy", "epsilon": epsilon,
            "delta": delta, "mechanism": "dpsgd"}


def summary(metrics: list[dict], opts) -> str:
    """Per-client epsilon after the last round each client trained in, for the final table."""
    last: dict[str, dict] = {}
    for r in metrics:
        if r.get("split") == "privacy" and r.get("mechanism") == "dpsgd":
            last[r["model"]] = r
    per_client = ", ".join(f"{name} {r['epsilon']:.4g}" for name, r in sorted(last.items()))
    return (f"sample-level DP-SGD (--dpsgd_noise {opts.dpsgd_noise:g}, --dpsgd_clip {opts.dpsgd_clip:g}): "
            f"epsilon per client at delta {opts.dp_delta:g}: {per_client or 'none spent'}")
