"""The EAGLE-1/2/HASS speculator config: ``speculators_model_type: "eagle"`` (FORMAT.md 1.3).

The same format upstream ``speculators`` (v0.1 - v0.6) reads and writes for EAGLE-1, EAGLE-2 and
HASS drafts: one Llama decoder layer (``transformer_layer_config``) behind a fusion layer over
``[token embedding, verifier feature]``. Training settings (number of HASS steps, loss weights,
noise) are not part of the format; they live on the model
(:meth:`~speculators_hass.model.EagleDraftModel.configure_training`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import InstanceOf
from transformers import PreTrainedConfig

from speculators_core import ConfigError, SpeculatorModelConfig
from speculators_core.modeling import coerce_layer_config, default_layer_config

__all__ = ["SUPPORTED_LAYER_ARCHITECTURES", "EagleSpeculatorConfig", "resolve_layer_architecture"]

#: Decoder-layer classes an ``eagle`` draft can use. vLLM serves EAGLE-1 drafts with Llama
#: layers only (``EagleLlamaForCausalLM``), and upstream's converters always wrote Llama.
SUPPORTED_LAYER_ARCHITECTURES: tuple[str, ...] = ("LlamaDecoderLayer",)


def resolve_layer_architecture(layer_config: PreTrainedConfig) -> str:
    """The decoder-layer class name ``"auto"`` stands for: ``LlamaConfig`` -> ``LlamaDecoderLayer``."""
    name = type(layer_config).__name__
    return f"{name.removesuffix('Config')}DecoderLayer"


class EagleSpeculatorConfig(SpeculatorModelConfig):
    """Config of an EAGLE-1/2 (HASS-trained) draft.

    Fields (all written to ``config.json``):

    * ``transformer_layer_architecture`` - the class of the single draft decoder layer; ``"auto"``
      is resolved from ``transformer_layer_config`` and saved resolved (``"LlamaDecoderLayer"``).
    * ``transformer_layer_config`` - the draft decoder layer as a transformers config (Llama).
      ``vocab_size`` is the verifier's vocabulary (the draft shares its embedding and LM head),
      ``hidden_size`` the verifier's hidden size ``H``, ``num_hidden_layers`` 1 (the draft always
      has exactly one decoder layer; upstream's trainer wrote the verifier's layer count here,
      and such files load too), ``tie_word_embeddings`` false. Serialized as a dict with its
      ``model_type``.
    * ``layernorms`` - the extra RMSNorms of the speculators research HASS variant:
      ``embedding_layernorm`` on the token embedding, the decoder layer's ``input_layernorm`` and
      ``pre_lm_head_layernorm`` before the LM head. False for EAGLE-1/2 and stock HASS (then the
      layer's ``input_layernorm`` is an identity and none of these tensors exist). Drafts with
      ``layernorms`` cannot be exported to vLLM's native EAGLE layout.
    * ``feature_norm_before_fc`` - where the middle of the three ``layernorms`` norms sits (only
      valid with ``layernorms``; always written). False (upstream's layout): the decoder layer's
      ``input_layernorm`` normalizes the fused state after ``fusion_fc``. True (the speculators
      research HASS forward, ``research/hass/model/llama_eagle_full_grad.py``): a
      ``feature_layernorm`` normalizes the feature (the verifier's, or the draft's own fed-back
      prediction) *before* ``fusion_fc``, and the decoder layer has no input norm (identity), as
      without ``layernorms``. ``embedding_layernorm`` and ``pre_lm_head_layernorm`` are the same
      either way.
    * ``fusion_bias`` - ``fusion_fc`` has a bias (HASS's code default; EAGLE-LLaMA3 checkpoints
      have none). Drafts with a bias cannot be exported to vLLM's native EAGLE layout.
    """

    speculators_model_type: str = "eagle"
    transformer_layer_architecture: str = "auto"
    # InstanceOf: pydantic must not introspect the transformers config (itself a dataclass).
    transformer_layer_config: InstanceOf[PreTrainedConfig] | dict[str, Any] = dataclasses.field(
        # FORMAT.md 1.3: the default transformer_layer_config is a LlamaConfig with one layer.
        default_factory=default_layer_config
    )
    layernorms: bool = False
    feature_norm_before_fc: bool = False
    fusion_bias: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        # FORMAT.md 1.3: the layer config is a LlamaConfig unless it names another type.
        self.transformer_layer_config = coerce_layer_config(self.transformer_layer_config)
        if self.transformer_layer_architecture == "auto":
            self.transformer_layer_architecture = resolve_layer_architecture(
                self.transformer_layer_config
            )
        super().__post_init__(**kwargs)
        self._check_consistency()

    def _check_consistency(self) -> None:
        layer_config = self.layer_config
        arch = self.transformer_layer_architecture
        if arch not in SUPPORTED_LAYER_ARCHITECTURES:
            raise ConfigError(
                f"config: transformer_layer_architecture is '{arch}'; eagle drafts use one of "
                f"{', '.join(SUPPORTED_LAYER_ARCHITECTURES)} (or 'auto')"
            )
        if resolve_layer_architecture(layer_config) != arch:
            raise ConfigError(
                f"config: transformer_layer_architecture '{arch}' does not match "
                f"transformer_layer_config.model_type '{layer_config.model_type}'; write a "
                "'llama' layer config or set the architecture to 'auto'"
            )
        if self.feature_norm_before_fc and not self.layernorms:
            raise ConfigError(
                "config: feature_norm_before_fc is true but layernorms is false; the feature norm "
                "is one of the layernorms norms, set layernorms to true (or "
                "feature_norm_before_fc to false)"
            )

    # ------------------------------------------------------------------ derived sizes

    @property
    def layer_config(self) -> PreTrainedConfig:
        """``transformer_layer_config`` as a transformers config (always one after init)."""
        assert isinstance(self.transformer_layer_config, PreTrainedConfig)
        return self.transformer_layer_config

    @property
    def verifier_vocab_size(self) -> int:
        """``V``: rows of the shared embedding and LM head."""
        return int(self.layer_config.vocab_size)
