"""EAGLE-1/2 and HASS checkpoints -> the speculators ``eagle`` format (``speculators_hass``).

Two converters:

* ``safeailab-eagle``: SafeAILab EAGLE-1/2 (``eagle/model/cnets1.py``, ``cnets.py``) and HASS
  (HArmonizedSS, ``cnets_hass.py``) checkpoints, which share one layout (FORMAT.md 4.2): a
  Llama ``config.json`` (``"bias"`` says whether ``fc`` has one) and ``fc.weight [H, 2H]``,
  optional ``fc.bias [H]``, ``layers.0.{self_attn,mlp}.*``, ``layers.0.post_attention_layernorm``
  (layer 0 has no input norm), optional ``embed_tokens.weight`` (the verifier's, dropped: the
  ``eagle`` format shares the verifier's embedding).

  The speculators research HASS variant (``research/hass/model/llama_eagle_full_grad.py``) is
  that layout plus three RMSNorms ``[H]``: ``embed_layernorm`` on the token embedding,
  ``hidden_layernorm`` on the feature *before* ``fc`` and ``lm_head_layernorm`` before the
  verifier's LM head. It converts exactly to ``layernorms: true, feature_norm_before_fc: true``
  (``embed_layernorm -> embedding_layernorm``, ``hidden_layernorm -> feature_layernorm``,
  ``lm_head_layernorm -> pre_lm_head_layernorm``). Upstream's converter put ``hidden_layernorm``
  after ``fc`` as the layer's input norm, which changes the maths (FORMAT.md 3.1); this one does
  not. A tensor outside this layout (e.g. a ``post_embedding_layernorm``, which that forward does
  not have) is refused, as any unknown tensor is.
* ``speculators-eagle``: folders written by upstream ``speculators`` v0.1-v0.6 with
  ``speculators_model_type: "eagle"`` (``fusion_fc.*``, ``transformer.*``, with ``layernorms``
  ``embedding_layernorm``/``transformer.input_layernorm``/``pre_lm_head_layernorm``), rewritten
  in the current format (explicit fields, ``num_hidden_layers`` 1, no ``auto_map``). Folders of
  this project with ``feature_norm_before_fc`` (``feature_layernorm``) are rewritten as they are.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

import torch
from speculators_hass import EagleDraftModel, EagleSpeculatorConfig

from speculators_converters.common import (
    VerifierInfo,
    check_options,
    layer_config_fields,
    peek_tensor_names,
    speculators_config,
)
from speculators_converters.source import SourceCheckpoint
from speculators_converters.validate import LayerDims, eagle1_reference, source_forward
from speculators_converters.writing import (
    expected_tensors,
    plan_tensors,
    resolve_output_dtype,
    write_speculator,
)
from speculators_core.conversion import ReferenceForward
from speculators_core.errors import ConversionError

__all__ = [
    "RESEARCH_HASS_NORMS",
    "convert_safeailab_eagle",
    "convert_speculators_eagle",
    "detect_safeailab_eagle",
    "detect_speculators_eagle",
]

#: The norms of the speculators research HASS variant: ``eagle`` format name -> source name
#: (with ``layernorms`` and ``feature_norm_before_fc``; see the module docstring).
RESEARCH_HASS_NORMS: dict[str, str] = {
    "embedding_layernorm.weight": "embed_layernorm.weight",
    "feature_layernorm.weight": "hidden_layernorm.weight",
    "pre_lm_head_layernorm.weight": "lm_head_layernorm.weight",
}
_ROTARY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_COMMON_OPTIONS = ("speculative_tokens", "verifier_name_or_path")
# check findings expected for a converted 'eagle' folder: vLLM serves only its export, and a
# draft with fusion_bias or layernorms cannot even be exported (the conversion is still right).
_EXPORT_CODES = frozenset({"speculators-model-type", "eagle-not-exportable"})


def _is_eagle3_config(config: dict[str, Any]) -> bool:
    archs = [str(a).lower() for a in config.get("architectures") or []]
    return "draft_vocab_size" in config or any("eagle3" in a for a in archs)


def detect_safeailab_eagle(folder: Path, config: dict[str, Any]) -> bool:
    """A Llama config (no ``speculators_model_type``) with ``fc`` and ``layers.0.*`` tensors."""
    if not config or "speculators_model_type" in config or _is_eagle3_config(config):
        return False
    names = peek_tensor_names(folder)
    if names is None:
        return "hidden_size" in config and "num_attention_heads" in config
    return (
        "fc.weight" in names
        and "layers.0.self_attn.q_proj.weight" in names
        and not any(n.startswith("midlayer.") or "hidden_norm" in n for n in names)
    )


def detect_speculators_eagle(folder: Path, config: dict[str, Any]) -> bool:
    """A speculators folder with ``speculators_model_type: "eagle"`` (any version)."""
    return config.get("speculators_model_type") == "eagle"


def _make_getter(source: SourceCheckpoint, dtype: torch.dtype) -> tuple[Any, Any]:
    @functools.cache
    def get(name: str) -> torch.Tensor:
        tensor = source.read(name)
        return tensor.to(dtype).double() if tensor.is_floating_point() else tensor.double()

    return get, source.has


def _check_single_layer(source: SourceCheckpoint, prefix: str, describe: str) -> None:
    extra = sorted(
        {n.split(".")[1] for n in source.tensors if n.startswith(prefix) and n.split(".")[1] != "0"}
    )
    if extra:
        raise ConversionError(
            f"{describe} checkpoint '{source.folder}' has {len(extra) + 1} decoder layers; the "
            "eagle format (and vLLM's EAGLE-1) holds exactly one"
        )


def _check_embedding(
    source: SourceCheckpoint, name: str, info: VerifierInfo, describe: str
) -> None:
    if source.has(name):
        shape = source.tensors[name].shape
        expected = (info.vocab_size, info.hidden_size)
        if tuple(shape) != expected:
            raise ConversionError(
                f"{describe} checkpoint '{source.folder}': {name} has shape {list(shape)} but "
                f"verifier '{info.folder}' has vocab {expected[0]} and hidden size {expected[1]}; "
                "convert with the verifier the draft was trained for"
            )


def convert_safeailab_eagle(
    source: str | os.PathLike[str],
    *,
    verifier: str | os.PathLike[str],
    output: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    **options: Any,
) -> ReferenceForward:
    """Convert a SafeAILab EAGLE-1/2 or HASS checkpoint folder to the speculators ``eagle`` format.

    Options: ``speculative_tokens`` (default 3), ``verifier_name_or_path`` (recorded verifier;
    default the verifier folder's absolute path). A checkpoint holding any of the research HASS
    norms (:data:`RESEARCH_HASS_NORMS`) is the research variant and must hold all three.
    """
    describe = "EAGLE-1/HASS"
    opts = check_options(options, _COMMON_OPTIONS, converter="safeailab-eagle")
    src = SourceCheckpoint(source)
    if not src.config:
        raise ConversionError(
            f"{describe} checkpoint '{src.folder}' has no config.json; it holds the layer sizes "
            "(hidden_size, num_attention_heads, ...), copy it next to the weights"
        )
    research = any(src.has(n) for n in RESEARCH_HASS_NORMS.values())
    info = VerifierInfo.load(verifier)
    where = f"{describe} config '{src.folder / 'config.json'}'"
    info.check(
        "hidden size", "hidden_size", src.config.get("hidden_size"), info.hidden_size, where=where
    )
    info.check("vocab", "vocab_size", src.config.get("vocab_size"), info.vocab_size, where=where)
    _check_single_layer(src, "layers.", describe)
    _check_embedding(src, "embed_tokens.weight", info, describe)

    config = EagleSpeculatorConfig(
        transformer_layer_config=layer_config_fields(src.config, info),
        layernorms=research,
        feature_norm_before_fc=research,
        fusion_bias=src.has("fc.bias"),
        speculators_config=speculators_config(
            "eagle",
            info,
            speculative_tokens=opts.get("speculative_tokens", 3),
            verifier_name_or_path=opts.get("verifier_name_or_path"),
        ),
    )
    expected = expected_tensors(EagleDraftModel, config)
    mapping: dict[str, str] = {}
    for out_name in expected:
        if out_name.startswith("fusion_fc."):
            mapping[out_name] = "fc." + out_name.removeprefix("fusion_fc.")
        elif out_name.startswith("transformer."):
            mapping[out_name] = "layers.0." + out_name.removeprefix("transformer.")
        elif out_name in RESEARCH_HASS_NORMS:
            mapping[out_name] = RESEARCH_HASS_NORMS[out_name]
    # Anything else in the source (e.g. a post_embedding_layernorm) is refused by plan_tensors.
    dropped = frozenset(
        {"embed_tokens.weight", "lm_head.weight"} | {n for n in src.tensors if _ROTARY.search(n)}
    )
    out_dtype = resolve_output_dtype(src, dtype, sorted(set(mapping.values()) & set(src.tensors)))
    plans = plan_tensors(
        src, mapping, expected, dropped=dropped, float_dtype=out_dtype, describe=describe
    )

    def reference_forward() -> ReferenceForward:
        get, has = _make_getter(src, out_dtype)
        dims = LayerDims.from_config(src.config)

        def reference(ids: torch.Tensor, features: torch.Tensor, parts: Any) -> torch.Tensor:
            embed = (
                get("embed_tokens.weight")
                if has("embed_tokens.weight")
                else parts.embed_tokens.double()
            )
            # Research HASS: e = embed_layernorm(Embed(x)), fc([e, hidden_layernorm(f)]),
            # layer 0 without input norm, lm_head(lm_head_layernorm(h)).
            return eagle1_reference(
                get,
                has,
                dims,
                input_ids=ids,
                features=features,
                embed=embed,
                lm_head=parts.lm_head.double(),
                embedding_norm="embed_layernorm.weight" if research else None,
                feature_norm="hidden_layernorm.weight" if research else None,
                lm_head_norm="lm_head_layernorm.weight" if research else None,
            )

        return source_forward(
            Path(verifier),
            reference,
            feature_width=info.hidden_size,
            vocab_size=info.vocab_size,
            expected_findings=_EXPORT_CODES,
        )

    write_speculator(
        output,
        config=config,
        model_class=EagleDraftModel,
        source=src,
        plans=plans,
    )
    return reference_forward()


def convert_speculators_eagle(
    source: str | os.PathLike[str],
    *,
    verifier: str | os.PathLike[str],
    output: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    **options: Any,
) -> ReferenceForward:
    """Rewrite an upstream ``speculators`` (v0.1-v0.6) ``eagle`` folder in the current format.

    Options: ``speculative_tokens`` (default: the source's), ``verifier_name_or_path``.
    """
    describe = "speculators eagle"
    opts = check_options(options, _COMMON_OPTIONS, converter="speculators-eagle")
    src = SourceCheckpoint(source)
    layer = src.config.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise ConversionError(
            f"{describe} config '{src.folder / 'config.json'}' has no transformer_layer_config "
            "object; it is not a speculators eagle folder"
        )
    info = VerifierInfo.load(verifier)
    where = f"{describe} config '{src.folder / 'config.json'}'"
    info.check(
        "hidden size",
        "transformer_layer_config.hidden_size",
        layer.get("hidden_size"),
        info.hidden_size,
        where=where,
    )
    info.check(
        "vocab",
        "transformer_layer_config.vocab_size",
        layer.get("vocab_size"),
        info.vocab_size,
        where=where,
    )
    _check_embedding(src, "embed_tokens.weight", info, describe)
    arch = src.config.get("transformer_layer_architecture", "auto")
    if arch not in ("auto", "LlamaDecoderLayer"):
        raise ConversionError(
            f"{where}: transformer_layer_architecture '{arch}' is not supported; eagle drafts use "
            "LlamaDecoderLayer"
        )
    fields = layer_config_fields(layer, info, model_type="llama")
    tokens = opts.get("speculative_tokens")
    if tokens is None:
        proposals = (src.config.get("speculators_config") or {}).get("proposal_methods") or [{}]
        tokens = int(proposals[0].get("speculative_tokens", 3))
    layernorms = bool(src.config.get("layernorms")) or src.has("embedding_layernorm.weight")
    before_fc = bool(src.config.get("feature_norm_before_fc")) or src.has(
        "feature_layernorm.weight"
    )
    config = EagleSpeculatorConfig(
        transformer_layer_config=fields,
        layernorms=layernorms,
        feature_norm_before_fc=before_fc,
        fusion_bias=bool(src.config.get("fusion_bias")) or src.has("fusion_fc.bias"),
        speculators_config=speculators_config(
            "eagle",
            info,
            speculative_tokens=tokens,
            verifier_name_or_path=opts.get("verifier_name_or_path"),
        ),
    )
    expected = expected_tensors(EagleDraftModel, config)
    mapping = {name: name for name in expected}
    dropped = frozenset(
        {"embed_tokens.weight", "lm_head.weight", "lm_head.bias"}
        | {n for n in src.tensors if _ROTARY.search(n)}
    )
    out_dtype = resolve_output_dtype(src, dtype, sorted(set(mapping) & set(src.tensors)))
    plans = plan_tensors(
        src, mapping, expected, dropped=dropped, float_dtype=out_dtype, describe=describe
    )

    def reference_forward() -> ReferenceForward:
        get, has = _make_getter(src, out_dtype)
        dims = LayerDims.from_config(layer)

        def reference(ids: torch.Tensor, features: torch.Tensor, parts: Any) -> torch.Tensor:
            # EagleSpeculator (v0.1) forward: the verifier's embedding and LM head.
            return eagle1_reference(
                get,
                has,
                dims,
                input_ids=ids,
                features=features,
                embed=parts.embed_tokens.double(),
                lm_head=parts.lm_head.double(),
                fc="fusion_fc",
                layer="transformer",
                embedding_norm="embedding_layernorm.weight" if layernorms else None,
                feature_norm="feature_layernorm.weight" if before_fc else None,
                input_norm=(
                    "transformer.input_layernorm.weight" if layernorms and not before_fc else None
                ),
                lm_head_norm="pre_lm_head_layernorm.weight" if layernorms else None,
            )

        return source_forward(
            Path(verifier),
            reference,
            feature_width=info.hidden_size,
            vocab_size=info.vocab_size,
            expected_findings=_EXPORT_CODES,
        )

    write_speculator(
        output,
        config=config,
        model_class=EagleDraftModel,
        source=src,
        plans=plans,
    )
    return reference_forward()
