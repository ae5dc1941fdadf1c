"""Modelling pieces shared by draft algorithms: verifier tensors, layers, attention, drafting.

* :mod:`~speculators_core.modeling.verifier` - read a verifier folder's config, embedding, LM
  head and final norm without building the verifier;
* :mod:`~speculators_core.modeling.attention` - the attention kernels (``sdpa``, ``eager``,
  ``flex``), :class:`StructuredMask` for algorithm-specific kernels, and the :class:`KVCache`;
* :mod:`~speculators_core.modeling.layers` - RMSNorm, gated MLP, RoPE attention, decoder layer
  with transformers' parameter names;
* :mod:`~speculators_core.modeling.alignment` - shifts within the documents of a packed batch;
* :mod:`~speculators_core.modeling.config` - ``transformer_layer_config`` helpers;
* :mod:`~speculators_core.modeling.draft_model` - :class:`HiddenStateDraftModel`, the training
  entry of drafts fed by verifier hidden states;
* :mod:`~speculators_core.modeling.drafting` - :class:`ChainDraftSession`, chain drafting over a
  KV cache for the reference decoder.
"""

from speculators_core.modeling.alignment import has_next_in_document, shift_left
from speculators_core.modeling.attention import (
    ATTENTION_IMPLEMENTATIONS,
    KVCache,
    StructuredMask,
    attend,
    flex_attention_available,
    select_attention_implementation,
)
from speculators_core.modeling.config import (
    coerce_layer_config,
    default_layer_config,
    draft_layer_fields,
)
from speculators_core.modeling.draft_model import BATCH_KEYS, HiddenStateDraftModel
from speculators_core.modeling.drafting import ChainDraftModel, ChainDraftSession
from speculators_core.modeling.layers import (
    Attention,
    DecoderLayer,
    GatedMLP,
    RMSNorm,
    apply_rotary,
    rotate_half,
)
from speculators_core.modeling.verifier import (
    VerifierParts,
    load_verifier_config,
    load_verifier_parts,
)

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "BATCH_KEYS",
    "Attention",
    "ChainDraftModel",
    "ChainDraftSession",
    "DecoderLayer",
    "GatedMLP",
    "HiddenStateDraftModel",
    "KVCache",
    "RMSNorm",
    "StructuredMask",
    "VerifierParts",
    "apply_rotary",
    "attend",
    "coerce_layer_config",
    "default_layer_config",
    "draft_layer_fields",
    "flex_attention_available",
    "has_next_in_document",
    "load_verifier_config",
    "load_verifier_parts",
    "rotate_half",
    "select_attention_implementation",
    "shift_left",
]
