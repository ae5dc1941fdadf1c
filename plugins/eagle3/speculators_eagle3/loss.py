"""Per-step EAGLE-3 training loss and acceptance metrics (FORMAT.md 3.3).

At TTT step ``s`` the draft's logits at aligned index ``t`` predict the token the verifier emits
``s`` positions later, so they are scored against the verifier distribution at index ``t + s``
(with that index's loss weight). A pair counts only when ``t + s`` lies in the same document as
``t`` (upstream scores across document boundaries of a packed row; this does not).

* ``loss_s = gamma**s * sum_t valid_s(t) * KL(p_{t+s} || q_t) / sum_t valid_s(t)`` with forward KL
  over the draft vocabulary, ``p`` = softmax of the verifier logits restricted to it, in fp32;
  the total loss is ``sum_s loss_s``.
* ``correct_s(t)``: draft argmax equals verifier argmax; ``chain_s(t) = correct_0..s(t)`` all
  true. ``full_acc_s`` = fraction of valid positions with ``chain_s`` (the chance that ``s + 1``
  drafted tokens are all accepted); ``cond_acc_s`` = the same among positions whose chain
  survived step ``s - 1`` (acceptance of draft ``s`` given the earlier ones were accepted).
* ``est_accept_len = 1 + sum_s full_acc_s`` (accepted drafts plus the verifier's own token).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from speculators_core import TrainingStepOutput
from speculators_eagle3.alignment import shift_left

__all__ = ["forward_kl", "step_valid_mask", "ttt_loss"]


def step_valid_mask(document_ids: torch.Tensor, loss_mask: torch.Tensor, step: int) -> torch.Tensor:
    """``[B, T]`` bool: index ``t`` is scored at step ``step`` (aligned ids and mask)."""
    future_doc = shift_left(document_ids, step, fill=-1)
    future_mask = shift_left(loss_mask.bool(), step, fill=False)
    return (document_ids >= 0) & (future_doc == document_ids) & future_mask


def forward_kl(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(target) || softmax(logits))`` per position, in fp32: ``[..., V] -> [...]``."""
    log_q = torch.log_softmax(logits.float(), dim=-1)
    log_p = torch.log_softmax(target_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def ttt_loss(
    step_logits: Sequence[torch.Tensor],
    target_logits: torch.Tensor,
    document_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    step_loss_decay: float = 1.0,
) -> TrainingStepOutput:
    """Loss and metrics of one TTT forward.

    ``step_logits[s]`` is ``[B, T, Vd]`` (draft logits of step ``s``), ``target_logits``
    ``[B, T, Vd]`` the verifier logits at each aligned index; ``document_ids``/``loss_mask`` are
    the aligned ones. Metric weights are the counts each metric averages over, so micro-batches
    combine exactly.
    """
    device = target_logits.device
    total = torch.zeros((), device=device)
    metrics: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    chain = torch.ones_like(document_ids, dtype=torch.bool)  # correct at every step so far
    target_ids = target_logits.argmax(dim=-1)  # [B, T]
    accept_len = torch.ones((), device=device)
    first_count = torch.zeros((), device=device)
    for step, logits in enumerate(step_logits):
        valid = step_valid_mask(document_ids, loss_mask, step)  # [B, T]
        count = valid.sum()
        kl = forward_kl(logits, shift_left(target_logits, step))  # [B, T]
        step_loss = (step_loss_decay**step) * (kl * valid).sum() / count.clamp(min=1)
        total = total + step_loss

        with torch.no_grad():
            correct = logits.argmax(dim=-1) == shift_left(target_ids, step)
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
            accept_len = accept_len + full_acc
            if step == 0:
                first_count = count
    metrics["loss"] = total.detach()
    metrics["est_accept_len"] = accept_len.float()
    weights["loss"] = first_count
    weights["est_accept_len"] = first_count
    return TrainingStepOutput(loss=total, metrics=metrics, weights=weights)
