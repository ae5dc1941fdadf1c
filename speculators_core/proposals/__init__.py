"""Token-proposal methods shipped with the core (registered through the hooks like any plugin)."""

from speculators_core.config import GreedyTokenProposalConfig
from speculators_core.proposals.chain import (
    GREEDY,
    ChainDraft,
    RoundResult,
    Verify,
    argmax_chain,
    chain_round,
    draw_residual,
    greedy_match,
    one_hot_rows,
    standard_rule,
)

__all__ = [
    "GREEDY",
    "ChainDraft",
    "GreedyTokenProposalConfig",
    "RoundResult",
    "Verify",
    "argmax_chain",
    "chain_round",
    "draw_residual",
    "greedy_match",
    "one_hot_rows",
    "standard_rule",
]
