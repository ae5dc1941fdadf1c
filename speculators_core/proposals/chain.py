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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from speculators_core.config import GreedyTokenProposalConfig
from speculators_core.plugins.records import ProposalMethod, ProposalServing

__all__ = [
    "GREEDY",
    "ChainDraft",
    "RoundResult",
    "Verify",
    "argmax_chain",
    "chain_round",
    "draw_residual",
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


class Verify(Protocol):
    """The verifier's forward over one round's drafted tokens, given by the reference decoder.

    ``tokens`` are drafted tokens (verifier ids) and ``parents[i]`` the row of token ``i``'s
    parent: row 0 is the newest verified token, row ``j + 1`` drafted token ``j`` (a chain has
    ``parents = [0, 1, ..., n-1]``; a tree any rows before its own). Each drafted token sees the
    verified context and its ancestors only. Returns the verifier's logits ``[1 + n, V]``: row
    ``r`` predicts the token after row ``r``.
    """

    def __call__(self, tokens: Sequence[int], parents: Sequence[int]) -> torch.Tensor: ...


@dataclass
class RoundResult:
    """What one round keeps: ``path``, the rows (``1 + i`` for drafted token ``i``) of the
    accepted drafted tokens from the root down, and ``next_token``, the token emitted after them."""

    path: list[int]
    next_token: int


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
        return i, draw_residual(residual, target_probs[i], generator)
    return k, int(torch.multinomial(target_probs[k], 1, generator=generator))


def draw_residual(
    residual: torch.Tensor, fallback: torch.Tensor, generator: torch.Generator | None = None
) -> int:
    """One token from the non-negative ``residual`` weights ``[V]``, normalized.

    What a rejection draws from. A residual with no mass means rejection had probability 0 (the
    draft's distribution equals the verifier's where it matters), so it is only reached through
    floating-point noise: the token is then drawn from ``fallback`` (the verifier's
    distribution) itself.
    """
    total = float(residual.sum())
    weights = residual / total if total > 0 else fallback
    return int(torch.multinomial(weights, 1, generator=generator))


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


def chain_round(
    method: Any,
    session: Any,
    verify: Verify,
    k: int,
    temperature: float,
    generator: torch.Generator | None = None,
) -> RoundResult:
    """One chain round: ``method.draft`` proposes ``k`` tokens (argmax chains at temperature 0),
    the verifier scores them at once, and ``method.accept`` keeps a prefix (the exact-match rule
    at temperature 0, every lossless rule's limit)."""
    if temperature <= 0:
        chain = argmax_chain(session, k, 0.0, generator)
    else:
        chain = (method.draft or argmax_chain)(session, k, temperature, generator)
    tokens = chain.tokens.tolist()
    logits = verify(tokens, list(range(len(tokens))))  # [k + 1, V]
    drafted = torch.as_tensor(tokens, device=logits.device)
    if temperature <= 0:
        accepted, next_token = greedy_match(drafted, logits)
    else:
        target = torch.softmax(logits.float() / temperature, dim=-1)
        rule = method.accept or standard_rule
        accepted, next_token = rule(drafted, chain.probs.to(logits.device), target, generator)
    return RoundResult(path=list(range(1, accepted + 1)), next_token=next_token)


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
