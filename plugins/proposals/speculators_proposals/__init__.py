"""speculators-proposals: proposal methods with behaviour for speculators-core.

``sampled`` (probabilistic chain drafting, standard rejection sampling), ``block`` (block
verification, Sun et al. 2024) and ``tree`` (an EAGLE-2-style dynamic draft tree) for the
reference decoder (``speculators eval --proposal NAME
--temperature T``), each with the ``speculative_config`` keys vLLM needs.
"""

from speculators_proposals.block import BlockTokenProposalConfig, block_rule
from speculators_proposals.plugin import BLOCK, SAMPLED, TREE
from speculators_proposals.sampled import SampledTokenProposalConfig, sampled_chain
from speculators_proposals.tree import TreeTokenProposalConfig, build_tree, tree_round

__all__ = [
    "BLOCK",
    "SAMPLED",
    "TREE",
    "BlockTokenProposalConfig",
    "SampledTokenProposalConfig",
    "TreeTokenProposalConfig",
    "block_rule",
    "build_tree",
    "sampled_chain",
    "tree_round",
]
