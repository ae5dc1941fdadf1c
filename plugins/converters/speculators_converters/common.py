"""What every converter needs: the verifier's sizes, option checks, and a draft layer config.

Converters compare the source's sizes with the verifier's before writing anything, so a
checkpoint made for another model fails with one line that names both values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speculators_core import GreedyTokenProposalConfig, SpeculatorsConfig, VerifierConfig
from speculators_core.errors import ConversionError

__all__ = [
    "LAYER_FIELDS",
    "VerifierInfo",
    "check_options",
    "layer_config_fields",
    "peek_tensor_names",
    "rope_parameters",
    "speculators_config",
]

#: Fields of a source's Llama-style config that the draft layer config copies (FORMAT.md 1.3).
LAYER_FIELDS: tuple[str, ...] = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "initializer_range",
    "rms_norm_eps",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


@dataclass(frozen=True)
class VerifierInfo:
    """The verifier's sizes, read from its ``config.json`` (its text config for multimodal ones)."""

    folder: Path
    hidden_size: int
    vocab_size: int
    num_layers: int
    max_position_embeddings: int | None

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> VerifierInfo:
        """Read the verifier folder's config (no weights)."""
        from speculators_core.modeling import load_verifier_config

        config = load_verifier_config(folder)
        max_pos = getattr(config, "max_position_embeddings", None)
        return cls(
            folder=Path(folder),
            hidden_size=int(config.hidden_size),
            vocab_size=int(config.vocab_size),
            num_layers=int(config.num_hidden_layers),
            max_position_embeddings=int(max_pos) if max_pos else None,
        )

    def check(self, what: str, name: str, value: Any, expected: int, *, where: str) -> None:
        """Raise when the source's ``name`` (``value``) differs from the verifier's ``expected``."""
        if value is not None and int(value) != expected:
            raise ConversionError(
                f"{where}: {name} is {value} but verifier '{self.folder}' has {what} {expected}; "
                "convert with the verifier the draft was trained for"
            )


def check_options(
    options: Mapping[str, Any], allowed: Iterable[str], *, converter: str
) -> dict[str, Any]:
    """``options`` after refusing the ones ``converter`` does not take."""
    allowed = set(allowed)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConversionError(
            f"converter '{converter}' has no option '{unknown[0]}' (its options: "
            f"{', '.join(sorted(allowed)) or 'none'})"
        )
    return dict(options)


def rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """The transformers-5 ``rope_parameters`` of a config written with either convention.

    transformers 4 wrote ``rope_theta`` and ``rope_scaling`` (with ``type`` or ``rope_type``);
    transformers 5 writes ``rope_parameters``.
    """
    existing = config.get("rope_parameters")
    if isinstance(existing, Mapping) and existing:
        params = dict(existing)
        params.setdefault("rope_type", params.pop("type", "default"))
        return params
    params = {"rope_theta": float(config.get("rope_theta", 10000.0))}
    scaling = config.get("rope_scaling")
    if isinstance(scaling, Mapping) and scaling:
        extra = {k: v for k, v in scaling.items() if k not in ("type", "rope_type")}
        params.update(extra)
        params["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    else:
        params["rope_type"] = "default"
    return params


def layer_config_fields(
    source: Mapping[str, Any], verifier: VerifierInfo, *, model_type: str = "llama"
) -> dict[str, Any]:
    """A ``transformer_layer_config`` dict from a Llama-style source config (FORMAT.md 4.2/4.3).

    ``num_hidden_layers`` is 1; ``vocab_size`` is the verifier's; ``max_position_embeddings`` the larger of the source's and
    the verifier's (FORMAT.md 2.9 item 6).
    """
    fields: dict[str, Any] = {"model_type": model_type}
    for name in LAYER_FIELDS:
        if source.get(name) is not None:
            fields[name] = source[name]
    if "hidden_size" not in fields:
        raise ConversionError("the source config has no 'hidden_size'; add it to config.json")
    heads = source.get("num_attention_heads")
    if not heads:
        raise ConversionError(
            "the source config has no 'num_attention_heads'; add it to config.json"
        )
    fields.setdefault("num_key_value_heads", heads)
    fields.setdefault("head_dim", int(fields["hidden_size"]) // int(heads))
    positions = [
        p for p in (source.get("max_position_embeddings"), verifier.max_position_embeddings) if p
    ]
    if positions:
        fields["max_position_embeddings"] = max(int(p) for p in positions)
    fields["rope_parameters"] = rope_parameters(source)
    fields["vocab_size"] = verifier.vocab_size
    fields["num_hidden_layers"] = 1  # EAGLE-3 converters set their layer count after this
    fields["tie_word_embeddings"] = False
    return fields


def speculators_config(
    algorithm: str,
    verifier: VerifierInfo,
    *,
    speculative_tokens: int = 3,
    verifier_name_or_path: str | None = None,
) -> SpeculatorsConfig:
    """The ``speculators_config`` of a converted draft: one greedy proposal and the verifier."""
    if not isinstance(speculative_tokens, int) or speculative_tokens < 1:
        raise ConversionError(
            f"speculative_tokens must be a positive integer, got {speculative_tokens!r}"
        )
    return SpeculatorsConfig(
        algorithm=algorithm,
        proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=speculative_tokens)],
        default_proposal_method="greedy",
        verifier=VerifierConfig.from_pretrained(
            verifier.folder, name_or_path=verifier_name_or_path
        ),
    )


def peek_tensor_names(folder: Path) -> set[str] | None:
    """Tensor names of a checkpoint folder, cheaply, for format detection; None if unreadable.

    Reads only safetensors headers or shard indexes; a ``pytorch_model.bin`` is opened with
    ``weights_only=True`` and a memory map (its tensors' bytes are not read).
    """
    try:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = folder / index_name
            if index.is_file():
                return set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        single = folder / "model.safetensors"
        if single.is_file():
            with open(single, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                if length > 100 << 20:
                    return None
                header = json.loads(handle.read(length))
            return {k for k in header if k != "__metadata__"}
        binary = folder / "pytorch_model.bin"
        if binary.is_file():
            import torch

            state = torch.load(binary, map_location="cpu", weights_only=True, mmap=True)
            return set(state) if isinstance(state, dict) else None
    except Exception:  # detection only: an unreadable file is reported by the conversion
        return None
    return None
