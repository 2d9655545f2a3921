"""Data-parallel crosscoder training across processes started by `torchrun`.

Every rank holds a full replica of the crosscoder and trains on its contiguous slice of
each global batch. Whatever depends on the whole batch is computed with collectives, so
the run equals one process training on the global batch (up to float summation order):

* the outlier medians come from every rank's row norms (all-gather);
* BatchTopK keeps the k x n largest scores of the *global* batch: each rank sends its own
  top candidates, every rank finds the same global winners and keeps its share of them;
* the AuxK residual variance, the loss, metrics, gradients (all-reduce sum), the features
  that fired (dead-feature counters) and the smallest selected score (the EMA inference
  threshold) are global.

Gradients are all-reduced by hand rather than through DistributedDataParallel: the trainer
calls several model methods per step and custom sparse autograd functions, not one
`forward`, which DDP's reducer needs to prepare each backward pass.

Single-process runs use the same code with every collective an identity.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from engine.errors import UserError

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class Context:
    """This process's place in the job: rank, world size and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main rank writes checkpoints, logs and progress."""
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce sum in place; returns `t`."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce max in place; returns `t`."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce min in place; returns `t`."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any rank."""
        if not self.distributed:
            return flag
        return bool(self.max_(torch.tensor([int(flag)], device=self.device)).item())

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation (dim 0, in rank order) of a tensor of the same shape on every rank."""
        if not self.distributed:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation (dim 0, in rank order) of tensors whose row counts may differ."""
        if not self.distributed:
            return t
        sizes = self.gather(torch.tensor([t.shape[0]], device=t.device)).tolist()
        padded = t.new_zeros((max(sizes), *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = self.gather(padded).split(max(sizes))
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite each tensor with rank 0's copy."""
        if self.distributed:
            with torch.no_grad():  # parameters are overwritten, not part of any graph
                for t in tensors:
                    dist.broadcast(t, src=0)

    def sum_grads_(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over ranks (a missing one counts as zero)."""
        if not self.distributed:
            return
        works = []
        for p in params:
            if p.grad is None:  # unused on this rank, perhaps not on another
                p.grad = torch.zeros_like(p)
            # In place and one tensor at a time: a flattened copy would double the gradient
            # memory (8 GB at paper scale).
            works.append(dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, async_op=True))
        for work in works:
            work.wait()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def launched_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment, or None if not launched
    as one of several processes."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        return None
    return (rank, world, local) if world > 1 else None


def is_main_process() -> bool:
    """Whether this process is rank 0 of its job (or not part of one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    launched = launched_world()
    return launched is None or launched[0] == 0


@contextmanager
def session(device: torch.device) -> Iterator[Context]:
    """The training context: joins the process group torchrun describes for the duration
    (nccl on CUDA, gloo on CPU) and always leaves it, also on errors and Ctrl-C.

    A process group the caller already initialised is used as is and left to the caller.
    """
    owned = False
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    elif (launched := launched_world()) is not None:
        rank, world, local = launched
        owned = True
    else:
        yield Context(device=device)
        return
    if device.type == "cuda":
        # One GPU per process: the local rank picks it, whatever index the config named.
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if owned:
        _join(rank, world, device)
    try:
        yield Context(rank, world, local, device)
    finally:
        if owned:
            dist.destroy_process_group()


def _join(rank: int, world: int, device: torch.device) -> None:
    """Initialise the process group from torchrun's environment (MASTER_ADDR/PORT)."""
    try:
        if device.type == "cuda":
            dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world)
    except (ValueError, RuntimeError) as err:
        raise UserError(
            f"cannot join the process group of rank {rank} of {world} ({err}); start the "
            f"command with torchrun, or unset WORLD_SIZE to train in one process"
        ) from None


class StopRequests:
    """Records SIGINT/SIGTERM instead of raising, so that all ranks stop after the same step.

    A signal that interrupted one rank mid-step would leave the others waiting in a
    collective, and a checkpoint taken mid-step would be inconsistent; `pending` is polled
    after each step and agreed on by all ranks. Outside the main thread (where signals
    cannot be handled) this records nothing.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _record(self, signum: int, frame: object) -> None:
        self.received.append(signum)

    def pending(self, ctx: Context) -> bool:
        """Whether any rank received a stop signal (collective: call on every rank)."""
        return ctx.any(bool(self.received))
