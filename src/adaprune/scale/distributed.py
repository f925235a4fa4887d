"""torch.distributed: adapt under ``torchrun``, fine-tuning data-parallel, decisions made once.

Launched with ``torchrun --nproc_per_node N script.py`` (or across nodes), every process runs the same script
and the same :func:`adaprune.adapt` call. adapt joins the process group torchrun describes (gloo on CPU, NCCL
when CUDA is there; :func:`join`), and then:

- **fine-tuning is data-parallel**: each process takes its own slice of every training batch (:func:`shard`),
  and after each backward pass the gradients are averaged over the processes (:func:`average_gradients`), inside
  :func:`adaprune.task.optimizer_step`, which every ready task's fine-tuning goes through, so every process
  takes the same optimizer step. BatchNorm normalises each process's slice on its own and rank 0's statistics
  are kept (:func:`sync_buffers`), as DistributedDataParallel does; with ``join(sync_batch_norm=True)`` it
  normalises with the whole batch's statistics instead (:func:`synced_batch_norm`: differentiable
  all-reduces, SyncBatchNorm on CPU too) and the step is exactly the whole batch's. After a recovery the
  parameters and buffers are made rank 0's everywhere (:func:`sync_model`).
- **decisions are made once**: what a decision rests on (every evaluation of the task, every cost measurement,
  each step's plan, whether a limit stopped the run) is rank 0's and broadcast (:func:`broadcast`), so the
  processes cannot drift apart; a step's probes are shared out between the processes
  (:class:`DistributedExecutor`).
- **the run directory is rank 0's**: only rank 0 opens, locks and writes it; on resume it reads the state and
  weights and the others receive them.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..plan import Plan
from .executor import Executor, attempt, outcomes


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) outside a process group."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def active() -> bool:
    """Whether this process is one of several in a process group."""
    return world()[1] > 1


def leader() -> bool:
    """Whether this process decides and writes (rank 0, or the only process)."""
    return world()[0] == 0


_SYNC_BATCH_NORM = [False]


def join(sync_batch_norm: bool | None = None) -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment) when no group
    exists yet: gloo on CPU, NCCL with CUDA. Returns whether this process is now one of several.

    ``sync_batch_norm``: whether fine-tuning's BatchNorm layers normalise with the whole batch's statistics
    (:func:`synced_batch_norm`; the fine-tune is then the one-process one, at the price of three all-reduces
    per BatchNorm layer and step, which on gloo can cost more than the second process saves) or with each
    process's slice (the default, as DistributedDataParallel without SyncBatchNorm). ``None`` leaves the
    setting as it is; call ``join(sync_batch_norm=True)`` before ``adapt`` to turn it on."""
    if sync_batch_norm is not None:
        _SYNC_BATCH_NORM[0] = bool(sync_batch_norm)
    dist = _dist()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return active()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (pickled; anything small: metrics, a plan, a state). Every process
    must call it at the same point."""
    if not active():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def on_leader(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` computed by rank 0 alone, its result (or the exception it raised) on every
    process: how a measurement that decides something (an evaluation, a latency) is made once."""
    if not active():
        return fn(*args, **kwargs)
    box: tuple[bool, Any] | None = None
    if leader():
        try:
            box = (True, fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - raised on every process, below
            box = (False, exc)
    ok, value = broadcast(box)
    if not ok:
        raise value
    return value


def _examples(part: Any) -> int | None:
    """How many examples one part of a batch holds: a tensor's first dimension, a list's length (a list of
    images, of target dicts), a mapping's common first dimension; None when that is not one number."""
    if isinstance(part, torch.Tensor):
        return part.shape[0] if part.dim() > 0 else None
    if isinstance(part, list):
        return len(part)
    if isinstance(part, Mapping):
        found = {_examples(v) if isinstance(v, torch.Tensor) else None for v in part.values()}
        return found.pop() if len(found) == 1 else None
    return None


def _slice(part: Any, rank: int, size: int) -> Any:
    if isinstance(part, torch.Tensor):
        return torch.tensor_split(part, size)[rank]
    if isinstance(part, list):
        n = len(part)
        return part[rank * n // size:(rank + 1) * n // size]
    return {k: _slice(v, rank, size) for k, v in part.items()}


def shard(batch: Any) -> Any:
    """This process's contiguous slice of a training batch: the batch itself, or each part of an
    ``(inputs, targets)`` tuple, split along its examples (a tensor's first dimension, a list's items, a
    mapping's tensors'). The whole batch when the parts do not agree on how many examples there are (e.g.
    YOLO's per-box targets), or there are fewer examples than processes: every process then computes the
    same gradient, which is still the whole batch's."""
    rank, size = world()
    if size == 1:
        return batch
    parts = list(batch) if isinstance(batch, tuple) else [batch]
    counts = {_examples(p) for p in parts}
    n = counts.pop() if len(counts) == 1 else None
    if n is None or n < size:
        return batch
    cut = [_slice(p, rank, size) for p in parts]
    return tuple(cut) if isinstance(batch, tuple) else cut[0]


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Replace every parameter's gradient by its mean over the processes (one all-reduce over all of them,
    a missing gradient counted as zeros), as DistributedDataParallel does; nothing (``params`` not even read)
    outside a process group."""
    if not active():
        return
    params = list(params)
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    _dist().all_reduce(flat)
    flat /= world()[1]
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def _synced_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)`` in training mode with the batch statistics of every process's slice together (what
    ``torch.nn.SyncBatchNorm`` does on GPUs, here with differentiable all-reduces, so it runs on CPU): the
    output, its gradient and the running statistics are those of the whole batch."""
    from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # (torch marks it deprecated for a private successor without autograd docs)
            warnings.simplefilter("ignore", FutureWarning)
            return differentiable_all_reduce(t)

    dims = [0, *range(2, x.dim())]
    count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype)
    total = all_reduce(count)
    mean = all_reduce(x.sum(dims)) / total
    shape = [1, -1] + [1] * (x.dim() - 2)
    var = all_reduce(((x - mean.view(shape)) ** 2).sum(dims)) / total
    out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
    if bn.affine:
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():
            assert bn.num_batches_tracked is not None
            bn.num_batches_tracked += 1
            factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            n = float(total)
            bn.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(var.detach() * n / max(n - 1, 1.0), alpha=factor)
    return out


@contextlib.contextmanager
def synced_batch_norm(model: nn.Module) -> Iterator[None]:
    """Within the block, under torchrun with ``join(sync_batch_norm=True)``, the model's BatchNorm layers in
    training mode normalise with the whole batch's statistics (:func:`_synced_batch_norm`); otherwise nothing
    changes."""
    if not active() or not _SYNC_BATCH_NORM[0]:
        yield
        return
    patched = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and "forward" not in vars(m):
            def forward(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm = m) -> torch.Tensor:
                if bn.training:
                    return _synced_batch_norm(bn, x)
                return type(bn).forward(bn, x)

            m.forward = forward  # type: ignore[method-assign,assignment]
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics, which each process gathers on its own slice) on every process,
    one broadcast per dtype, as DistributedDataParallel does before each forward pass."""
    if not active():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in model.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    with torch.no_grad():
        for tensors in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            _dist().broadcast(flat, src=0)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def sync_model(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every process."""
    if not active():
        return
    dist = _dist()
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


class DistributedExecutor(Executor):
    """A call's candidates shared out between the processes of the group (candidate i on rank i mod N), their
    results gathered on every process in order. Every process must call :meth:`map` with the same plans."""

    def __init__(self) -> None:
        self.rank, self.workers = world()

    def __repr__(self) -> str:
        return f"DistributedExecutor(rank={self.rank}, workers={self.workers})"

    def map(self, model: nn.Module, plans: Sequence[Plan], measure: Callable[[nn.Module], Any], *,
            seed: int = 0, catch: tuple[type[BaseException], ...] = (), token: Hashable | None = None) -> list[Any]:
        mine = {i: attempt(model, plans[i], measure, seed) for i in range(self.rank, len(plans), self.workers)}
        gathered: list[Any] = [None] * self.workers
        _dist().all_gather_object(gathered, mine)  # (every process then raises or returns the same)
        found = {i: answer for part in gathered for i, answer in part.items()}
        return outcomes((found[i] for i in range(len(plans))), catch)

    def map_models(self, models: Sequence[nn.Module], measure: Callable[[nn.Module], Any], *, seed: int = 0,
                   catch: tuple[type[BaseException], ...] = ()) -> list[Any]:
        """Model i evaluated on rank i mod N (every process holds the same models), gathered everywhere."""
        empty = Plan()
        mine = {i: attempt(models[i], empty, measure, seed) for i in range(self.rank, len(models), self.workers)}
        gathered: list[Any] = [None] * self.workers
        _dist().all_gather_object(gathered, mine)
        found = {i: answer for part in gathered for i, answer in part.items()}
        return outcomes((found[i] for i in range(len(models))), catch)


__all__ = ["DistributedExecutor", "active", "average_gradients", "broadcast", "join", "leader", "on_leader", "shard",
           "sync_buffers", "sync_model", "synced_batch_norm", "world"]
