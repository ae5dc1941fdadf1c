"""speculators-hass: EAGLE-1/2 drafts trained the HASS way, as a speculators-core plugin.

Build a draft with :meth:`EagleDraftModel.from_verifier`, train it through
:meth:`EagleDraftModel.training_step` (harmonized context alignment and HASS's losses), draft
with :meth:`EagleDraftModel.draft_session`, save it with ``save_pretrained`` in the speculators
``eagle`` format, and serve it in vLLM after :func:`export_vllm_eagle`.
"""

from speculators_hass.alignment import align_batch, hass_attention_mask
from speculators_hass.config import EagleSpeculatorConfig
from speculators_hass.drafting import EagleDraftSession
from speculators_hass.export import export_vllm_eagle
from speculators_hass.loss import HassLossWeights, hass_loss
from speculators_hass.model import EagleDraftModel
from speculators_hass.schedule import HassStage, two_stage_commands, two_stage_schedule

__all__ = [
    "EagleDraftModel",
    "EagleDraftSession",
    "EagleSpeculatorConfig",
    "HassLossWeights",
    "HassStage",
    "align_batch",
    "export_vllm_eagle",
    "hass_attention_mask",
    "hass_loss",
    "two_stage_commands",
    "two_stage_schedule",
]
