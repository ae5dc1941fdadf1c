"""Token-proposal methods shipped with the core (registered through the hooks like any plugin)."""

from speculators_core.config import GreedyTokenProposalConfig
from speculators_core.proposals.chain import (
    GREEDY,
    ChainDraft,
    argmax_chain,
    greedy_match,
    one_hot_rows,
    standard_rule,
)

__all__ = [
    "GREEDY",
    "ChainDraft",
    "GreedyTokenProposalConfig",
    "argmax_chain",
    "greedy_match",
    "one_hot_rows",
    "standard_rule",
]
