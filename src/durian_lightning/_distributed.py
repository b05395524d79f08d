"""Collectives over the ranks of a run; every rank must call them, in the same order."""

from __future__ import annotations

import contextlib
import pickle
from typing import Any

import torch

STOPPED_TOGETHER = "durian_stopped_together"  # set on an exception every rank raised at the same point


def all_gather_1d(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenate a 1-D tensor of the same length from every rank, in rank order (no autograd)."""
    out = torch.empty(world * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    torch.distributed.all_gather_into_tensor(out, tensor.contiguous())
    return out


def all_gather_records(trainer, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's per-sample records in rank order (each rank evaluates its own share of the data)."""
    if trainer is None or trainer.world_size <= 1:
        return list(records)
    parts: list = [None] * trainer.world_size
    torch.distributed.all_gather_object(parts, list(records))
    return [record for part in parts for record in part]


def min_over_ranks(value: int, world: int, device: torch.device | str = "cpu") -> int:
    """The smallest ``value`` of any rank (every rank gets the same answer)."""
    if world <= 1:
        return value
    count = torch.tensor([value], device=device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
    return int(count)


def mean_over_ranks(value: float, world: int, device: torch.device | str = "cpu") -> float:
    """The mean of ``value`` over ranks (every rank gets the same answer)."""
    if world <= 1:
        return value
    total = torch.tensor([float(value)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return float(total) / world


def sum_over_ranks(values: list[float], world: int, device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sums over ranks of a list of numbers, in one all-reduce (float64)."""
    if world <= 1 or not values:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return total.tolist()


def extremes_over_ranks(lows: list[float], highs: list[float], world: int,
                        device: torch.device | str = "cpu") -> tuple[list[float], list[float]]:
    """Element-wise minimum of ``lows`` and maximum of ``highs`` over ranks, in one all-reduce."""
    if world <= 1 or not (lows or highs):
        return list(lows), list(highs)
    both = torch.tensor([*lows, *(-h for h in highs)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MIN)
    values = both.tolist()
    return values[: len(lows)], [-h for h in values[len(lows) :]]


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Replace every gradient by its mean over ranks (the data-parallel update), in one flat all-reduce."""
    if world <= 1 or not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    torch.distributed.all_reduce(flat)
    flat /= world
    for p, piece in zip(params, flat.split([p.numel() for p in params])):
        p.grad = piece.view_as(p).clone()


def stop_together(error: BaseException | None, world: int, device: torch.device | str = "cpu") -> None:
    """Call after a phase of the step that has no collective in it (rollout, reward, log-prob passes), with the
    exception it raised on this rank or None. If any rank failed, every rank raises the first failing rank's
    exception (same type, message prefixed with its rank), so all stop at the same point and take the same error
    path: a checkpoint written there is a collective every rank reaches, instead of one rank waiting in the step's
    next collective for the others, or they for it, until the process group times out."""
    if world <= 1:
        if error is not None:
            setattr(error, STOPPED_TOGETHER, True)
            raise error
        return
    failed = torch.tensor([0 if error is None else 1], device=device)
    torch.distributed.all_reduce(failed)
    if int(failed) == 0:
        return
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, None if error is None else _portable(error))
    rank, shared = next((r, e) for r, e in enumerate(parts) if e is not None)
    message = str(shared.args[0]) if shared.args else type(shared).__name__
    shared.args = (f"rank {rank} of {world}: {message}", *shared.args[1:])
    setattr(shared, STOPPED_TOGETHER, True)
    if error is not None and torch.distributed.get_rank() == rank:
        raise shared from error
    raise shared


@contextlib.contextmanager
def failing_together(world: int, device: torch.device | str = "cpu"):
    """Around a part of the step with no collective inside: an exception in it on one rank stops every rank right
    after it, with that rank's message (:func:`stop_together`), instead of hanging the others."""
    error = None
    try:
        yield
    except Exception as caught:  # noqa: BLE001 - every failure is handed on, on every rank
        error = caught
    stop_together(error, world, device)


FAILURE_KEY = "durian/failure"


@contextlib.contextmanager
def failing_inside_collectives(world: int):
    """Around a part of the step with collectives inside (the policy update: FSDP's all-gathers and reduce-scatters in
    the forward and backward, the gradient average): a rank that fails there cannot share its exception through a
    collective, since the others may already wait in one. It writes the exception to the process group's store and
    stops; the others' pending collective then fails (gloo reports the closed connection at once) and each raises
    that rank's exception in its place, so every rank stops with the failing rank's message, not the collective's.
    No checkpoint is written: the update stopped part-way (the last one written holds the last completed update).
    Under NCCL a collective waiting on a stopped rank ends at the process group's timeout, not at once."""
    if world <= 1:
        yield
        return
    try:
        yield
    except Exception as error:  # noqa: BLE001 - every failure is handed on
        if getattr(error, STOPPED_TOGETHER, False):
            raise
        store = torch.distributed.distributed_c10d._get_default_store()
        try:
            failed_first = store.check([FAILURE_KEY])
        except Exception:  # noqa: BLE001 - the store lives in rank 0's process, which may have stopped: its own error
            raise error from None
        if failed_first:  # another rank failed first: this one's error is the collective's
            rank, shared = pickle.loads(store.get(FAILURE_KEY))
            raise shared from error
        rank = torch.distributed.get_rank()
        message = str(error.args[0]) if error.args else type(error).__name__
        error.args = (f"rank {rank} of {world}: {message}", *error.args[1:])
        store.set(FAILURE_KEY, pickle.dumps((rank, _portable(error))))
        raise


def _portable(error: BaseException) -> BaseException:
    """The exception as another process can rebuild it: itself, or a RuntimeError naming it when it does not pickle."""
    try:
        copy = pickle.loads(pickle.dumps(error))
        if type(copy) is type(error):
            return copy
    except Exception:  # noqa: BLE001 - any pickling failure: send the text
        pass
    return RuntimeError(f"{type(error).__name__}: {error}")
