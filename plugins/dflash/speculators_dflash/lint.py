"""``speculators check`` rules for DFlash folders: what vLLM 0.32 reads (FORMAT-PARALLEL.md 3).

The core has checked what every speculators folder needs; these rules check the DFlash fields
vLLM requires (``aux_hidden_state_layer_ids``, ``mask_token_id``), the settings it would serve
differently from training (``sample_from_anchor``, the causal override of
``sliding_window_non_causal``, mixed layer kinds), the RoPE theta it would otherwise invent,
and every tensor's name and shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from speculators_core.lint import Finding, LintContext, as_int, format_names

__all__ = ["lint_dflash"]


def lint_dflash(context: LintContext) -> Iterable[Finding]:
    """The DFlash findings about ``context``'s folder, in order (see the module doc)."""
    data = context.config
    findings: list[Finding] = []

    def config(code: str, problem: str, fix: str) -> None:
        findings.append(context.config_finding(code, problem, fix))

    def weights(code: str, problem: str, fix: str) -> None:
        findings.append(context.weights_finding(code, problem, fix))

    layer: Mapping[str, Any] = data.get("transformer_layer_config") or {}
    if not isinstance(layer, dict):
        config("layer-config", "transformer_layer_config is not an object", "write it as one")
        layer = {}
    ids = data.get("aux_hidden_state_layer_ids")
    if not isinstance(ids, list) or not ids or not all(as_int(i) is not None for i in ids):
        config(
            "dflash-aux-ids",
            "aux_hidden_state_layer_ids is missing or not a list of layer ids (vLLM requires it)",
            "write the verifier layer ids the draft was trained on",
        )
        ids = None
    token = data.get("mask_token_id")
    if isinstance(token, bool) or not isinstance(token, int):
        config(
            "dflash-mask-token",
            "mask_token_id is "
            + ("missing" if token is None else f"{token!r}, not a token id")
            + " (vLLM requires it)",
            "write the mask token id the draft was trained with",
        )
    if data.get("sample_from_anchor"):
        config(
            "dflash-sample-from-anchor",
            "sample_from_anchor is true, but vLLM's proposer never samples the anchor slot",
            "retrain with sample_from_anchor false",
        )
    types = [t for t in (layer.get("layer_types") or []) if isinstance(t, str)]
    sliding = "sliding_attention" in types or bool(layer.get("use_sliding_window"))
    if len(set(types)) > 1:
        config(
            "dflash-mixed-layers",
            "the draft mixes sliding-window and full-attention layers, which vLLM's V1 runner "
            "(the CPU one) refuses",
            "use one attention kind for every layer",
        )
    elif not sliding and not data.get("sliding_window_non_causal"):
        config(
            "dflash-causal-override",
            "a draft without sliding-window layers trains its block bidirectionally, but with "
            "sliding_window_non_causal false vLLM runs every layer causally",
            "write sliding_window_non_causal: true",
        )
    rope = layer.get("rope_parameters") or {}
    if not (isinstance(rope, dict) and rope.get("rope_theta")) and not layer.get("rope_theta"):
        config(
            "dflash-rope-theta",
            "transformer_layer_config states no rope_theta (vLLM then uses 1e6 for DFlash)",
            "write rope_parameters.rope_theta, the verifier's",
        )

    hidden = as_int(layer.get("hidden_size"))
    heads = as_int(layer.get("num_attention_heads"))
    vocab = as_int(layer.get("vocab_size"))
    if hidden is None or heads is None or vocab is None:
        config(
            "layer-config-fields",
            "transformer_layer_config lacks hidden_size, num_attention_heads or vocab_size",
            "write the draft's sizes (copied from the verifier by the exporter)",
        )
        return findings
    kv = as_int(layer.get("num_key_value_heads")) or heads
    hd = as_int(layer.get("head_dim")) or hidden // heads
    inter = as_int(layer.get("intermediate_size")) or 0
    n_layers = as_int(layer.get("num_hidden_layers")) or 1
    draft_vocab = as_int(data.get("draft_vocab_size")) or vocab
    target = as_int(data.get("target_hidden_size")) or hidden
    tensors = context.tensors
    if not tensors:
        return findings
    expected: dict[str, tuple[int, ...] | None] = {
        "fc.weight": (hidden, (len(ids) if ids else 3) * target),
        "hidden_norm.weight": (hidden,),
        "norm.weight": (hidden,),
        "lm_head.weight": (draft_vocab, hidden),
        "embed_tokens.weight": (vocab, hidden),
        "d2t": (draft_vocab,),
        "t2d": (vocab,),
    }
    required = ["fc.weight", "hidden_norm.weight", "norm.weight"]
    if draft_vocab < vocab:
        required += ["lm_head.weight", "d2t"]
    bias = bool(layer.get("attention_bias"))
    for i in range(n_layers):
        p = f"layers.{i}."
        shapes = {
            "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,),
            "self_attn.q_proj.weight": (heads * hd, hidden),
            "self_attn.k_proj.weight": (kv * hd, hidden),
            "self_attn.v_proj.weight": (kv * hd, hidden),
            "self_attn.o_proj.weight": (hidden, heads * hd),
            "self_attn.q_norm.weight": (hd,),
            "self_attn.k_norm.weight": (hd,),
            "mlp.gate_proj.weight": (inter, hidden),
            "mlp.up_proj.weight": (inter, hidden),
            "mlp.down_proj.weight": (hidden, inter),
        }
        for name, shape in shapes.items():
            expected[p + name] = shape
            required.append(p + name)
        if bias:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                expected[f"{p}self_attn.{proj}.bias"] = None
    unknown = sorted(n for n in tensors if n not in expected and n not in context.fused)
    if unknown:
        weights(
            "tensor-unknown",
            f"unexpected tensor(s) {format_names(unknown)} for a DFlash draft with {n_layers} "
            "layer(s); vLLM fails to load names it does not know",
            "save only the draft's own weights (a mask_hidden tensor is refused by vLLM)",
        )
    missing = [n for n in required if n not in tensors]
    if missing:
        weights(
            "tensor-missing",
            f"required tensor(s) {format_names(missing)} are missing",
            "re-save the full draft (layers as in transformer_layer_config; lm_head and d2t "
            "for a reduced vocabulary)",
        )
    wrong = [
        f"{n} {list(tensors[n].shape)} (expected {list(shape)})"
        for n, shape in expected.items()
        if shape is not None and n in tensors and tuple(tensors[n].shape) != shape
    ]
    if wrong:
        weights(
            "tensor-shape",
            f"shape mismatch with the config: {format_names(wrong)}",
            "make transformer_layer_config, draft_vocab_size and the aux ids describe the "
            "saved tensors",
        )
    return findings
