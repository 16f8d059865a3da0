"""A client (one hospital, or one share of a site's volumes) and its local update."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from federated import distributed, dpsgd
from federated.precision import autocast

if TYPE_CHECKING:
    from federated.strategies.base import Strategy

State = dict[str, torch.Tensor]
DPSGD_EPSILON = "dpsgd_epsilon"  # the key of a DP-SGD client's epsilon in LocalResult.logs


class ClientFailure(RuntimeError):
    """A client's local update could not produce usable weights (an exception or a non-finite loss)."""


@dataclass
class Client:
    """Everything a client keeps between rounds.

    `dataset` yields the task's samples of its training slices and has `set_epoch(seed)`; `generator`
    drives its shuffling and training masks so that every client's randomness is its own and is
    saved in checkpoints.
    """
    name: str
    site: str
    dataset: Dataset
    num_slices: int
    generator: torch.Generator
    local_weights: State = field(default_factory=dict)  # entries the strategy keeps local
    optimizer_state: dict | None = None
    scheduler_state: dict | None = None
    extra: dict = field(default_factory=dict)  # the strategy's own per-client state
    dpsgd_history: list | None = None  # DP-SGD: the client's RDP accountant history (federated/dpsgd.py)


@dataclass
class LocalResult:
    state: State
    loss: float
    logs: dict[str, float]
    optimizer_state: dict
    scheduler_state: dict
    dpsgd_history: list | None = None  # DP-SGD: the accountant's history after this update


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, generator: torch.Generator | None,
                num_workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=False)


def _failures_deferred(batches: Iterator[tuple[Any, float]], defer: bool) -> Iterator[tuple[Any, float]]:
    """The batches; with `defer`, an exception while loading one is yielded in its place (and ends
    the epoch), so that under torchrun the failure reaches the step's collective on every rank."""
    while True:
        try:
            yield next(batches)
        except StopIteration:
            return
        except Exception as e:
            if not defer:
                raise
            yield e, 0.0
            return


def _epoch_batches(client: Client, opts, device: torch.device, group: distributed.Group,
                   private: dpsgd.PrivateTraining | None) -> Iterator[tuple[Any, float]]:
    """(samples, share of the global batch) of one epoch of the client's training data: this rank's
    shares under torchrun, Poisson batches under DP-SGD, else the shuffled DataLoader (share 1)."""
    if group.active:
        return distributed.sharded_batches(group, client.dataset, opts.local_bs, client.generator,
                                           opts.num_workers, device)
    if private is not None:
        return ((samples, 1.0) for samples in private.batches(client.dataset, opts.num_workers, device))
    loader = make_loader(client.dataset, opts.local_bs, True, client.generator, opts.num_workers, device)
    return ((samples, 1.0) for samples in loader)


def _backward(strategy: Strategy, client: Client, model: nn.Module, batch, optimizer: torch.optim.Optimizer,
              private: dpsgd.PrivateTraining | None, opts, device: torch.device):
    """One step's loss, logs and (DP-SGD) the method's weight term, with the gradients computed.

    DP-SGD: only the data loss goes through the per-sample clipping; the method's weight term
    (reading no data) is added after the noise, in `PrivateTraining.step`."""
    if private is None:
        with autocast(opts, device):
            loss, logs = strategy.training_loss(client, model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss, logs, None
    from federated.strategies.base import with_weight_term  # here: the strategies import this module
    data, logs = strategy.data_loss(client, model, batch)
    term, term_logs = strategy.weight_term(client, model)
    loss, logs = with_weight_term(data.detach(), logs, None if term is None else term.detach(), term_logs)
    private.optimizer.zero_grad(set_to_none=True)
    data.backward()
    return loss, logs, term


def local_update(client: Client, model: nn.Module, strategy: Strategy, global_state: State,
                 opts, device: torch.device, *, rnd: int) -> LocalResult:
    """Train `model` on the client's data for `opts.local_ep` epochs, starting from the strategy's
    choice of weights; the task's optimiser and StepLR (stepped once per round) persist across rounds.

    Raises ClientFailure when the mean loss is not finite.
    """
    model.load_state_dict(strategy.local_state(client, global_state))
    model.train()
    task = strategy.task
    optimizer = task.make_optimizer(model.parameters())
    scheduler = task.make_scheduler(optimizer)
    if client.optimizer_state is not None:
        # A copy: the optimizer updates its state in place, and a failed update must leave none behind.
        optimizer.load_state_dict(copy.deepcopy(client.optimizer_state))
        scheduler.load_state_dict(client.scheduler_state)

    group = distributed.current()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum = torch.zeros((), device=device)
    log_sums: dict[str, torch.Tensor] = {}
    steps = 0
    # DP-SGD (--dpsgd_noise): per-sample clipping and noise on every step, Poisson batches (None
    # for an empty draw: a noise-only step); refused under torchrun, so `group` is inactive then.
    with dpsgd.private_training(client, model, optimizer, opts, device) as private:
        for epoch in range(opts.local_ep):
            # A fresh, reproducible mask (and augmentation) for every slice in every epoch, whatever the
            # number of workers or processes.
            client.dataset.set_epoch(int(torch.randint(2**31 - 1, (1,), generator=client.generator)))
            client.dataset.set_time(*strategy.schedule_time(rnd, epoch))
            batches = _epoch_batches(client, opts, device, group, private)
            for samples, share in _failures_deferred(batches, group.active):
                if samples is None:
                    private.empty_step(strategy.weight_term(client, model)[0])
                    continue
                group.share = share
                failure = samples if isinstance(samples, Exception) else None
                if failure is None:
                    try:
                        loss, logs, term = _backward(strategy, client, model, task.to_device(samples, device),
                                                     optimizer, private, opts, device)
                    except Exception as e:
                        if not group.active:
                            raise
                        failure = e
                # Under torchrun: this rank's gradient times its share of the batch, summed over ranks.
                group.average_gradients(params, share, failure)
                if failure is not None:
                    raise failure
                if private is not None:
                    private.step(term)
                else:
                    optimizer.step()
                # Kept on the device: no host sync per step.
                loss_sum += loss.detach() * share
                for k, v in logs.items():
                    log_sums[k] = log_sums.get(k, 0) + v * share
                steps += 1
        dpsgd_history = private.history() if private is not None else None
        dpsgd_epsilon = private.epsilon() if private is not None else None
    scheduler.step()

    if steps == 0:
        raise ClientFailure("no training batches")
    if group.active:
        keys = sorted(log_sums)
        total = group.sum(torch.stack([loss_sum.float()] + [torch.as_tensor(log_sums[k], device=device).float()
                                                            for k in keys]))
        loss_sum, log_sums = total[0], dict(zip(keys, total[1:]))
    mean_loss = loss_sum.item() / steps
    if not math.isfinite(mean_loss):
        raise ClientFailure(f"the training loss is {mean_loss}")
    strategy.end_local(client, model)
    logs = {k: float(v) / steps for k, v in log_sums.items()}
    if dpsgd_epsilon is not None:
        logs[DPSGD_EPSILON] = dpsgd_epsilon  # not a mean over steps: the run's server makes it a privacy row
    return LocalResult(
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        loss=mean_loss,
        logs=logs,
        optimizer_state=optimizer.state_dict(),  # the optimizer dies here: no copy needed
        scheduler_state=scheduler.state_dict(),
        dpsgd_history=dpsgd_history,
    )
