"""``sampled``: probabilistic chain drafting, standard rejection sampling.

The draft samples each of its ``k`` tokens from ``softmax(logits / T)`` (the same temperature as
the verifier) and the rule compares the verifier's probability with that draft distribution
(Leviathan et al. 2023), instead of treating the draft as one-hot as ``greedy`` does. When the
draft's distribution resembles the verifier's, this accepts more at ``T > 0``. vLLM:
``draft_sample_method: probabilistic`` (served by the V1 runner vLLM for CPU uses).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from speculators_core import TokenProposalConfig
from speculators_core.proposals import ChainDraft

__all__ = ["SampledTokenProposalConfig", "sampled_chain"]


class SampledTokenProposalConfig(TokenProposalConfig):
    """Chain drafting of ``speculative_tokens`` tokens, each sampled from the draft."""

    proposal_type: Literal["sampled"] = "sampled"
    speculative_tokens: int = Field(default=3, ge=1)


def sampled_chain(
    session: Any, k: int, temperature: float, generator: torch.Generator | None = None
) -> ChainDraft:
    """``k`` tokens, each drawn from the draft's ``softmax(logits / temperature)`` (batch 1)."""
    proposal = session.propose(k, temperature=temperature, generator=generator)
    probs = torch.softmax(proposal.logits[0].float() / temperature, dim=-1)
    return ChainDraft(tokens=proposal.tokens[0], probs=probs)
