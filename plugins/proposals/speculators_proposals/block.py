"""``block``: block verification (Sun et al. 2024, "Block Verification Accelerates Speculative
Decoding", arXiv 2403.10444), with probabilistic drafting.

Token-by-token verification stops at the first rejected token. Block verification judges the
drafted block as a whole: with ``p_i``/``q_i`` the verifier's/draft's distributions after ``i``
drafted tokens ``X_1..X_i``, the running weight is

    w_0 = 1,   w_i = min(1, w_{i-1} * p_{i-1}(X_i) / q_{i-1}(X_i))

and the stop point ``tau`` is the last ``i`` in ``1..k`` with ``u_i <= h_i`` (``u_i`` uniform,
``tau = 0`` when none), where

    h_i = r_i / (r_i + 1 - w_i),   r_i = sum_x max(0, w_i * p_i(x) - q_i(x))   for i < k
    h_k = w_k.

The round keeps ``X_1..X_tau`` and draws one more token from ``p_k`` when ``tau = k``, else from
``normalize(max(0, w_tau * p_tau - q_tau))``. The emitted tokens are distributed exactly as the
verifier's own sampling, and the expected number of kept tokens is never below the token-by-token
rule's on the same draft (the paper's theorems; both are tested here). At one drafted token it
is the standard rule.

vLLM 0.32 implements it only in its V2 model runner (``rejection_sample_method: block``,
``vllm/v1/worker/gpu/spec_decode/rejection_sampler_utils.py``); vLLM for CPU runs the V1 runner,
whose rejection sampler (``vllm/v1/sample/rejection_sampler.py``) knows only ``standard`` and
``synthetic`` and would verify token by token, so serving it there is refused.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from speculators_core import TokenProposalConfig
from speculators_core.proposals import draw_residual

__all__ = ["BlockTokenProposalConfig", "block_rule"]


class BlockTokenProposalConfig(TokenProposalConfig):
    """Chain drafting of ``speculative_tokens`` sampled tokens, verified as a block."""

    proposal_type: Literal["block"] = "block"
    speculative_tokens: int = Field(default=3, ge=1)


def block_rule(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Block verification of one round (see the module doc): ``(accepted, next_token)``.

    ``draft_probs`` ``[k, V]`` are the distributions the drafted tokens were drawn from,
    ``target_probs`` ``[k+1, V]`` the verifier's after each drafted prefix.
    """
    k = draft_tokens.shape[0]
    weight = 1.0
    weights = [1.0]  # w_0 .. w_k
    stop = 0
    for i in range(1, k + 1):
        token = int(draft_tokens[i - 1])
        p, q = float(target_probs[i - 1, token]), float(draft_probs[i - 1, token])
        weight = min(1.0, weight * p / q) if q > 0 else 0.0
        weights.append(weight)
        if i < k:
            residual = float((weight * target_probs[i] - draft_probs[i]).clamp(min=0).sum())
            denominator = residual + 1.0 - weight
            h = residual / denominator if denominator > 0 else 1.0
        else:
            h = weight
        if float(torch.rand((), generator=generator)) <= h:
            stop = i
    if stop == k:
        return k, int(torch.multinomial(target_probs[k], 1, generator=generator))
    residual_dist = (weights[stop] * target_probs[stop] - draft_probs[stop]).clamp(min=0)
    return stop, draw_residual(residual_dist, target_probs[stop], generator)
