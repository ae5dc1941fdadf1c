"""speculators-eagle3: the EAGLE-3 draft algorithm as a speculators-core plugin.

Build a draft with :meth:`Eagle3DraftModel.from_verifier`, train it through
:meth:`Eagle3DraftModel.training_step`, draft with :meth:`Eagle3DraftModel.draft_session`, and
save it with ``save_pretrained`` in the speculators ``eagle3`` format that vLLM serves.
:class:`PEagleDraftModel` (``peagle``) is the same draft proposing all ``k`` tokens in one
forward (:mod:`speculators_eagle3.peagle`).
"""

from speculators_eagle3.attention import ttt_attention_mask
from speculators_eagle3.config import Eagle3SpeculatorConfig, PEagleSpeculatorConfig
from speculators_eagle3.drafting import Eagle3DraftSession
from speculators_eagle3.model import Eagle3DraftModel, default_aux_layer_ids
from speculators_eagle3.peagle import PEagleDraftModel, PEagleDraftSession

__all__ = [
    "Eagle3DraftModel",
    "Eagle3DraftSession",
    "Eagle3SpeculatorConfig",
    "PEagleDraftModel",
    "PEagleDraftSession",
    "PEagleSpeculatorConfig",
    "default_aux_layer_ids",
    "ttt_attention_mask",
]
