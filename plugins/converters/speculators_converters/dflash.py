"""z-lab DFlash checkpoints -> the speculators ``dflash`` format (``speculators_dflash``).

The z-lab layout (the ``z-lab/*-DFlash`` drafts, FORMAT-PARALLEL.md 1.3 and 3.2): a Qwen3-style
``config.json`` (``architectures: ["DFlashDraftModel"]``, ``auto_map``) with ``block_size`` at
the top level (older drafts) or inside ``dflash_config`` (newer ones), ``dflash_config`` holding
``target_layer_ids`` and ``mask_token_id``, and ``num_target_layers``; tensors ``fc.weight``
``[H, n*H]``, ``hidden_norm.weight``, ``layers.{i}.*`` (Qwen3 layers with per-head q/k norms,
``q/k/v_proj`` or one fused ``qkv_proj``), ``norm.weight``; no ``lm_head`` (the verifier's is
shared) and, usually, no ``embed_tokens``.

What the conversion changes, and why:

* **Layer ids.** z-lab's ``target_layer_ids`` name the output of decoder layer ``k``; the
  speculators format (and vLLM) name the same state ``k + 1``. An id whose state is the
  verifier's last layer output (``k + 1 == N``) cannot be served: vLLM captures states before
  layers ``0..N-1`` only, so such a draft is refused rather than cut down (upstream drops that
  id and slices ``fc``, which changes the draft's maths).
* **Causality.** z-lab drafts run the block bidirectionally in every layer. vLLM runs every
  layer causally unless ``sliding_window_non_causal`` is true (FORMAT-PARALLEL.md 3.6 P1), so
  the converted config writes true (upstream's converter leaves it false, and vLLM then serves
  another model than the one trained).
* **Fused projections** ``qkv_proj`` are split into ``q_proj``/``k_proj``/``v_proj`` by rows,
  streamed. Tensors with no DFlash meaning (``g_proj``, ``aux_hidden_norms``, an own
  ``lm_head``) are refused: dropping them would change the logits.
* ``speculative_tokens`` is ``block_size - 1`` unless given; ``embed_tokens`` (a copy of the
  verifier's) is dropped.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

import torch
from speculators_dflash import DFlashDraftModel, DFlashSpeculatorConfig

from speculators_converters.common import (
    VerifierInfo,
    check_options,
    layer_config_fields,
    speculators_config,
)
from speculators_converters.source import SourceCheckpoint
from speculators_converters.validate import LayerDims, dflash_reference, source_forward
from speculators_converters.writing import (
    TensorPlan,
    expected_tensors,
    plan_tensors,
    resolve_output_dtype,
    write_speculator,
)
from speculators_core.conversion import ReferenceForward
from speculators_core.errors import ConversionError

__all__ = ["convert_zlab_dflash", "detect_zlab_dflash"]

_DESCRIBE = "z-lab DFlash"
_ROTARY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_FUSED = re.compile(r"^(layers\.\d+\.self_attn\.)qkv_proj\.(weight|bias)$")
_OPTIONS = (
    "aux_hidden_state_layer_ids",
    "mask_token_id",
    "speculative_tokens",
    "verifier_name_or_path",
)
#: Tensors of other DFlash variants that have no place in this format (dropping them would
#: change the logits), with what they are.
_UNSUPPORTED = (
    (re.compile(r"\.g_proj\."), "gated attention (g_proj)"),
    (re.compile(r"^aux_hidden_norms\."), "per-state input norms (aux_hidden_norms)"),
)


def detect_zlab_dflash(folder: Path, config: dict[str, Any]) -> bool:
    """A config without ``speculators_model_type`` that has ``dflash_config`` or a DFlash
    architecture."""
    if not config or "speculators_model_type" in config:
        return False
    archs = [str(a).lower() for a in config.get("architectures") or []]
    return isinstance(config.get("dflash_config"), dict) or any("dflash" in a for a in archs)


def _block_size(cfg: dict[str, Any], where: str) -> int:
    dflash = cfg.get("dflash_config") or {}
    value = cfg.get("block_size", dflash.get("block_size"))
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        found = "no block_size" if value is None else f"block_size {value!r}"
        raise ConversionError(
            f"{where}: {found} (looked at the top level and in dflash_config); a DFlash draft "
            "needs its block size (the anchor and the mask slots, at least 2)"
        )
    return value


def _aux_ids(cfg: dict[str, Any], option: Any, info: VerifierInfo, where: str) -> list[int]:
    """Speculators aux ids: the option as given, else z-lab's ``target_layer_ids`` plus one."""
    if option is not None:
        ids, name = option, "aux_hidden_state_layer_ids"
    else:
        zlab = (cfg.get("dflash_config") or {}).get("target_layer_ids")
        if zlab is None:
            raise ConversionError(
                f"{where}: dflash_config has no target_layer_ids; pass the verifier layers the "
                "draft reads with --set aux_hidden_state_layer_ids=[...] (speculators ids)"
            )
        if not isinstance(zlab, list) or not all(isinstance(i, int) for i in zlab):
            raise ConversionError(
                f"{where}: dflash_config.target_layer_ids must be a list of integers, got {zlab!r}"
            )
        ids, name = [i + 1 for i in zlab], "dflash_config.target_layer_ids + 1"
        if info.num_layers in ids:
            raise ConversionError(
                f"{where}: target_layer_ids {zlab} include the last layer ({info.num_layers - 1}) "
                f"of verifier '{info.folder}', whose output vLLM cannot give a draft; this "
                "draft cannot be served as trained"
            )
    if (
        not isinstance(ids, list)
        or not ids
        or not all(isinstance(i, int) for i in ids)
        or len(set(ids)) != len(ids)
        or min(ids) < 1
        or max(ids) >= info.num_layers
    ):
        raise ConversionError(
            f"{where}: {name} {ids!r} must be distinct verifier layer ids in "
            f"1..{info.num_layers - 1} for verifier '{info.folder}' ({info.num_layers} layers)"
        )
    return ids


def _layer_fields(cfg: dict[str, Any], info: VerifierInfo, where: str) -> dict[str, Any]:
    fields = layer_config_fields(cfg, info, model_type="qwen3")
    fields.pop("mlp_bias", None)  # Qwen3 layers have none
    layers = cfg.get("num_hidden_layers")
    if not isinstance(layers, int) or layers < 1:
        raise ConversionError(f"{where}: num_hidden_layers {layers!r} must be a positive integer")
    fields["num_hidden_layers"] = layers
    types = cfg.get("layer_types")
    if types is None:
        kind = "sliding_attention" if cfg.get("use_sliding_window") else "full_attention"
        types = [kind] * layers
    if not isinstance(types, list) or len(types) != layers:
        raise ConversionError(
            f"{where}: layer_types {types!r} must list one type per layer ({layers})"
        )
    if len(set(types)) > 1:
        raise ConversionError(
            f"{where}: the draft mixes sliding-window and full-attention layers ({types}), "
            "which vLLM's V1 runner refuses; such a draft cannot be served"
        )
    fields["layer_types"] = types
    if types[0] == "sliding_attention":
        window = cfg.get("sliding_window")
        if not isinstance(window, int) or window < 1:
            raise ConversionError(
                f"{where}: sliding-window layers need a positive sliding_window, got {window!r}"
            )
        fields["sliding_window"] = window
        fields["use_sliding_window"] = True
    return fields


def _mapping(
    src: SourceCheckpoint, expected: dict[str, Any], where: str
) -> tuple[dict[str, str], dict[str, tuple[str, int, int]]]:
    """Output name -> source name for plain tensors, and -> (fused source, first row, rows)."""
    for name in src.tensors:
        for pattern, what in _UNSUPPORTED:
            if pattern.search(name):
                raise ConversionError(
                    f"{where}: tensor '{name}' belongs to {what}, which the dflash format has no "
                    "place for; dropping it would change the draft, so it is not converted"
                )
    if src.has("lm_head.weight"):
        raise ConversionError(
            f"{where}: the checkpoint has its own lm_head.weight; z-lab DFlash drafts share the "
            "verifier's head (vLLM serves them with it), so this is another format"
        )
    plain: dict[str, str] = {}
    fused: dict[str, tuple[str, int, int]] = {}
    for out_name in expected:
        if src.has(out_name):
            plain[out_name] = out_name
    for name in src.tensors:
        match = _FUSED.match(name)
        if match is None:
            continue
        prefix, kind = match.groups()
        parts = [f"{prefix}{p}_proj.{kind}" for p in ("q", "k", "v")]
        clash = [p for p in parts if src.has(p)]
        if clash:
            raise ConversionError(
                f"{where}: tensor '{name}' and '{clash[0]}' are both present; a layer has either "
                "a fused qkv_proj or separate q/k/v projections"
            )
        sizes = [expected[p][0][0] if p in expected else 0 for p in parts]
        rows = src.tensors[name].shape[0]
        if 0 in sizes or sum(sizes) != rows:
            raise ConversionError(
                f"{where}: tensor '{name}' has {rows} rows but the config implies "
                f"{' + '.join(map(str, sizes))} (q, k, v); the weights and config.json disagree"
            )
        first = 0
        for part, size in zip(parts, sizes, strict=True):
            fused[part] = (name, first, size)
            first += size
    return plain, fused


def _split_plans(
    src: SourceCheckpoint,
    fused: dict[str, tuple[str, int, int]],
    expected: dict[str, Any],
    float_dtype: torch.dtype,
) -> list[TensorPlan]:
    plans = []
    for out_name, (source, first, rows) in sorted(fused.items()):
        shape = expected[out_name][0]
        width = int(torch.Size(shape[1:]).numel())
        want = (rows, *shape[1:])
        got = (rows, *src.tensors[source].shape[1:])
        if tuple(got) != tuple(want):
            raise ConversionError(
                f"{_DESCRIBE} checkpoint '{src.folder}': tensor '{source}' has shape "
                f"{list(src.tensors[source].shape)}; rows of {list(shape)} expected"
            )
        plans.append(
            TensorPlan(
                out_name,
                source,
                float_dtype,
                tuple(shape),
                elements=(first * width, (first + rows) * width),
            )
        )
    return plans


def convert_zlab_dflash(
    source: str | os.PathLike[str],
    *,
    verifier: str | os.PathLike[str],
    output: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    **options: Any,
) -> ReferenceForward:
    """Convert a z-lab DFlash checkpoint folder to the speculators ``dflash`` format.

    Options: ``aux_hidden_state_layer_ids`` (speculators ids; default z-lab's
    ``target_layer_ids`` plus one), ``mask_token_id`` (default ``dflash_config.mask_token_id``),
    ``speculative_tokens`` (default ``block_size - 1``), ``verifier_name_or_path``.
    """
    opts = check_options(options, _OPTIONS, converter="zlab-dflash")
    src = SourceCheckpoint(source)
    cfg = src.config
    where = f"{_DESCRIBE} config '{src.folder / 'config.json'}'"
    if not cfg:
        raise ConversionError(
            f"{_DESCRIBE} checkpoint '{src.folder}' has no config.json; it holds the layer "
            "sizes, block_size and dflash_config, copy it next to the weights"
        )
    info = VerifierInfo.load(verifier)
    info.check("hidden size", "hidden_size", cfg.get("hidden_size"), info.hidden_size, where=where)
    info.check("vocab", "vocab_size", cfg.get("vocab_size"), info.vocab_size, where=where)
    info.check(
        "layers", "num_target_layers", cfg.get("num_target_layers"), info.num_layers, where=where
    )
    block_size = _block_size(cfg, where)
    fields = _layer_fields(cfg, info, where)
    mask_token = opts.get("mask_token_id", (cfg.get("dflash_config") or {}).get("mask_token_id"))
    if mask_token is None:
        raise ConversionError(
            f"{where}: dflash_config has no mask_token_id; pass the token the draft was trained "
            "with: --set mask_token_id=ID"
        )
    if not isinstance(mask_token, int) or not 0 <= mask_token < info.vocab_size:
        raise ConversionError(
            f"{where}: mask_token_id {mask_token!r} is not a token id of verifier "
            f"'{info.folder}' (vocab {info.vocab_size})"
        )
    tokens = opts.get("speculative_tokens", block_size - 1)
    config = DFlashSpeculatorConfig(
        transformer_layer_config=fields,
        draft_vocab_size=info.vocab_size,
        block_size=block_size,
        aux_hidden_state_layer_ids=_aux_ids(
            cfg, opts.get("aux_hidden_state_layer_ids"), info, where
        ),
        mask_token_id=mask_token,
        # z-lab runs the block bidirectionally in every layer; vLLM does so only when told
        sliding_window_non_causal=True,
        sample_from_anchor=False,
        speculators_config=speculators_config(
            "dflash",
            info,
            speculative_tokens=tokens,
            verifier_name_or_path=opts.get("verifier_name_or_path"),
        ),
    )
    expected = expected_tensors(DFlashDraftModel, config)
    plain, fused = _mapping(src, expected, where)
    dropped = frozenset({"embed_tokens.weight", *(n for n in src.tensors if _ROTARY.search(n))})
    sources = sorted(set(plain.values()) | {f[0] for f in fused.values()})
    out_dtype = resolve_output_dtype(src, dtype, sources)
    plans = plan_tensors(
        src,
        plain,
        expected,
        optional=frozenset(fused),
        dropped=dropped | {f[0] for f in fused.values()},
        float_dtype=out_dtype,
        describe=_DESCRIBE,
    )
    plans += _split_plans(src, fused, expected, out_dtype)
    dims = LayerDims.from_config(fields)
    layers = [f"layers.{i}" for i in range(int(fields["num_hidden_layers"]))]
    window = fields.get("sliding_window")

    @functools.cache
    def get(name: str) -> torch.Tensor:
        """A source tensor by its unfused name, as written (``out_dtype``), in float64."""
        if name in fused:
            whole, first, rows = fused[name]
            tensor = src.read(whole)[first : first + rows]
        else:
            tensor = src.read(name)
        return tensor.to(out_dtype).double()

    def has(name: str) -> bool:
        return src.has(name) or name in fused

    def reference(ids: torch.Tensor, aux: torch.Tensor, parts: Any) -> torch.Tensor:
        return dflash_reference(
            get,
            has,
            dims,
            input_ids=ids,
            aux=aux,
            embed=parts.embed_tokens.double(),
            lm_head=parts.lm_head.double(),
            vocab_size=info.vocab_size,
            layers=layers,
            block_size=block_size,
            mask_token_id=mask_token,
            causal_block=False,
            window=window,
        )

    write_speculator(output, config=config, model_class=DFlashDraftModel, source=src, plans=plans)
    return source_forward(
        Path(verifier),
        reference,
        feature_width=config.num_aux_states * config.aux_hidden_size,
        vocab_size=info.vocab_size,
    )
