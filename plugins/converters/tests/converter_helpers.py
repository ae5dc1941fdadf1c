"""Builders of small source checkpoints in every layout the converters read (no downloads).

Each builder writes a folder with the published names, shapes, dtypes and config fields
(FORMAT.md 1.3, 1.4, 4.2, 4.3) and random weights sized for a given verifier; norms are
``1 + noise`` so that a norm put in the wrong place changes the logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoConfig

#: Weight file layouts a source can have.
FILE_KINDS = ("safetensors", "bin", "safetensors-sharded", "bin-sharded")


def verifier_sizes(verifier: Path) -> dict[str, int]:
    """hidden, vocab, layers, heads, kv heads, head_dim, intermediate of a verifier folder."""
    config = AutoConfig.from_pretrained(verifier)
    return {
        "hidden": config.hidden_size,
        "vocab": config.vocab_size,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None)
        or config.hidden_size // config.num_attention_heads,
        "intermediate": config.intermediate_size,
    }


def _weight(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * 0.08


def _norm(gen: torch.Generator, size: int) -> torch.Tensor:
    return 1.0 + torch.randn(size, generator=gen) * 0.1


def write_weights(
    folder: Path, tensors: dict[str, torch.Tensor], kind: str, dtype: torch.dtype | None = None
) -> None:
    """Write ``tensors`` (float ones cast to ``dtype``) as ``kind`` (see :data:`FILE_KINDS`)."""
    folder.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if kind == "safetensors":
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif kind == "bin":
        torch.save(tensors, folder / "pytorch_model.bin")
    elif kind in ("safetensors-sharded", "bin-sharded"):
        names = sorted(tensors)
        halves = [names[: len(names) // 2], names[len(names) // 2 :]]
        ext = "safetensors" if kind == "safetensors-sharded" else "bin"
        stem = "model" if ext == "safetensors" else "pytorch_model"
        weight_map: dict[str, str] = {}
        for i, part in enumerate(halves, start=1):
            file = f"{stem}-{i:05d}-of-00002.{ext}"
            shard = {n: tensors[n] for n in part}
            if ext == "safetensors":
                save_file(shard, str(folder / file), metadata={"format": "pt"})
            else:
                torch.save(shard, folder / file)
            weight_map.update(dict.fromkeys(part, file))
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
    else:  # pragma: no cover - test programming error
        raise ValueError(kind)


def _write_config(folder: Path, config: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _llama_fields(s: dict[str, int]) -> dict[str, Any]:
    """The Llama config fields SafeAILab checkpoints carry (transformers-4 style RoPE)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "head_dim": s["head_dim"],
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "transformers_version": "4.46.0",
    }


def _layer(
    gen: torch.Generator, s: dict[str, int], prefix: str, in_size: int
) -> dict[str, torch.Tensor]:
    h, qd, kvd, i = (
        s["hidden"],
        s["heads"] * s["head_dim"],
        s["kv_heads"] * s["head_dim"],
        s["intermediate"],
    )
    return {
        f"{prefix}self_attn.q_proj.weight": _weight(gen, qd, in_size),
        f"{prefix}self_attn.k_proj.weight": _weight(gen, kvd, in_size),
        f"{prefix}self_attn.v_proj.weight": _weight(gen, kvd, in_size),
        f"{prefix}self_attn.o_proj.weight": _weight(gen, h, qd),
        f"{prefix}mlp.gate_proj.weight": _weight(gen, i, h),
        f"{prefix}mlp.up_proj.weight": _weight(gen, i, h),
        f"{prefix}mlp.down_proj.weight": _weight(gen, h, i),
        f"{prefix}post_attention_layernorm.weight": _norm(gen, h),
    }


def verifier_embedding(verifier: Path) -> torch.Tensor:
    """The verifier's ``embed_tokens`` (what EAGLE checkpoints store a copy of)."""
    from speculators_core.modeling import load_verifier_parts

    return load_verifier_parts(verifier).embed_tokens.clone()


def make_safeailab_eagle(
    folder: Path,
    verifier: Path,
    *,
    bias: bool = False,
    with_embed: bool = True,
    kind: str = "safetensors",
    dtype: torch.dtype | None = None,
    seed: int = 1,
    research_norms: bool = False,
) -> dict[str, torch.Tensor]:
    """A SafeAILab EAGLE-1/2 (or HASS) checkpoint: ``fc`` [H, 2H], ``layers.0.*``; returns its tensors.

    ``research_norms`` gives the speculators research HASS layout (FORMAT.md 3.1): the same
    tensors (layer 0 still without ``input_layernorm``) plus ``embed_layernorm``,
    ``hidden_layernorm`` and ``lm_head_layernorm`` ``[H]``.
    """
    s = verifier_sizes(verifier)
    gen = torch.Generator().manual_seed(seed)
    h = s["hidden"]
    tensors = {"fc.weight": _weight(gen, h, 2 * h), **_layer(gen, s, "layers.0.", h)}
    if bias:
        tensors["fc.bias"] = _weight(gen, h)
    if with_embed:
        tensors["embed_tokens.weight"] = verifier_embedding(verifier)
    if research_norms:
        for name in (
            "embed_layernorm.weight",
            "hidden_layernorm.weight",
            "lm_head_layernorm.weight",
        ):
            tensors[name] = _norm(gen, h)
    config = {**_llama_fields(s), "vocab_size": s["vocab"], "bias": bias}
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    _write_config(folder, config)
    write_weights(folder, tensors, kind, dtype)
    return tensors


def draft_vocabulary(
    vocab: int, draft_vocab: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t, t2d) for a random sorted subset of ``draft_vocab`` target ids (FORMAT.md 1.4)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(vocab, generator=gen)[:draft_vocab].sort().values
    d2t = ids - torch.arange(draft_vocab)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[ids] = True
    return d2t.long(), t2d


def make_safeailab_eagle3(
    folder: Path,
    verifier: Path,
    *,
    draft_vocab: int | None = 100,
    with_embed: bool = False,
    kind: str = "safetensors",
    dtype: torch.dtype | None = None,
    seed: int = 2,
    midlayer: bool = True,
) -> dict[str, torch.Tensor]:
    """A SafeAILab EAGLE-3 checkpoint (``midlayer.*``, ``fc`` [H, 3H], ``d2t``/``t2d``)."""
    s = verifier_sizes(verifier)
    gen = torch.Generator().manual_seed(seed)
    h, vocab = s["hidden"], s["vocab"]
    vd = draft_vocab or vocab
    prefix = "midlayer." if midlayer else "layers.0."
    tensors = {
        "fc.weight": _weight(gen, h, 3 * h),
        **_layer(gen, s, prefix, 2 * h),
        f"{prefix}input_layernorm.weight": _norm(gen, h),
        f"{prefix}hidden_norm.weight": _norm(gen, h),
        "norm.weight": _norm(gen, h),
        "lm_head.weight": _weight(gen, vd, h),
    }
    d2t, t2d = draft_vocabulary(vocab, vd, seed)
    tensors["d2t"], tensors["t2d"] = d2t, t2d
    if with_embed:
        tensors["embed_tokens.weight"] = verifier_embedding(verifier) + _weight(gen, vocab, h)
    config = {
        **_llama_fields(s),
        "architectures": ["LlamaForCausalLMEagle3"],
        "vocab_size": vocab,
        "draft_vocab_size": vd,
        "torch_dtype": str(dtype or torch.float32).removeprefix("torch."),
    }
    _write_config(folder, config)
    write_weights(folder, tensors, kind, dtype)
    return tensors


def _speculators_config(verifier: Path, algorithm: str, tokens: int = 5) -> dict[str, Any]:
    return {
        "algorithm": algorithm,
        "default_proposal_method": "greedy",
        "proposal_methods": [
            {
                "accept_tolerance": 0.0,
                "proposal_type": "greedy",
                "speculative_tokens": tokens,
                "verifier_accept_k": 1,
            }
        ],
        "verifier": {"architectures": ["LlamaForCausalLM"], "name_or_path": str(verifier)},
    }


def _legacy_layer_config(s: dict[str, int], *, num_layers: int = 1) -> dict[str, Any]:
    """A transformers-4 ``transformer_layer_config`` as upstream v0.1-v0.4 wrote it."""
    return {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "head_dim": s["head_dim"],
        "hidden_act": "silu",
        "hidden_size": s["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": s["intermediate"],
        "max_position_embeddings": 512,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": s["heads"],
        "num_hidden_layers": num_layers,
        "num_key_value_heads": s["kv_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "use_cache": True,
        "vocab_size": s["vocab"],
    }


def make_speculators_eagle(
    folder: Path,
    verifier: Path,
    *,
    layernorms: bool = False,
    fusion_bias: bool = False,
    feature_norm_before_fc: bool = False,
    kind: str = "safetensors",
    seed: int = 3,
) -> dict[str, torch.Tensor]:
    """An upstream speculators v0.1 ``eagle`` folder (``EagleSpeculator``; FORMAT.md 1.3).

    ``feature_norm_before_fc`` (with ``layernorms``) writes this project's research-HASS
    variant instead: ``feature_layernorm`` in place of ``transformer.input_layernorm``.
    """
    s = verifier_sizes(verifier)
    gen = torch.Generator().manual_seed(seed)
    h = s["hidden"]
    tensors = {"fusion_fc.weight": _weight(gen, h, 2 * h), **_layer(gen, s, "transformer.", h)}
    if fusion_bias:
        tensors["fusion_fc.bias"] = _weight(gen, h)
    if layernorms:
        tensors["embedding_layernorm.weight"] = _norm(gen, h)
        middle = (
            "feature_layernorm.weight"
            if feature_norm_before_fc
            else "transformer.input_layernorm.weight"
        )
        tensors[middle] = _norm(gen, h)
        tensors["pre_lm_head_layernorm.weight"] = _norm(gen, h)
    config = {
        "architectures": ["EagleSpeculator"],
        "auto_map": {"": "eagle.EagleSpeculatorConfig"},
        "fusion_bias": fusion_bias,
        "has_no_defaults_at_init": False,
        "layernorms": layernorms,
        **({"feature_norm_before_fc": True} if feature_norm_before_fc else {}),
        "speculators_config": _speculators_config(verifier, "eagle"),
        "speculators_model_type": "eagle",
        "speculators_version": "0.1.0.dev21",
        "torch_dtype": "float32",
        "transformer_layer_architecture": "LlamaDecoderLayer",
        # The upstream trainer wrote the verifier's layer count here.
        "transformer_layer_config": _legacy_layer_config(s, num_layers=s["layers"]),
        "transformers_version": "4.55.4",
    }
    _write_config(folder, config)
    write_weights(folder, tensors, kind)
    return tensors


def make_speculators_eagle3(
    folder: Path,
    verifier: Path,
    *,
    draft_vocab: int | None = 100,
    identity_mapping: bool = False,
    kind: str = "safetensors",
    seed: int = 4,
) -> dict[str, torch.Tensor]:
    """An upstream speculators v0.1 ``eagle3`` converter folder (legacy ``Eagle3Speculator``).

    ``draft_vocab=None`` with ``identity_mapping`` writes a full-vocabulary draft with the
    identity ``d2t``/``t2d`` that v0.3 stored anyway.
    """
    s = verifier_sizes(verifier)
    gen = torch.Generator().manual_seed(seed)
    h, vocab = s["hidden"], s["vocab"]
    vd = draft_vocab or vocab
    tensors = {
        "embed_tokens.weight": verifier_embedding(verifier),
        "fc.weight": _weight(gen, h, 3 * h),
        **_layer(gen, s, "layers.0.", 2 * h),
        "layers.0.input_layernorm.weight": _norm(gen, h),
        "layers.0.hidden_norm.weight": _norm(gen, h),
        "norm.weight": _norm(gen, h),
        "lm_head.weight": _weight(gen, vd, h),
    }
    if draft_vocab is not None:
        tensors["d2t"], tensors["t2d"] = draft_vocabulary(vocab, vd, seed)
    elif identity_mapping:
        tensors["d2t"] = torch.zeros(vocab, dtype=torch.long)
        tensors["t2d"] = torch.ones(vocab, dtype=torch.bool)
    config = {
        "architectures": ["Eagle3Speculator"],
        "auto_map": {"": "eagle3.Eagle3SpeculatorConfig"},
        "draft_vocab_size": vd,
        "has_no_defaults_at_init": False,
        "norm_before_residual": True,
        "speculators_config": _speculators_config(verifier, "eagle3"),
        "speculators_model_type": "eagle3",
        "speculators_version": "0.1.0.dev21",
        "target_hidden_size": None,
        "torch_dtype": "float32",
        "transformer_layer_config": _legacy_layer_config(s),
        "transformers_version": "4.55.4",
    }
    _write_config(folder, config)
    write_weights(folder, tensors, kind)
    return tensors


def make_zlab_dflash(
    folder: Path,
    verifier: Path,
    *,
    target_layer_ids: tuple[int, ...] = (1, 3, 5),
    num_layers: int = 2,
    block_size: int = 4,
    mask_token_id: int = 7,
    fused_qkv: bool = False,
    block_size_in_dflash_config: bool = False,
    sliding_window: int | None = None,
    with_embed: bool = False,
    kind: str = "safetensors",
    dtype: torch.dtype | None = None,
    seed: int = 3,
) -> dict[str, torch.Tensor]:
    """A z-lab DFlash checkpoint (FORMAT-PARALLEL.md 3.2): Qwen3 fields, ``block_size`` at the
    top level (older drafts) or in ``dflash_config`` (newer), ``fc`` [H, n*H], ``hidden_norm``,
    ``layers.{i}.*`` with per-head q/k norms (``fused_qkv``: one ``qkv_proj`` per layer),
    ``norm``; no ``lm_head``. Returns its tensors as written (before any fusing)."""
    s = verifier_sizes(verifier)
    gen = torch.Generator().manual_seed(seed)
    h, d = s["hidden"], s["head_dim"]
    tensors: dict[str, torch.Tensor] = {
        "fc.weight": _weight(gen, h, len(target_layer_ids) * h),
        "hidden_norm.weight": _norm(gen, h),
        "norm.weight": _norm(gen, h),
    }
    for i in range(num_layers):
        prefix = f"layers.{i}."
        tensors.update(_layer(gen, s, prefix, h))
        tensors[f"{prefix}input_layernorm.weight"] = _norm(gen, h)
        tensors[f"{prefix}self_attn.q_norm.weight"] = _norm(gen, d)
        tensors[f"{prefix}self_attn.k_norm.weight"] = _norm(gen, d)
    if with_embed:
        tensors["embed_tokens.weight"] = verifier_embedding(verifier)
    written = dict(tensors)
    if fused_qkv:
        for i in range(num_layers):
            attn = f"layers.{i}.self_attn."
            written[f"{attn}qkv_proj.weight"] = torch.cat(
                [written.pop(f"{attn}{p}_proj.weight") for p in ("q", "k", "v")]
            )
    kind_of_layer = "sliding_attention" if sliding_window else "full_attention"
    dflash: dict[str, Any] = {
        "mask_token_id": mask_token_id,
        "target_layer_ids": list(target_layer_ids),
    }
    config: dict[str, Any] = {
        "architectures": ["DFlashDraftModel"],
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dflash_config": dflash,
        "dtype": str(dtype or torch.float32).removeprefix("torch."),
        "head_dim": d,
        "hidden_act": "silu",
        "hidden_size": h,
        "initializer_range": 0.02,
        "intermediate_size": s["intermediate"],
        "layer_types": [kind_of_layer] * num_layers,
        "max_position_embeddings": 512,
        "max_window_layers": num_layers,
        "num_attention_heads": s["heads"],
        "num_hidden_layers": num_layers,
        "num_key_value_heads": s["kv_heads"],
        "num_target_layers": s["layers"],
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sliding_window": sliding_window,
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_sliding_window": bool(sliding_window),
        "vocab_size": s["vocab"],
    }
    if block_size_in_dflash_config:
        dflash["block_size"] = block_size
    else:
        config["block_size"] = block_size
    _write_config(folder, config)
    write_weights(folder, written, kind, dtype)
    return tensors
