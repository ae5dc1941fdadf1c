"""EAGLE-3 checkpoints -> the speculators ``eagle3`` format (``speculators_eagle3``).

Two converters:

* ``safeailab-eagle3``: SafeAILab EAGLE-3 checkpoints (``eagle/traineagle3``; FORMAT.md 4.3): a
  Llama ``config.json`` with ``draft_vocab_size`` (and optionally ``target_hidden_size``) and
  ``midlayer.*`` (or ``layers.0.*``), ``fc.weight [H, 3Ht]``, ``norm.weight``,
  ``lm_head.weight [Vd, H]``, ``d2t`` (int64 offsets), ``t2d`` (bool), optional
  ``embed_tokens.weight``. SafeAILab's layer 0 adds the *un-normed* feature to the residual
  (``norm_before_residual`` false) and reads the verifier states ``[2, N//2, N-3]``; both are
  written explicitly, and can be changed with options.
* ``speculators-eagle3``: folders written by upstream ``speculators`` (converter output of any
  version, the legacy ``Eagle3Speculator``, and v0.3+ trained ``Eagle3DraftModel``), rewritten
  in the current format: explicit ``norm_before_residual`` and aux layer ids, no identity
  ``d2t``/``t2d`` for full-vocabulary drafts, no ``auto_map``, transformers-5 RoPE fields.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

import torch
from speculators_eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig, default_aux_layer_ids

from speculators_converters.common import (
    VerifierInfo,
    check_options,
    layer_config_fields,
    peek_tensor_names,
    speculators_config,
)
from speculators_converters.source import SourceCheckpoint
from speculators_converters.validate import LayerDims, eagle3_reference, source_forward
from speculators_converters.writing import (
    expected_tensors,
    plan_tensors,
    resolve_output_dtype,
    write_speculator,
)
from speculators_core import check_vocab_mapping
from speculators_core.conversion import ReferenceForward
from speculators_core.errors import ConversionError

__all__ = [
    "convert_safeailab_eagle3",
    "convert_speculators_eagle3",
    "detect_safeailab_eagle3",
    "detect_speculators_eagle3",
]

_ROTARY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_FLAGS = ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")
_OPTIONS = (
    *_FLAGS,
    "eagle_aux_hidden_state_layer_ids",
    "speculative_tokens",
    "verifier_name_or_path",
)


def detect_safeailab_eagle3(folder: Path, config: dict[str, Any]) -> bool:
    """A config without ``speculators_model_type`` and EAGLE-3 tensors (``midlayer.*``/``hidden_norm``)."""
    if not config or "speculators_model_type" in config:
        return False
    names = peek_tensor_names(folder)
    if names is None:
        archs = [str(a).lower() for a in config.get("architectures") or []]
        return "draft_vocab_size" in config or any("eagle3" in a for a in archs)
    return "fc.weight" in names and any(
        n.startswith("midlayer.") or n == "layers.0.hidden_norm.weight" for n in names
    )


def detect_speculators_eagle3(folder: Path, config: dict[str, Any]) -> bool:
    """A speculators folder with ``speculators_model_type: "eagle3"`` (any version)."""
    return config.get("speculators_model_type") == "eagle3"


def _aux_ids(value: Any, info: VerifierInfo, where: str) -> list[int]:
    if value is None:
        ids = default_aux_layer_ids(info.num_layers)
        if len(set(ids)) != len(ids) or min(ids) < 0:
            # vLLM 0.32 collects sorted(set(ids)) (vllm/model_executor/models/interfaces.py,
            # _set_aux_hidden_state_layers): a repeated id yields fewer states than fc reads.
            raise ConversionError(
                f"{where}: the default aux ids [2, N//2, N-3] are {ids} for verifier "
                f"'{info.folder}' ({info.num_layers} layers), which vLLM cannot serve (it "
                "collects each layer once, so fc would get fewer states than it reads); pass the "
                "ids the draft was trained on: --set eagle_aux_hidden_state_layer_ids=[...]"
            )
        return ids
    if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
        raise ConversionError(
            f"{where}: eagle_aux_hidden_state_layer_ids must be a list of integers, got {value!r}"
        )
    if not value or max(value) > info.num_layers or min(value) < 0 or len(set(value)) != len(value):
        raise ConversionError(
            f"{where}: eagle_aux_hidden_state_layer_ids {value} must be distinct ids in "
            f"0..{info.num_layers} for verifier '{info.folder}' ({info.num_layers} layers)"
        )
    return value


def _vocab_mapping(
    src: SourceCheckpoint, draft_vocab: int, vocab: int, describe: str
) -> tuple[bool, frozenset[str]]:
    """Whether the output keeps ``d2t``/``t2d``; the names to drop. Checks the mapping."""
    has_d2t, has_t2d = src.has("d2t"), src.has("t2d")
    if has_t2d and src.tensors["t2d"].shape != (vocab,):
        raise ConversionError(
            f"{describe} checkpoint '{src.folder}': t2d has {list(src.tensors['t2d'].shape)} "
            f"entries but the verifier vocab is {vocab}; convert with the verifier the draft "
            "was trained for"
        )
    if has_d2t and src.tensors["d2t"].shape != (draft_vocab,):
        raise ConversionError(
            f"{describe} checkpoint '{src.folder}': d2t has shape "
            f"{list(src.tensors['d2t'].shape)} but draft_vocab_size is {draft_vocab}; the "
            "weights and config.json disagree"
        )
    d2t = src.read("d2t").long() if has_d2t else None
    if d2t is not None and has_t2d:
        try:
            check_vocab_mapping(d2t, src.read("t2d").bool())
        except ValueError as err:
            raise ConversionError(
                f"{describe} checkpoint '{src.folder}': d2t and t2d disagree ({err}); re-save "
                "the vocabulary mapping"
            ) from err
    if draft_vocab == vocab:
        if d2t is not None and bool(d2t.any()):
            raise ConversionError(
                f"{describe} checkpoint '{src.folder}': the draft vocabulary is the full "
                "verifier vocabulary but d2t is not the identity; such a permutation cannot be "
                "served by vLLM"
            )
        return False, frozenset({"d2t", "t2d"})
    if d2t is None:
        raise ConversionError(
            f"{describe} checkpoint '{src.folder}' lacks tensor 'd2t' (draft vocab {draft_vocab} "
            f"< verifier vocab {vocab} needs the mapping); the checkpoint is incomplete"
        )
    return True, frozenset()


def _write(
    src: SourceCheckpoint,
    config: Eagle3SpeculatorConfig,
    *,
    info: VerifierInfo,
    verifier: str | os.PathLike[str],
    output: str | os.PathLike[str],
    layer_prefix: str,
    dtype: torch.dtype | None,
    describe: str,
    dims: LayerDims,
) -> ReferenceForward:
    """Map, check, write and (optionally) validate an EAGLE-3 conversion."""
    expected = expected_tensors(Eagle3DraftModel, config)
    mapping: dict[str, str] = {}
    for out_name in expected:
        if out_name.startswith("layers.0."):
            mapping[out_name] = layer_prefix + out_name.removeprefix("layers.0.")
        else:
            mapping[out_name] = out_name
    _, dropped = _vocab_mapping(src, config.draft_vocab_size, info.vocab_size, describe)
    dropped = dropped | {
        "verifier_lm_head.weight",
        "verifier_norm.weight",
        *(n for n in src.tensors if _ROTARY.search(n)),
    }
    out_dtype = resolve_output_dtype(src, dtype, sorted(set(mapping.values()) & set(src.tensors)))
    plans = plan_tensors(
        src,
        mapping,
        expected,
        optional=frozenset({"embed_tokens.weight", "t2d"}),
        dropped=frozenset(dropped),
        float_dtype=out_dtype,
        describe=describe,
    )
    num_layers = int(config.layer_config.num_hidden_layers)
    layers = [layer_prefix.rstrip(".")] + [f"layers.{i}" for i in range(1, num_layers)]

    def reference_forward() -> ReferenceForward:
        @functools.cache
        def get(name: str) -> torch.Tensor:
            tensor = src.read(name)
            return tensor.to(out_dtype).double() if tensor.is_floating_point() else tensor.double()

        def reference(ids: torch.Tensor, aux: torch.Tensor, parts: Any) -> torch.Tensor:
            embed = (
                get("embed_tokens.weight")
                if src.has("embed_tokens.weight")
                else parts.embed_tokens.double()
            )
            has_d2t = src.has("d2t") and config.draft_vocab_size != info.vocab_size
            return eagle3_reference(
                get,
                lambda n: src.has(n) and (n != "d2t" or has_d2t),
                dims,
                input_ids=ids,
                aux=aux,
                embed=embed,
                vocab_size=info.vocab_size,
                layers=layers,
                norm_before_residual=config.norm_before_residual,
                norm_before_fc=config.norm_before_fc,
                fc_norm=config.num_aux_states if config.fc_norm else 0,
            )

        return source_forward(
            Path(verifier),
            reference,
            feature_width=config.num_aux_states * config.aux_hidden_size,
            vocab_size=info.vocab_size,
        )

    write_speculator(
        output,
        config=config,
        model_class=Eagle3DraftModel,
        source=src,
        plans=plans,
    )
    return reference_forward()


def convert_safeailab_eagle3(
    source: str | os.PathLike[str],
    *,
    verifier: str | os.PathLike[str],
    output: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    **options: Any,
) -> ReferenceForward:
    """Convert a SafeAILab EAGLE-3 checkpoint folder to the speculators ``eagle3`` format.

    Options: ``norm_before_residual``/``norm_before_fc``/``fc_norm``/``norm_output`` (OR-ed with
    the same keys of the source config; default false), ``eagle_aux_hidden_state_layer_ids``
    (default ``[2, N//2, N-3]`` of the verifier), ``speculative_tokens`` (default 3),
    ``verifier_name_or_path``.
    """
    describe = "SafeAILab EAGLE-3"
    opts = check_options(options, _OPTIONS, converter="safeailab-eagle3")
    src = SourceCheckpoint(source)
    cfg = src.config
    if not cfg:
        raise ConversionError(
            f"{describe} checkpoint '{src.folder}' has no config.json; it holds the layer sizes "
            "and draft_vocab_size, copy it next to the weights"
        )
    info = VerifierInfo.load(verifier)
    where = f"{describe} config '{src.folder / 'config.json'}'"
    target_hidden = cfg.get("target_hidden_size")
    info.check(
        "hidden size",
        "target_hidden_size" if target_hidden else "hidden_size",
        target_hidden or cfg.get("hidden_size"),
        info.hidden_size,
        where=where,
    )
    info.check("vocab", "vocab_size", cfg.get("vocab_size"), info.vocab_size, where=where)
    if src.has("t2d") and src.tensors["t2d"].shape[0] != info.vocab_size:
        info.check("vocab", "len(t2d)", src.tensors["t2d"].shape[0], info.vocab_size, where=where)
    layer_prefix = (
        "midlayer." if any(n.startswith("midlayer.") for n in src.tensors) else "layers.0."
    )
    fields = layer_config_fields(cfg, info)
    fields["num_hidden_layers"] = int(cfg.get("num_hidden_layers") or 1)
    if cfg.get("draft_vocab_size"):
        draft_vocab = int(cfg["draft_vocab_size"])
    elif src.has("lm_head.weight"):
        draft_vocab = int(src.tensors["lm_head.weight"].shape[0])
    else:
        draft_vocab = info.vocab_size
    if target_hidden and int(target_hidden) == int(fields["hidden_size"]):
        target_hidden = None
    flags = {name: bool(opts.get(name, False)) or bool(cfg.get(name, False)) for name in _FLAGS}
    config = Eagle3SpeculatorConfig(
        transformer_layer_config=fields,
        draft_vocab_size=draft_vocab,
        target_hidden_size=int(target_hidden) if target_hidden else None,
        eagle_aux_hidden_state_layer_ids=_aux_ids(
            opts.get(
                "eagle_aux_hidden_state_layer_ids", cfg.get("eagle_aux_hidden_state_layer_ids")
            ),
            info,
            where,
        ),
        speculators_config=speculators_config(
            "eagle3",
            info,
            speculative_tokens=opts.get("speculative_tokens", 3),
            verifier_name_or_path=opts.get("verifier_name_or_path"),
        ),
        **flags,
    )
    return _write(
        src,
        config,
        info=info,
        verifier=verifier,
        output=output,
        layer_prefix=layer_prefix,
        dtype=dtype,
        describe=describe,
        dims=LayerDims.from_config(cfg),
    )


def convert_speculators_eagle3(
    source: str | os.PathLike[str],
    *,
    verifier: str | os.PathLike[str],
    output: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    **options: Any,
) -> ReferenceForward:
    """Rewrite an upstream ``speculators`` ``eagle3`` folder (any version) in the current format.

    Options as :func:`convert_safeailab_eagle3`; defaults come from the source config (a
    missing ``norm_before_residual`` is false, upstream's class default; missing aux layer ids
    are the verifier's ``[2, N//2, N-3]``, what vLLM used for such folders).
    """
    describe = "speculators eagle3"
    opts = check_options(options, _OPTIONS, converter="speculators-eagle3")
    src = SourceCheckpoint(source)
    cfg = src.config
    layer = cfg.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise ConversionError(
            f"{describe} config '{src.folder / 'config.json'}' has no transformer_layer_config "
            "object; it is not a speculators eagle3 folder"
        )
    info = VerifierInfo.load(verifier)
    where = f"{describe} config '{src.folder / 'config.json'}'"
    target_hidden = cfg.get("target_hidden_size")
    info.check(
        "hidden size",
        "target_hidden_size" if target_hidden else "transformer_layer_config.hidden_size",
        target_hidden or layer.get("hidden_size"),
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
    model_type = layer.get("model_type") or "llama"
    fields = layer_config_fields(layer, info, model_type=model_type)
    fields["num_hidden_layers"] = int(layer.get("num_hidden_layers") or 1)
    if model_type == "qwen3":
        fields.pop("mlp_bias", None)
    tokens = opts.get("speculative_tokens")
    if tokens is None:
        proposals = (cfg.get("speculators_config") or {}).get("proposal_methods") or [{}]
        tokens = int(proposals[0].get("speculative_tokens", 3))
    flags = {name: bool(opts.get(name, cfg.get(name, False))) for name in _FLAGS}
    config = Eagle3SpeculatorConfig(
        transformer_layer_config=fields,
        draft_vocab_size=int(cfg.get("draft_vocab_size") or info.vocab_size),
        target_hidden_size=target_hidden,
        eagle_aux_hidden_state_layer_ids=_aux_ids(
            opts.get(
                "eagle_aux_hidden_state_layer_ids", cfg.get("eagle_aux_hidden_state_layer_ids")
            ),
            info,
            where,
        ),
        embed_requires_grad=bool(cfg.get("embed_requires_grad", False)),
        speculators_config=speculators_config(
            "eagle3",
            info,
            speculative_tokens=tokens,
            verifier_name_or_path=opts.get("verifier_name_or_path"),
        ),
        **flags,
    )
    return _write(
        src,
        config,
        info=info,
        verifier=verifier,
        output=output,
        layer_prefix="layers.0.",
        dtype=dtype,
        describe=describe,
        dims=LayerDims.from_config(fields),
    )
