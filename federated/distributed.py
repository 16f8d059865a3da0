"""Data parallelism inside a client: `torchrun --nproc_per_node N main_fl_mr.py ...`.

Every process (rank) runs the whole study: the same options, clients, server-side aggregation and
random draws, so every rank holds the same weights after every step. What is split is the work:

- training: each global batch of `--local_bs` slices (the batch a one-process run draws, from the
  client's own generator) is split into N contiguous shares, one per rank; every rank's gradients
  are scaled by its share of the batch and summed with one all-reduce per step, so the step equals
  the one-process step up to float reduction order. Masks and MRAugment draws are keyed by (epoch,
  slice), so a slice sees the same mask and augmentation whatever N is.
- evaluation: each rank scores every N-th volume; the per-volume metrics are gathered and
  summarised in the one-process order.
- writing: rank 0 alone writes the run folder and prints; the other ranks are silent.

Gradients are averaged here, with `torch.distributed.all_reduce` on one flat buffer, rather than by
wrapping the model in `DistributedDataParallel`: strategies read the model's own parameter names
(FedProx, FedMRI), FL-MRCM calls the encoder outside `forward` and steps a second optimiser inside
the loss, and DDP broadcasts BatchNorm buffers from rank 0; one explicit all-reduce keeps all of them
exact. The same buffer carries a failure flag, so a step that fails on one rank fails on every rank
and no rank waits for a collective that never comes.

Outside torchrun (no `WORLD_SIZE` in the environment) nothing here is active and a run is exactly
the one-process code path.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, Subset

from utils.errors import UserError

# How long a rank waits in a collective for the others (a rank that died is noticed sooner by
# torchrun, which stops the rest).
TIMEOUT = datetime.timedelta(minutes=10)


class PeerFailure(RuntimeError):
    """Another rank failed in the same step; this rank stops the step too."""


def describe(error: Exception | None) -> tuple[bool, str] | None:
    """(is a UserError, one line) of an error, for the other ranks; None for no error."""
    if error is None:
        return None
    if isinstance(error, UserError):
        return True, str(error)
    return False, f"{type(error).__name__}: {error}"


@dataclass
class Group:
    """This process's place in the run: rank in [0, world), its local rank on its node."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False  # a process group is initialised (under torchrun, even with world 1)
    share: float = 1.0  # this rank's part of the current training step's global batch

    @property
    def writer(self) -> bool:
        """Whether this rank writes the run folder and prints."""
        return self.rank == 0

    # ---- agreement ---------------------------------------------------------------------------
    def agree(self, error: Exception | None) -> None:
        """Raise on every rank if any rank hit an error: this rank its own `error`, the others the
        first failing rank's (a UserError keeps its message). Outside torchrun: raise `error`."""
        if not self.active:
            if error is not None:
                raise error
            return
        self.raise_failures(self.gather(describe(error)), error)

    def raise_failures(self, described: list[tuple[bool, str] | None], own: Exception | None) -> None:
        """`described`: every rank's `describe(error)`. Raise `own`, else the first failure."""
        failed = [(r, d) for r, d in enumerate(described) if d is not None]
        if not failed:
            return
        if own is not None:
            raise own
        rank, (is_user, message) = failed[0]
        if is_user:
            raise UserError(message)
        raise PeerFailure(f"process {rank}: {message}")

    # ---- training ----------------------------------------------------------------------------
    def average_gradients(self, params: Sequence[torch.Tensor], share: float,
                          failure: Exception | None = None) -> None:
        """Sum over ranks of `share` x each rank's gradients, in place; `share` is this rank's part
        of the global batch. A parameter without a gradient counts as zero. When any rank has a
        `failure`, the others raise PeerFailure naming it (the failing rank raises its own)."""
        if not self.active:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        device = grads[0].device if grads else torch.device("cpu")
        # Which parameters have a gradient on some rank: the others stay without one, as in one
        # process (an optimiser skips them; a zero gradient would still move Adam's state).
        present = [float(p.grad is not None) for p in params]
        flat = torch.cat([g.detach().reshape(-1).float() * share for g in grads]
                         + [torch.tensor(present + [float(failure is not None)], device=device)])
        torch.distributed.all_reduce(flat)
        if flat[-1].item() > 0:
            self.raise_failures(self.gather(describe(failure)), failure)
        offset, anywhere = 0, flat[-1 - len(params):-1].tolist()
        for p, g, has in zip(params, grads, anywhere):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype) if has > 0 else None
            offset += n

    def my_share(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """This rank's contiguous share of a batch that every rank holds whole (batch-first
        tensors), cut as `ShardedBatches` cuts a training batch."""
        if not self.active:
            return tensors
        lo, hi = _bounds(len(tensors[0]), self.rank, self.world)
        return tuple(t[lo:hi] for t in tensors)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `values` over ranks."""
        if not self.active:
            return values
        values = values.clone()
        torch.distributed.all_reduce(values)
        return values

    def broadcast_state(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (as DDP does when it wraps a model)."""
        if not self.active:
            return
        for t in module.state_dict().values():
            torch.distributed.broadcast(t, 0)

    # ---- evaluation --------------------------------------------------------------------------
    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order (a picklable object)."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out


_GROUP = Group()


def current() -> Group:
    """The process's group: inactive (rank 0 of 1) unless started by torchrun."""
    return _GROUP


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup(device_flag: str) -> Group:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA, one GPU per process by
    LOCAL_RANK). Outside torchrun: the inactive group. `--device cuda` with fewer GPUs on this node
    than processes is a UserError (raised before joining, on every rank)."""
    global _GROUP
    if not launched() or _GROUP.active:
        return _GROUP
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    if cuda:
        if torch.cuda.device_count() < local_world:
            raise UserError(f"--device cuda: {local_world} processes on this node but "
                            f"{torch.cuda.device_count()} GPU(s); start torchrun with --nproc_per_node "
                            f"{max(torch.cuda.device_count(), 1)} or use --device cpu")
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    _GROUP = Group(rank, world, local_rank, active=True)
    return _GROUP


def shutdown() -> None:
    global _GROUP
    if _GROUP.active:
        torch.distributed.destroy_process_group()
    _GROUP = Group()


def device_for(group: Group, device: torch.device) -> torch.device:
    """A CUDA device is this process's own GPU (cuda:LOCAL_RANK) under torchrun."""
    if group.active and device.type == "cuda":
        return torch.device("cuda", group.local_rank)
    return device


# ---- the training batches ----------------------------------------------------------------------
def _bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous share of n items split over `world` ranks (as equal as possible)."""
    return rank * n // world, (rank + 1) * n // world


def _global_batch_sizes(num_slices: int, batch_size: int, world: int) -> list[int]:
    """The sizes of the global batches an epoch trains on: a last batch with fewer slices than
    ranks is skipped, as a rank with nothing to train on cannot take part in a step."""
    sizes = [batch_size] * (num_slices // batch_size)
    if num_slices % batch_size >= world:
        sizes.append(num_slices % batch_size)
    return sizes


class ShardedBatches(Sampler[list[int]]):
    """This rank's share of each global batch a one-process DataLoader(shuffle=True, generator=g)
    draws: the same random permutation from the same generator, cut into batches of `batch_size`,
    each cut into `world` contiguous shares (`_bounds`). Every rank yields one share per global batch
    of `_global_batch_sizes`, so every rank takes the same number of steps."""

    def __init__(self, num_slices: int, batch_size: int, generator: torch.Generator, rank: int, world: int):
        self.batches = BatchSampler(RandomSampler(range(num_slices), generator=generator), batch_size, False)
        self.num_slices, self.batch_size, self.rank, self.world = num_slices, batch_size, rank, world

    def __len__(self) -> int:
        return len(_global_batch_sizes(self.num_slices, self.batch_size, self.world))

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            if len(batch) >= self.world:
                lo, hi = _bounds(len(batch), self.rank, self.world)
                yield batch[lo:hi]


def sharded_batches(group: Group, dataset: Dataset, batch_size: int, generator: torch.Generator,
                    num_workers: int, device: torch.device) -> Iterator[tuple[Any, float]]:
    """(this rank's samples, its share of the global batch) for one epoch of a client's training
    data under torchrun; the ranks' shares of one batch sum to 1."""
    sampler = ShardedBatches(len(dataset), batch_size, generator, group.rank, group.world)
    # The loader draws its workers' base seed from `generator` before the sampler's permutation,
    # as the one-process loader does: both consume the client's generator identically.
    loader = DataLoader(dataset, batch_sampler=sampler, generator=generator, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    shares = []
    for size in _global_batch_sizes(len(dataset), batch_size, group.world):
        lo, hi = _bounds(size, group.rank, group.world)
        shares.append((hi - lo) / size)
    return zip(loader, shares)


def check_fits(group: Group, opts, clients: Sequence, eval_sets: dict[str, Dataset],
               modules: Sequence[Any] = ()) -> None:
    """UserErrors for a world that cannot split the work: --local_bs not divisible, a client with
    fewer slices or an evaluation site with fewer volumes than processes, BatchNorm in `modules` or
    in what the clients keep (per-rank statistics, not the one-process ones)."""
    if group.world == 1:
        return
    n = group.world
    if opts.local_bs % n:
        raise UserError(f"--local_bs {opts.local_bs}: the global batch is split over {n} processes; "
                        f"use a multiple of {n} (each process takes local_bs / {n} slices per step)")
    if any(_batch_norms(m) for m in [*modules, *(c.extra for c in clients)]):
        raise UserError(f"--norm batch: batch statistics would be each of the {n} processes' own "
                        "(the synthesis task's networks use BatchNorm, as pFLSynth's); use --norm instance "
                        "(reconstruction) or one process under torchrun")
    for c in clients:
        if c.num_slices < n:
            raise UserError(f"client {c.name} has {c.num_slices} training slices, fewer than the {n} "
                            f"processes; start torchrun with --nproc_per_node {c.num_slices} or fewer")
    for site, dataset in eval_sets.items():
        count = len(set(volume_keys(dataset)))
        if count < n:
            raise UserError(f"site {site}: its validation split has {count} volume(s), fewer than the {n} "
                            f"processes that share them; start torchrun with --nproc_per_node {count} or "
                            "fewer, or raise --val_sample_rate")


def _batch_norms(obj: Any, depth: int = 0) -> bool:
    """Whether `obj` (a module, or a client's dict of kept objects, two levels deep) holds BatchNorm."""
    if isinstance(obj, torch.nn.Module):
        return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in obj.modules())
    if depth > 2:
        return False
    if isinstance(obj, dict):
        return any(_batch_norms(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_batch_norms(v, depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return any(_batch_norms(v, depth + 1) for v in vars(obj).values())
    return False


# ---- the evaluation volumes --------------------------------------------------------------------
def volume_keys(dataset: Dataset) -> list[Any]:
    """A key per index naming the volume the slice belongs to (slices of a volume are contiguous)."""
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        return [(k, key) for k, d in enumerate(dataset.datasets) for key in volume_keys(d)]
    if isinstance(dataset, Subset):
        keys = volume_keys(dataset.dataset)
        return [keys[i] for i in dataset.indices]
    if hasattr(dataset, "examples"):
        return [path for path, _ in dataset.examples]
    if hasattr(dataset, "_datasets"):  # several registered contrasts of the same subjects
        return volume_keys(dataset._datasets[dataset.contrasts[0]])
    raise TypeError(f"cannot tell the volumes of a {type(dataset).__name__}")


def shard_volumes(group: Group, dataset: Dataset) -> tuple[Dataset, list[int]]:
    """This rank's volumes of `dataset` (every `world`-th, in order) and their ordinals in the
    whole dataset's volume order."""
    if not group.active:
        return dataset, []
    keys = volume_keys(dataset)
    ordinal, ordinals, index = -1, [], []
    previous = object()
    for i, key in enumerate(keys):
        if key != previous:
            ordinal, previous = ordinal + 1, key
        if ordinal % group.world == group.rank:
            index.append(i)
            if not ordinals or ordinals[-1] != ordinal:
                ordinals.append(ordinal)
    return Subset(dataset, index), ordinals
