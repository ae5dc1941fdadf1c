"""speculators-dflash: DFlash block drafters as a speculators-core plugin.

Build a draft with :meth:`DFlashDraftModel.from_verifier`, train it through
:meth:`DFlashDraftModel.training_step`, draft ``k`` tokens per forward with
:meth:`DFlashDraftModel.draft_session`, and save it in the speculators ``dflash`` format that
vLLM serves (``method: dflash``).
"""

from speculators_dflash.config import DFlashSpeculatorConfig
from speculators_dflash.model import (
    DFlashDraftModel,
    DFlashDraftSession,
    block_attention_mask,
    position_weights,
)

__all__ = [
    "DFlashDraftModel",
    "DFlashDraftSession",
    "DFlashSpeculatorConfig",
    "block_attention_mask",
    "position_weights",
]
