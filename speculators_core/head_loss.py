"""An objective through a frozen LM head, a chunk of rows at a time.

A draft's loss at a position is ``objective(W h, p)``: its logits are a frozen head ``W``
``[V, H]`` applied to its final state ``h`` ``[H]``. The gradient with respect to ``h`` is
``W^T (d loss / d logits)``, an ``[H]`` vector. :func:`head_objective` computes it in the
forward pass, a chunk of rows at a time, and keeps only that ``[N, H]`` tensor for the backward
pass, where the plain path keeps the ``[N, V]`` logits (or their gradient) of every row: 8x
less at a 32k draft vocabulary and hidden 4,096, 31x at 128k, and the logits of all ``N`` rows
never exist at once. The compute is the same: the plain path's backward multiplies the same
``[N, V]`` gradient by ``W``. (The idea of fused linear-cross-entropy kernels, for any
per-position objective of :mod:`speculators_core.objectives`.)

Only for a head that does not train: a trainable head's gradient ``sum_i g_i * h_i (d loss_i /
d logits_i)^T`` needs each row's incoming scale ``g_i``, known only in the backward pass, so
callers project and score the usual way there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from speculators_core.errors import SpeculatorsError
from speculators_core.objectives import ObjectiveFunction, TargetDistribution

__all__ = ["HEAD_CHUNK_ELEMENTS", "head_objective"]

#: Rows per chunk hold about this many logits (32 MB in fp32): large enough for the head's
#: matrix product to run at full speed, small enough that a chunk's few ``[rows, V]``
#: temporaries stay a small part of a step's memory.
HEAD_CHUNK_ELEMENTS = 1 << 23


def _scan(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    objective: ObjectiveFunction,
    target: TargetDistribution,
    index: torch.Tensor | None,
    chunk_rows: int,
    *,
    grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row loss and argmax of ``objective(hidden @ weight.T, target)``, a chunk of rows at a
    time, and with ``grad`` the ``[N, H]`` gradient of ``sum(loss)`` with respect to ``hidden``."""
    rows = hidden.shape[0]
    values = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    argmax = torch.empty(rows, dtype=torch.long, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if grad else None
    for start in range(0, rows, chunk_rows):
        end = min(start + chunk_rows, rows)
        part = target.rows(start, end) if index is None else target.take(index[start:end])
        with torch.set_grad_enabled(grad):
            logits = F.linear(hidden[start:end].detach(), weight).requires_grad_(grad)
            value = objective(logits, part)  # [n]
            if grad_hidden is not None:
                (grad_logits,) = torch.autograd.grad(value.sum(), logits)
                grad_hidden[start:end] = grad_logits.to(weight.dtype) @ weight
        values[start:end] = value.detach()
        argmax[start:end] = logits.detach().argmax(dim=-1)
    return values, argmax, grad_hidden


class _HeadObjective(torch.autograd.Function):
    """Per-row ``objective(hidden @ weight.T, target)`` and its argmax; keeps ``[N, H]``."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        objective: ObjectiveFunction,
        target: TargetDistribution,
        index: torch.Tensor | None,
        chunk_rows: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        values, argmax, grad_hidden = _scan(
            hidden, weight, objective, target, index, chunk_rows, grad=True
        )
        ctx.save_for_backward(grad_hidden)
        ctx.mark_non_differentiable(argmax)
        return values, argmax

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_values: torch.Tensor, _grad_argmax: torch.Tensor | None
    ) -> tuple[torch.Tensor, None, None, None, None, None]:
        (grad_hidden,) = ctx.saved_tensors
        scale = grad_values.unsqueeze(-1).to(grad_hidden.dtype)
        return grad_hidden * scale, None, None, None, None, None


def head_objective(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    objective: ObjectiveFunction,
    target: TargetDistribution,
    index: torch.Tensor | None = None,
    *,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``objective(hidden @ weight.T, target)`` per row, and the logits' argmax per row.

    ``hidden`` ``[N, H]`` (the draft's normed final states), ``weight`` ``[V, H]`` the frozen
    head, ``target`` the verifier's distribution at row ``index[i]`` for row ``i`` (``target``'s
    rows in order when ``index`` is None). Returns ``([N] fp32 loss, [N] int64 argmax)``; the
    loss is differentiable with respect to ``hidden`` only, and the pass keeps one ``[N, H]``
    tensor for the backward instead of the ``[N, V]`` logits.
    """
    if weight.requires_grad:
        raise SpeculatorsError(
            "head_objective computes the gradient of the states only, and this head trains; "
            "project with the head and score the logits instead"
        )
    elements = HEAD_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    chunk_rows = max(1, elements // max(1, weight.shape[0]))
    if hidden.requires_grad and torch.is_grad_enabled():
        values, argmax = _HeadObjective.apply(hidden, weight, objective, target, index, chunk_rows)
        return values, argmax
    values, argmax, _ = _scan(hidden, weight, objective, target, index, chunk_rows, grad=False)
    return values, argmax
