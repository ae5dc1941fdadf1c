"""Chain proposals: the draft proposes ``k`` tokens one after another, the verifier checks them.

The pieces a :class:`~speculators_core.plugins.records.ProposalMethod` is made of, and the core's
own ``greedy`` method (vLLM's default: ``draft_sample_method: greedy``, standard rejection):

* :func:`argmax_chain` drafts the draft's argmax at every position; the drafted tokens were
  "drawn" from one-hot distributions, which is what the acceptance rule must be told.
* :func:`standard_rule` is rejection sampling (Leviathan et al. 2023): drafted token ``d`` at
  position ``i`` is kept with probability ``min(1, p_i(d) / q_i(d))``; at the first rejection a
  token is drawn from ``normalize(max(0, p_i - q_i))``; after ``k`` accepts the bonus token
  from ``p_k``. Emitted tokens are distributed exactly as the verifier's own sampling, whatever
  ``q`` is, as long as ``q_i`` is the distribution ``d_i`` was drawn from.
* :func:`greedy_match` is the temperature-0 rule every lossless method reduces to: the longest
  drafted prefix equal to the verifier's argmax, then the verifier's argmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from speculators_core.config import GreedyTokenProposalConfig
from speculators_core.plugins.records import ProposalMethod, ProposalServing

__all__ = [
    "GREEDY",
    "ChainDraft",
    "argmax_chain",
    "greedy_match",
    "one_hot_rows",
    "standard_rule",
]


@dataclass
class ChainDraft:
    """``k`` drafted tokens (``[k]``, verifier ids) and the distributions they were drawn from
    (``[k, V]`` probabilities over the verifier vocabulary)."""

    tokens: torch.Tensor
    probs: torch.Tensor


def one_hot_rows(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[k, V]`` float rows, 1 at each token."""
    rows = torch.zeros(tokens.shape[0], vocab_size, dtype=torch.float32, device=tokens.device)
    rows[torch.arange(tokens.shape[0], device=tokens.device), tokens] = 1.0
    return rows


def argmax_chain(
    session: Any, k: int, temperature: float, generator: torch.Generator | None = None
) -> ChainDraft:
    """The draft's argmax ``k`` times (batch size 1); its distributions are one-hot."""
    proposal = session.propose(k, temperature=0.0, generator=generator)
    tokens = proposal.tokens[0]
    return ChainDraft(tokens=tokens, probs=one_hot_rows(tokens, proposal.logits.shape[-1]))


def standard_rule(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Rejection-sampling verification of one round (see the module doc).

    ``draft_probs`` ``[k, V]`` are the distributions the drafted tokens were drawn from,
    ``target_probs`` ``[k+1, V]`` the verifier's. Returns ``(accepted, next_token)``.
    """
    k = draft_tokens.shape[0]
    for i in range(k):
        token = int(draft_tokens[i])
        p, q = float(target_probs[i, token]), float(draft_probs[i, token])
        u = float(torch.rand((), generator=generator))
        if q > 0 and u < min(1.0, p / q):
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp(min=0)
        total = float(residual.sum())
        # p == q everywhere leaves no residual mass; then rejection has probability 0, so this
        # branch is only reached through floating-point noise: fall back to p itself.
        weights = residual / total if total > 0 else target_probs[i]
        return i, int(torch.multinomial(weights, 1, generator=generator))
    return k, int(torch.multinomial(target_probs[k], 1, generator=generator))


def greedy_match(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """Greedy verification of one round.

    ``draft_tokens`` is ``[k]``; ``target_logits`` is ``[k+1, V]`` (row ``i`` is the verifier's
    prediction after drafted token ``i``, row 0 after the last verified token). Returns
    ``(accepted, next_token)``.
    """
    target = target_logits.argmax(dim=-1)
    k = draft_tokens.shape[0]
    accepted = 0
    while accepted < k and int(draft_tokens[accepted]) == int(target[accepted]):
        accepted += 1
    return accepted, int(target[accepted])


#: The core's ``greedy`` method: argmax chains, standard rejection; vLLM's defaults.
GREEDY = ProposalMethod(
    name="greedy",
    config_class=GreedyTokenProposalConfig,
    description="chain drafting of speculative_tokens tokens, each the draft's argmax; "
    "standard rejection sampling (vLLM's defaults)",
    draft=argmax_chain,
    accept=standard_rule,
    vllm=ProposalServing(),
)
