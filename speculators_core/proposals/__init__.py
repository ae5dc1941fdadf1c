"""Token-proposal methods shipped with the core (registered through the hooks like any plugin)."""

from speculators_core.config import GreedyTokenProposalConfig

__all__ = ["GreedyTokenProposalConfig"]
