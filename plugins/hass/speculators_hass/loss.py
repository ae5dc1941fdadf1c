"""The HASS training loss of one step, and its sum over steps (FORMAT.md 3.5).

At every step ``s`` the draft's prediction at aligned index ``t`` is compared with the *same*
target, the verifier feature ``f_{t+1}`` (HASS shifts the features it feeds, never the targets).
Over the ``n`` supervised indices of a batch, with ``p = softmax(lm_head(f_{t+1}))`` (the
verifier's distribution, frozen LM head) and ``log q = log_softmax(head(prediction))``:

* ``vloss_s  = sum_t mean_h SmoothL1(prediction_t, f_{t+1}) / n`` (feature regression, beta 1),
* ``ploss_s  = -sum_t sum_v p_t(v) log q_t(v) / n`` (distribution loss, a cross-entropy),
* ``topk_loss_s = -sum_t sum_{v in topK(p_t)} p_t(v) log q_t(v) / n`` ("harmonized objective
  distillation": the same sum restricted to the verifier's ``K`` most likely tokens),
* ``cond_acc_s = sum_t [argmax q_t == argmax p_t] / n`` (the draft's step-``s`` token equals
  the verifier's greedy token). Step ``s`` drafts with ``s`` of its own features in its context
  and the true tokens, as draft position ``s`` does once the drafts before it were accepted:
  this is the conditional acceptance of the core's metric convention, from which the core
  derives ``est_accept_len`` (``speculators_core.train.metrics``).

The step loss is ``v_w * vloss_s + p_w * ploss_s + topk_w * topk_loss_s`` (published weights
``v_w = 1.0``, ``p_w = 0.1``, ``topk_w = 1.0`` in stage 2 and ``0`` in stage 1, ``K = 10``) and
the returned loss is the sum over steps. HASS calls ``backward`` once per step; one backward of
the sum gives the same gradients. HASS divides by ``n + 1e-5``; this divides by ``max(n, 1)``
(identical up to that epsilon whenever ``n > 0``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from speculators_core import SpeculatorsError, TrainingStepOutput

__all__ = ["HassLossWeights", "StepTerms", "hass_loss", "step_terms"]


@dataclass(frozen=True)
class HassLossWeights:
    """The weights of the three HASS loss terms and ``K`` of the top-K term."""

    v_w: float = 1.0
    p_w: float = 0.1
    topk_w: float = 1.0
    topk: int = 10

    def __post_init__(self) -> None:
        for name in ("v_w", "p_w", "topk_w"):
            value = getattr(self, name)
            if value < 0:
                raise SpeculatorsError(f"loss weight {name} must be >= 0, got {value}")
        if self.topk < 1:
            raise SpeculatorsError(f"topk must be at least 1, got {self.topk}")


@dataclass
class StepTerms:
    """Sums (not means) of one step's loss terms over ``n`` supervised indices."""

    vloss: torch.Tensor
    ploss: torch.Tensor
    topk_loss: torch.Tensor
    correct: torch.Tensor


def step_terms(
    logits: torch.Tensor,  # [n, V] draft logits
    prediction: torch.Tensor,  # [n, H] predicted features
    target_log_p: torch.Tensor,  # [n, V] verifier log-probabilities (fp32)
    target_features: torch.Tensor,  # [n, H]
    topk_index: torch.Tensor,  # [n, K] the verifier's K most likely tokens
    target_ids: torch.Tensor,  # [n] the verifier's greedy tokens
) -> StepTerms:
    """The summed loss terms of one step (see the module docstring), in fp32."""
    log_q = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    p = target_log_p.exp()
    p_log_q = p * log_q  # [n, V]
    regression = F.smooth_l1_loss(
        prediction.float(), target_features.float(), reduction="none", beta=1.0
    )  # [n, H]
    with torch.no_grad():
        correct = (logits.argmax(dim=-1) == target_ids).sum()
    return StepTerms(
        vloss=regression.mean(dim=-1).sum(),
        ploss=-p_log_q.sum(),
        topk_loss=-p_log_q.gather(1, topk_index).sum(),
        correct=correct,
    )


def hass_loss(
    predictions: Sequence[torch.Tensor],
    target_features: torch.Tensor,
    valid: torch.Tensor,
    *,
    head: Callable[[torch.Tensor], torch.Tensor],
    target_head: Callable[[torch.Tensor], torch.Tensor],
    weights: HassLossWeights,
) -> TrainingStepOutput:
    """Loss and metrics of one HASS forward.

    ``predictions[s]`` is step ``s``'s predicted features ``[B, T, H]``; ``target_features`` is
    ``[B, T, H]`` (``f_{t+1}`` at aligned index ``t``) and ``valid`` ``[B, T]`` the supervised
    indices. ``head`` maps predicted features to draft logits (the frozen LM head, after the
    optional pre-LM-head norm), ``target_head`` target features to verifier logits. Logits are
    computed for supervised indices only. Metrics: ``vloss_{s}``, ``ploss_{s}``,
    ``topk_loss_{s}``, ``cond_acc_{s}`` and ``loss``, each weighted by the number of supervised
    indices (so micro-batches combine exactly).
    """
    count = valid.sum()
    denominator = count.clamp(min=1).float()
    targets = target_features[valid]  # [n, H]
    with torch.no_grad():
        target_log_p = torch.log_softmax(target_head(targets).float(), dim=-1)  # [n, V]
        k = min(weights.topk, target_log_p.shape[-1])
        topk_index = target_log_p.topk(k, dim=-1).indices  # [n, K]
        target_ids = target_log_p.argmax(dim=-1)  # [n]
    total = torch.zeros((), device=target_features.device)
    metrics: dict[str, torch.Tensor] = {}
    for step, prediction in enumerate(predictions):
        predicted = prediction[valid]  # [n, H]
        terms = step_terms(
            head(predicted), predicted, target_log_p, targets, topk_index, target_ids
        )
        vloss = terms.vloss / denominator
        ploss = terms.ploss / denominator
        topk_loss = terms.topk_loss / denominator
        total = total + weights.v_w * vloss + weights.p_w * ploss + weights.topk_w * topk_loss
        metrics[f"vloss_{step}"] = vloss.detach()
        metrics[f"ploss_{step}"] = ploss.detach()
        metrics[f"topk_loss_{step}"] = topk_loss.detach()
        metrics[f"cond_acc_{step}"] = (terms.correct / denominator).detach()
    metrics["loss"] = total.detach()
    return TrainingStepOutput(loss=total, metrics=metrics, weights=dict.fromkeys(metrics, count))
