"""Per-step EAGLE-3 training loss and acceptance metrics (FORMAT.md 3.3).

At TTT step ``s`` the draft's logits at aligned index ``t`` predict the token the verifier emits
``s`` positions later, so they are scored against the verifier distribution at index ``t + s``
(with that index's loss weight). A pair counts only when ``t + s`` lies in the same document as
``t`` (upstream scores across document boundaries of a packed row; this does not).

* ``loss_s = gamma**s * sum_t valid_s(t) * D(p_{t+s}, q_t) / sum_t valid_s(t)`` over the draft
  vocabulary, ``p`` = softmax of the verifier logits restricted to it, in fp32, where ``D`` is
  the training objective (:mod:`speculators_core.objectives`; forward KL by default, any
  installed objective or weighted mix by the ``objective`` option); the total loss is
  ``sum_s loss_s``.
* ``correct_s(t)``: draft argmax equals verifier argmax; ``chain_s(t) = correct_0..s(t)`` all
  true. ``full_acc_s`` = fraction of valid positions with ``chain_s`` (the chance that ``s + 1``
  drafted tokens are all accepted); ``cond_acc_s`` = the same among positions whose chain
  survived step ``s - 1`` (acceptance of draft ``s`` given the earlier ones were accepted).
* ``est_accept_len = 1 + sum_s full_acc_s`` (accepted drafts plus the verifier's own token) is
  derived from these by the core (``speculators_core.train.metrics.derive_metrics``), not here.

How it is computed (the same numbers, less work): :func:`plan_ttt_loss` lists, once per
batch, the positions each step reads (:class:`TTTLossPlan`), so the model computes draft
logits and verifier targets only there; the target log-softmax is taken once per position,
not once per step (:class:`~speculators_core.objectives.TargetDistribution`). With the LM head
frozen (the default) the model hands each step's final states to :func:`ttt_loss_states`, which
scores them through the head a chunk of rows at a time and keeps one ``[N, H]`` gradient per
step for the backward pass, no ``[N, Vd]`` tensor
(:func:`~speculators_core.head_loss.head_objective`); with a trainable head
:func:`ttt_loss_rows` scores the logits, keeping one ``[N, Vd]`` tensor per step (the default
forward KL's hand-written backward, ``softmax(logits) - p``, or any other objective's gradient
computed chunk by chunk in the forward pass: ``WeightedObjective``). :func:`ttt_loss` takes
full ``[B, T, Vd]`` logits and does the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from speculators_core import TrainingStepOutput, objectives
from speculators_core.head_loss import head_objective
from speculators_core.objectives import TargetDistribution, WeightedObjective, default_objective

__all__ = [
    "TTTLossPlan",
    "forward_kl",
    "plan_ttt_loss",
    "step_valid_mask",
    "ttt_loss",
    "ttt_loss_rows",
    "ttt_loss_states",
]


def step_valid_mask(document_ids: torch.Tensor, loss_mask: torch.Tensor, step: int) -> torch.Tensor:
    """``[B, T]`` bool: index ``t`` is scored at step ``step`` (aligned ids and mask)."""
    length = document_ids.shape[1]
    valid = torch.zeros(document_ids.shape, dtype=torch.bool, device=document_ids.device)
    if step < length:
        here, future = document_ids[:, : length - step], document_ids[:, step:]
        valid[:, : length - step] = (here >= 0) & (future == here) & loss_mask[:, step:].bool()
    return valid


def forward_kl(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(target) || softmax(logits))`` per position, in fp32: ``[..., V] -> [...]``
    (the core's :func:`~speculators_core.objectives.forward_kl`, from logits)."""
    return objectives.forward_kl(logits, TargetDistribution.from_logits(target_logits))


@dataclass(frozen=True)
class TTTLossPlan:
    """Which positions of a packed batch each TTT step reads, as flat indices ``b * T + t``.

    Built once per batch (:func:`plan_ttt_loss`) from the aligned document ids and loss mask.
    Step ``s`` needs the draft logits at index ``t`` when ``t`` is scored at step ``s`` or at a
    later step (the acceptance chain of a later step runs through this step's argmax), and
    the verifier target at ``t + s``; nothing else enters the loss or the metrics, so the model
    computes logits and targets only there.
    """

    valid: list[torch.Tensor]  # per step, [B*T] bool: scored at this step (step_valid_mask)
    rows: list[torch.Tensor]  # per step, [N_s] int64 ascending: indices whose logits it reads
    target_rows: torch.Tensor  # [U] int64 ascending: indices whose verifier targets are read
    target_index: list[torch.Tensor]  # per step, [N_s] int64: where rows[s] + s is in target_rows


def plan_ttt_loss(document_ids: torch.Tensor, loss_mask: torch.Tensor, steps: int) -> TTTLossPlan:
    """The :class:`TTTLossPlan` of ``steps`` TTT steps over aligned ``[B, T]`` ids and mask."""
    valid = [step_valid_mask(document_ids, loss_mask, s).reshape(-1) for s in range(steps)]
    rows: list[torch.Tensor] = []
    needed = torch.zeros_like(valid[0])
    for step in reversed(range(steps)):
        needed = needed | valid[step]
        rows.insert(0, needed.nonzero().squeeze(1))
    # rows[s] + s stays in the row of rows[s]: a needed index has a scored index >= s ahead.
    wanted = torch.zeros_like(valid[0])
    for step, index in enumerate(rows):
        wanted[index + step] = True
    target_rows = wanted.nonzero().squeeze(1)
    position = wanted.long().cumsum(0) - 1  # index -> its place in target_rows
    target_index = [position[index + step] for step, index in enumerate(rows)]
    return TTTLossPlan(valid, rows, target_rows, target_index)


def ttt_loss(
    step_logits: Sequence[torch.Tensor],
    target_logits: torch.Tensor,
    document_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    step_loss_decay: float = 1.0,
    objective: WeightedObjective | None = None,
) -> TrainingStepOutput:
    """Loss and metrics of one TTT forward.

    ``step_logits[s]`` is ``[B, T, Vd]`` (draft logits of step ``s``), ``target_logits``
    ``[B, T, Vd]`` the verifier logits at each aligned index; ``document_ids``/``loss_mask`` are
    the aligned ones. Metric weights are the counts each metric averages over, so micro-batches
    combine exactly.
    """
    plan = plan_ttt_loss(document_ids, loss_mask, len(step_logits))
    vocab = target_logits.shape[-1]
    return ttt_loss_rows(
        plan,
        [logits.reshape(-1, vocab)[rows] for logits, rows in zip(step_logits, plan.rows)],
        target_logits.reshape(-1, vocab)[plan.target_rows],
        step_loss_decay=step_loss_decay,
        objective=objective,
    )


def ttt_loss_rows(
    plan: TTTLossPlan,
    step_logits: Sequence[torch.Tensor],
    target_logits: torch.Tensor | TargetDistribution,
    *,
    step_loss_decay: float = 1.0,
    objective: WeightedObjective | None = None,
) -> TrainingStepOutput:
    """:func:`ttt_loss` from the rows the plan names: ``step_logits[s]`` is ``[N_s, Vd]`` at
    ``plan.rows[s]``, ``target_logits`` ``[U, Vd]`` at ``plan.target_rows`` (or their
    :class:`~speculators_core.objectives.TargetDistribution`). ``objective`` is the
    per-position loss (forward KL when None)."""
    target = (
        target_logits
        if isinstance(target_logits, TargetDistribution)
        else TargetDistribution.from_logits(target_logits)  # once per batch, not per step
    )
    score = objective if objective is not None else default_objective()
    scored = (
        (score(logits, target.take(index)), logits.detach().argmax(dim=-1))
        for logits, index in zip(step_logits, plan.target_index, strict=True)
    )
    return _ttt_loss(plan, scored, target.ids, step_loss_decay)


def ttt_loss_states(
    plan: TTTLossPlan,
    step_states: Sequence[torch.Tensor],
    head: torch.Tensor,
    target: TargetDistribution,
    *,
    step_loss_decay: float = 1.0,
    objective: WeightedObjective | None = None,
) -> TrainingStepOutput:
    """:func:`ttt_loss_rows` from each step's normed final states ``[N_s, H]`` and the frozen
    LM head ``[Vd, H]``: the same loss and metrics, computed through
    :func:`~speculators_core.head_loss.head_objective` (no step's ``[N_s, Vd]`` logits kept
    for the backward pass)."""
    score = objective if objective is not None else default_objective()
    scored = (
        head_objective(states, head, score.plain, target, index)
        for states, index in zip(step_states, plan.target_index, strict=True)
    )
    return _ttt_loss(plan, scored, target.ids, step_loss_decay)


def _ttt_loss(
    plan: TTTLossPlan,
    scored: Iterable[tuple[torch.Tensor, torch.Tensor]],
    target_ids: torch.Tensor,
    step_loss_decay: float,
) -> TrainingStepOutput:
    """Loss and metrics from each step's per-position loss ``[N_s]`` and draft argmax ``[N_s]``
    at ``plan.rows[s]``; ``target_ids`` ``[U]`` the verifier's argmax at ``plan.target_rows``."""
    device = target_ids.device
    total = torch.zeros((), device=device)
    metrics: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    chain = torch.ones_like(plan.valid[0])  # [B*T]: correct at every step so far
    first_count = torch.zeros((), device=device)
    for step, (per_position, argmax) in enumerate(scored):
        rows, index, valid = plan.rows[step], plan.target_index[step], plan.valid[step]
        count = valid.sum()
        step_loss = (
            (step_loss_decay**step) * (per_position * valid[rows]).sum() / count.clamp(min=1)
        )
        total = total + step_loss

        with torch.no_grad():
            correct = torch.zeros_like(chain)
            correct[rows] = argmax == target_ids[index]
            survived = chain & valid  # chain intact before this step
            chain = chain & correct
            hits = (chain & valid).sum()
            full_acc = hits / count.clamp(min=1)
            cond_total = survived.sum()
            metrics[f"loss_{step}"] = step_loss.detach()
            metrics[f"full_acc_{step}"] = full_acc.float()
            metrics[f"cond_acc_{step}"] = (hits / cond_total.clamp(min=1)).float()
            weights[f"loss_{step}"] = count
            weights[f"full_acc_{step}"] = count
            weights[f"cond_acc_{step}"] = cond_total
            if step == 0:
                first_count = count
    metrics["loss"] = total.detach()
    weights["loss"] = first_count
    return TrainingStepOutput(loss=total, metrics=metrics, weights=weights)
