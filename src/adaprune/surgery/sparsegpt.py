"""SparseGPT (Frantar & Alistarh, 2023): unstructured or N:M sparsity chosen and compensated with
second-order information from calibration data.

For one layer with weight ``W`` (rows = outputs, columns = the reduction dim: a Linear's inputs, a
conv's input channels times its kernel positions) and calibration inputs ``X`` (one column of the
reduction dim per row of ``X``), pruning asks for the sparse ``W'`` closest to ``W`` in output:
minimise ``||W X^T - W' X^T||``. With ``H = X^T X`` (damped by ``damp`` times its mean diagonal),
the Optimal Brain Surgeon answer for zeroing weight ``w_ij`` is to move the row's later weights by
``-(w_ij / [H^-1]_jj) [H^-1]_j,j:``. SparseGPT runs this column by column, left to right, on the
upper Cholesky factor of ``H^-1``: after column ``j`` is decided, its error is spread over the columns
to its right, so every row keeps the same inverse Hessian and the whole layer costs one Cholesky
factorisation plus ``O(rows * cols^2)``.

Which weights to zero is chosen as it goes, by ``w^2 / [H^-1]_jj^2`` (the OBS saliency) on the
weights as updated so far: for unstructured sparsity once per block of ``block`` columns (the block's
lowest ``sparsity`` fraction over all its rows), for N:M at every group of M columns (the M-N least
salient of each row's group).

Layers are processed in the model's module order, each on inputs computed by the model with the layers
before it already pruned and updated (the "sequential" variant of the paper), so a later layer
compensates what earlier ones lost. The updates are kept beside the original weights as a
:class:`~adaprune.surgery.mask.ShiftedMask` parametrization: ``undo()`` restores the originals
exactly, ``materialize()`` bakes the updated, zeroed weights in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, NonFiniteError

BLOCK = 128
"""Columns per block: the unit of the unstructured mask's choice and of the lazy update."""

DAMP = 0.01
"""Damping added to H's diagonal, as a fraction of its mean diagonal."""


def supported(mod: nn.Module) -> str:
    """Why SparseGPT cannot handle ``mod`` ("" when it can): Linear, and Conv1d/2d with one group,
    zero padding given as numbers."""
    if isinstance(mod, nn.Linear):
        return ""
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        if mod.groups != 1:
            return f"sparsegpt: grouped convolution ({mod.groups} groups) is not supported"
        if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
            return "sparsegpt: only numeric zero padding is supported"
        return ""
    return f"sparsegpt: {type(mod).__name__} is not supported (Linear, Conv1d and Conv2d are)"


def rows_of(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows over the weight's reduction dim: ``(positions, cols)``, float64."""
    if isinstance(mod, nn.Linear):
        return x.detach().reshape(-1, mod.in_features).double()
    assert isinstance(mod, (nn.Conv1d, nn.Conv2d))
    t = x.detach().double()
    if t.dim() == mod.weight.dim() - 1:  # an unbatched input
        t = t.unsqueeze(0)
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: tuple[int, ...]
    stride: tuple[int, ...]
    if isinstance(mod, nn.Conv1d):  # as a 1 x L image with a 1 x k kernel
        t = t.unsqueeze(2)
        kernel, dilation = (1, mod.kernel_size[0]), (1, mod.dilation[0])
        padding, stride = (0, int(mod.padding[0])), (1, mod.stride[0])
    else:
        kernel, dilation, stride = mod.kernel_size, mod.dilation, mod.stride
        padding = tuple(int(p) for p in mod.padding)
    cols = nn.functional.unfold(t, kernel, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def work_dtype(weight: torch.Tensor) -> torch.dtype:
    """The precision of a layer's Hessian and updates: float64 for a float64 weight, else float32 (as the
    paper's code; a 1.1 B model's largest Hessian is then 127 MB, not 254)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def hessians(model: nn.Module, name: str, later: Sequence[str],
             batches: Sequence[tuple[Any, Any]]) -> dict[str, torch.Tensor]:
    """``X^T X / n`` of layer ``name``'s inputs, and in the same pass of every layer in ``later`` that reads
    the very tensor ``name`` reads, in every batch (a block's q, k and v reading one normed hidden state;
    its gate and up projections): pruning ``name`` cannot change their inputs, so one pass serves them all
    and gives what a pass of their own would."""
    from ..importance.data import observe

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    shared = set(later)
    current: list[Any] = [None]  # the tensor ``name`` read in this batch

    def add(n: str, m: nn.Module, x: torch.Tensor) -> None:
        if n == name:
            current[0] = x
        elif x is not current[0]:  # (before ``name`` in this batch, or another tensor)
            shared.discard(n)
            return
        weight = m.weight
        assert isinstance(weight, torch.Tensor)
        r = rows_of(m, x).cpu().to(work_dtype(weight))
        if n not in sums:
            sums[n] = r.T @ r
        else:
            sums[n].addmm_(r.T, r)
        counts[n] = counts.get(n, 0) + r.shape[0]

    observe(model, {name, *later}, batches, add, inputs=True, criterion="sparsegpt")
    if name not in sums:
        raise ConfigError(f"sparsegpt: layer {name!r} was not reached by the calibration batches; "
                          "ignore it (ignore=) or give batches that run through it")
    return {n: sums[n].div_(max(counts[n], 1)) for n in sums if n == name or n in shared}


def prune_layer(weight: torch.Tensor, h: torch.Tensor, sparsity: float | None = None,
                pattern: tuple[int, int] | None = None, block: int = BLOCK, damp: float = DAMP,
                consume: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one weight ``(rows, cols)`` with input Hessian ``h`` ``(cols, cols)``: the updated
    weight (zeros where pruned; in ``weight``'s dtype) and the 0/1 keep mask. Give ``sparsity`` (the
    fraction zeroed per block of columns) or ``pattern`` ``(n, m)``: n kept in every m columns. The work is
    done in :func:`work_dtype` of ``weight``; ``h`` is not changed unless ``consume`` (then, when it is already in
    that dtype on the CPU, its memory is reused and its values are lost)."""
    dtype = work_dtype(weight)
    w = weight.detach().cpu().to(dtype, copy=True)
    rows, cols = w.shape
    h = h.to(dtype, copy=not consume)
    dead = h.diagonal() == 0  # inputs that are always zero: their weights do nothing
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    try:  # H^-1's upper Cholesky factor in two (cols, cols) buffers: h's own and one more
        u = torch.linalg.cholesky(h)
        torch.cholesky_inverse(u, out=h)
        torch.linalg.cholesky(h, upper=True, out=u)
        del h
    except torch.linalg.LinAlgError:
        raise NonFiniteError("sparsegpt: the layer's damped input Hessian is not positive definite; "
                             "give more calibration batches, or raise damp") from None
    if pattern is not None:
        block = max(pattern[1], block // pattern[1] * pattern[1])  # groups never straddle blocks
    drop = torch.zeros_like(w, dtype=torch.bool)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        part, err = w[:, start:end].clone(), torch.zeros(rows, end - start, dtype=w.dtype)
        ub = u[start:end, start:end]
        d = ub.diagonal()
        chosen = torch.zeros(rows, end - start, dtype=torch.bool)
        if pattern is None:
            saliency = part.pow(2) / d.pow(2)
            k = int(saliency.numel() * float(sparsity or 0.0))
            if k:
                chosen.view(-1)[torch.argsort(saliency.flatten(), stable=True)[:k]] = True
        for j in range(end - start):
            if pattern is not None and j % pattern[1] == 0:
                n, m = pattern
                saliency = part[:, j:j + m].pow(2) / d[j:j + m].pow(2)
                chosen[:, j:j + m].scatter_(1, saliency.topk(m - n, dim=1, largest=False).indices, True)
            col = part[:, j]
            kept = col.masked_fill(chosen[:, j], 0.0)
            e = (col - kept) / d[j]
            part[:, j:] -= e.unsqueeze(1) * ub[j, j:].unsqueeze(0)
            part[:, j] = kept  # (exactly zero where pruned, whatever the rounding above)
            err[:, j] = e
        w[:, start:end] = part
        drop[:, start:end] = chosen
        w[:, end:] -= err @ u[start:end, end:]
    if not torch.isfinite(w).all():
        raise NonFiniteError("sparsegpt: the updated weights are not finite; give more calibration batches, "
                             "or raise damp")
    return w.to(weight.dtype), (~drop).to(weight.dtype)


__all__ = ["BLOCK", "DAMP", "hessians", "prune_layer", "rows_of", "supported", "work_dtype"]
