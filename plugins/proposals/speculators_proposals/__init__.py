"""speculators-proposals: proposal methods with behaviour for speculators-core.

``sampled`` (probabilistic chain drafting, standard rejection sampling) and ``block`` (block
verification, Sun et al. 2024) for the reference decoder (``speculators eval --proposal NAME
--temperature T``), each with the ``speculative_config`` keys vLLM needs.
"""

from speculators_proposals.block import BlockTokenProposalConfig, block_rule
from speculators_proposals.plugin import BLOCK, SAMPLED
from speculators_proposals.sampled import SampledTokenProposalConfig, sampled_chain

__all__ = [
    "BLOCK",
    "SAMPLED",
    "BlockTokenProposalConfig",
    "SampledTokenProposalConfig",
    "block_rule",
    "sampled_chain",
]
