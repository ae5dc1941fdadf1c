"""Config helpers of drafts built around a ``transformer_layer_config`` (EAGLE-1/2/HASS, EAGLE-3).

Both speculators formats store the draft's decoder layer(s) as a transformers config dict with a
``model_type`` (FORMAT.md 1.3, 1.4). :func:`coerce_layer_config` turns what a config file holds
into that transformers config; :func:`draft_layer_fields` writes the fields of a fresh draft's
layer config from the verifier's config.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig, PreTrainedConfig

from speculators_core.config import layer_config_from_dict
from speculators_core.errors import ConfigError

__all__ = ["coerce_layer_config", "default_layer_config", "draft_layer_fields"]


def default_layer_config() -> PreTrainedConfig:
    """One Llama layer without tied embeddings: the format's default ``transformer_layer_config``."""
    return LlamaConfig(num_hidden_layers=1, tie_word_embeddings=False)


def coerce_layer_config(value: Any, *, default_model_type: str = "llama") -> PreTrainedConfig:
    """``transformer_layer_config`` as a transformers config.

    A dict is turned into the config class its ``model_type`` names (``default_model_type`` when
    it names none, as upstream's older checkpoints do); anything but a dict or a config is a
    :class:`~speculators_core.errors.ConfigError`.
    """
    if isinstance(value, PreTrainedConfig):
        return value
    if not isinstance(value, dict):
        raise ConfigError(
            "config: field 'transformer_layer_config' must be an object (got "
            f"{type(value).__name__}); write the draft layer config as a dict"
        )
    return layer_config_from_dict(value, default_model_type)


def draft_layer_fields(
    vconfig: Any, *, model_type: str = "llama", num_layers: int = 1
) -> dict[str, Any]:
    """The ``transformer_layer_config`` dict of a fresh draft for a verifier config.

    The draft copies the verifier's sizes, activation, RoPE settings and vocabulary (so it can
    share or copy its embedding and LM head); ``num_layers`` decoder layers of ``model_type``,
    never tied embeddings. ``mlp_bias`` is written for Llama layers only (Qwen3 has none).
    """
    hidden = int(vconfig.hidden_size)
    fields: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": int(vconfig.vocab_size),
        "hidden_size": hidden,
        "intermediate_size": getattr(vconfig, "intermediate_size", None) or 3 * hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": vconfig.num_attention_heads,
        "num_key_value_heads": getattr(vconfig, "num_key_value_heads", None)
        or vconfig.num_attention_heads,
        "head_dim": getattr(vconfig, "head_dim", None) or hidden // vconfig.num_attention_heads,
        "hidden_act": getattr(vconfig, "hidden_act", "silu"),
        "max_position_embeddings": getattr(vconfig, "max_position_embeddings", 4096),
        "rms_norm_eps": getattr(vconfig, "rms_norm_eps", 1e-6),
        "initializer_range": getattr(vconfig, "initializer_range", 0.02),
        "attention_bias": bool(getattr(vconfig, "attention_bias", False)),
        "tie_word_embeddings": False,
    }
    rope = getattr(vconfig, "rope_parameters", None)
    if rope and isinstance(rope.get("full_attention"), dict):
        # Per layer type (Gemma 3: a short-theta RoPE for sliding layers, a long one for full
        # ones): the draft's layers attend to the whole context, so they take the full one.
        rope = rope["full_attention"]
    if rope:
        fields["rope_parameters"] = dict(rope)
    if model_type == "llama":
        fields["mlp_bias"] = bool(getattr(vconfig, "mlp_bias", False))
    return fields
