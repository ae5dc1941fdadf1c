"""Registers ``sampled``, ``block`` and ``tree`` with speculators-core (entry point
``speculators.plugins:proposals``)."""

from __future__ import annotations

from collections.abc import Sequence

from speculators_core import ProposalMethod, ProposalServing, hookimpl
from speculators_core.proposals import standard_rule
from speculators_proposals.block import BlockTokenProposalConfig, block_rule
from speculators_proposals.sampled import SampledTokenProposalConfig, sampled_chain
from speculators_proposals.tree import TreeTokenProposalConfig, tree_round

__all__ = ["BLOCK", "SAMPLED", "TREE", "speculators_register_proposal_methods"]

SAMPLED = ProposalMethod(
    name="sampled",
    config_class=SampledTokenProposalConfig,
    description="chain drafting, each token sampled from the draft; standard rejection sampling",
    draft=sampled_chain,
    accept=standard_rule,
    vllm=ProposalServing(speculative_config={"draft_sample_method": "probabilistic"}),
)

BLOCK = ProposalMethod(
    name="block",
    config_class=BlockTokenProposalConfig,
    description="chain drafting, each token sampled from the draft; block verification "
    "(Sun et al. 2024)",
    draft=sampled_chain,
    accept=block_rule,
    vllm=ProposalServing(
        speculative_config={
            "draft_sample_method": "probabilistic",
            "rejection_sample_method": "block",
        },
        cpu_refusal="vLLM for CPU runs the V1 model runner, whose rejection sampler "
        "(vllm/v1/sample/rejection_sampler.py) has no block verification (only the V2 runner's "
        "vllm/v1/worker/gpu/spec_decode/rejection_sampler_utils.py does); it would verify token "
        "by token",
    ),
)


TREE = ProposalMethod(
    name="tree",
    config_class=TreeTokenProposalConfig,
    description="EAGLE-2-style dynamic draft tree (16 nodes, 4 children per node, depth k) "
    "verified in one forward with a tree attention mask",
    round=tree_round,
    vllm=None,  # vLLM's token trees are static and need its GPU tree attention backend
)


@hookimpl
def speculators_register_proposal_methods() -> Sequence[ProposalMethod]:
    """The three proposal methods of speculators-proposals."""
    return [SAMPLED, BLOCK, TREE]
