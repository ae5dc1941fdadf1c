"""``speculators check`` rules for EAGLE-3 folders: config sizes, aux layer ids and tensors.

:func:`lint_eagle3` is the ``lint`` of the ``eagle3`` algorithm record. The core has already
checked what every speculators folder needs (speculators_config, verifier name, readable
safetensors, bare and unfused tensor names); these rules check what vLLM's EAGLE-3 loader reads
on top: ``transformer_layer_config`` (a Llama or Qwen3 decoder with its sizes),
``norm_before_residual``, ``eagle_aux_hidden_state_layer_ids`` against ``fc.weight`` and the
verifier, every tensor's name and shape, and the draft vocabulary mapping (``d2t``/``t2d``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

from speculators_core.lint import (
    FUSED_PROJECTIONS,
    Finding,
    LintContext,
    TensorInfo,
    VerifierInfo,
    as_int,
    format_names,
    read_small_tensor,
)

__all__ = ["EAGLE3_LAYER_TYPES", "lint_eagle3", "lint_peagle"]

#: Draft decoder families vLLM maps to its EAGLE-3 classes.
EAGLE3_LAYER_TYPES: tuple[str, ...] = ("llama", "qwen3")

_FLOAT_DTYPES = frozenset({"F32", "F16", "BF16", "F64"})


def lint_eagle3(context: LintContext) -> Iterable[Finding]:
    """The EAGLE-3 findings about ``context``'s folder, in order (see the module doc)."""
    rules = _Eagle3Rules(context)
    rules.run()
    return rules.findings


class _Eagle3Rules:
    def __init__(self, context: LintContext) -> None:
        self.context = context
        self.findings: list[Finding] = []

    def config(self, code: str, problem: str, fix: str) -> None:
        self.findings.append(self.context.config_finding(code, problem, fix))

    def weights(self, code: str, problem: str, fix: str) -> None:
        self.findings.append(self.context.weights_finding(code, problem, fix))

    @property
    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def run(self) -> None:
        data, verifier = self.context.config, self.context.verifier
        raw_layer = data.get("transformer_layer_config")
        if not isinstance(raw_layer, dict):
            self.config(
                "layer-config",
                "transformer_layer_config is "
                + (
                    "missing"
                    if raw_layer is None
                    else f"a {type(raw_layer).__name__}, not an object"
                ),
                "write the draft decoder's transformers config as a JSON object",
            )
        elif raw_layer.get("model_type") not in EAGLE3_LAYER_TYPES:
            found = raw_layer.get("model_type")
            self.config(
                "layer-model-type",
                "transformer_layer_config has "
                + (f"model_type {found!r}" if found is not None else "no model_type")
                + ", which vLLM cannot map to an EAGLE-3 draft class",
                f"set transformer_layer_config.model_type to one of {', '.join(EAGLE3_LAYER_TYPES)}",
            )
        layer: Mapping[str, Any] = raw_layer if isinstance(raw_layer, dict) else {}
        if "norm_before_residual" not in data:
            self.config(
                "norm-before-residual",
                "norm_before_residual is not written (vLLM then assumes true)",
                "write norm_before_residual explicitly, with the value the draft was trained with",
            )
        if data.get("norm_before_fc") and data.get("fc_norm"):
            self.config(
                "norm-flags",
                "norm_before_fc and fc_norm are both true",
                "keep only the one the draft was trained with",
            )

        sizes = self._sizes(data, layer)
        ids = self._check_aux_ids(data, verifier)
        if verifier is not None:
            self._compare_with_verifier(layer, sizes, verifier)
        names = self.context.tensors
        if sizes is None:
            return
        if names:
            self._check_tensors(data, layer, sizes, ids, names, verifier)
        if "fc.weight" not in names:  # else checked together with the fc width
            self._check_verifier_hidden(data, sizes, verifier)

    # ------------------------------------------------------------------ config.json

    def _check_verifier_hidden(
        self, data: Mapping[str, Any], sizes: dict[str, int], verifier: VerifierInfo | None
    ) -> None:
        if verifier is None or verifier.hidden_size is None:
            return
        if sizes["Ht"] == verifier.hidden_size:
            return
        field_name = "target_hidden_size" if data.get("target_hidden_size") else "hidden_size"
        self.config(
            "verifier-hidden-size",
            f"the draft expects verifier states of width {sizes['Ht']} ({field_name}), "
            f"but the verifier '{verifier.folder}' has hidden_size {verifier.hidden_size}",
            "set target_hidden_size to the verifier's hidden size, or use the verifier "
            "the draft was built for",
        )

    def _sizes(self, data: Mapping[str, Any], layer: Mapping[str, Any]) -> dict[str, int] | None:
        needed = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
        missing = [k for k in needed if as_int(layer.get(k)) is None]
        if missing:
            if isinstance(data.get("transformer_layer_config"), dict):
                self.config(
                    "layer-config-fields",
                    f"transformer_layer_config lacks {format_names(missing, 4)} (vLLM would use "
                    "Llama defaults)",
                    "write the draft's sizes (copied from the verifier by the exporter)",
                )
            return None
        hidden = int(layer["hidden_size"])
        heads = int(layer["num_attention_heads"])
        vocab = int(layer["vocab_size"])
        draft_vocab = data.get("draft_vocab_size")
        if draft_vocab is not None and (
            as_int(draft_vocab) is None or not 0 < draft_vocab <= vocab
        ):
            self.config(
                "draft-vocab-size",
                f"draft_vocab_size {draft_vocab!r} is not between 1 and "
                f"transformer_layer_config.vocab_size {vocab}",
                "set it to the number of lm_head rows",
            )
            draft_vocab = -1  # unknown: the vocabulary tensors are not checked against it
        target = data.get("target_hidden_size")
        return {
            "H": hidden,
            "heads": heads,
            "kv": as_int(layer.get("num_key_value_heads")) or heads,
            "hd": as_int(layer.get("head_dim")) or hidden // heads,
            "I": int(layer["intermediate_size"]),
            "L": as_int(layer.get("num_hidden_layers")) or 1,
            "V": vocab,
            # vLLM: an absent draft_vocab_size means the full vocabulary.
            "Vd": int(draft_vocab) if draft_vocab is not None else vocab,
            "Ht": as_int(target) or hidden,
        }

    def _check_aux_ids(
        self, data: Mapping[str, Any], verifier: VerifierInfo | None
    ) -> list[int] | None:
        ids = data.get("eagle_aux_hidden_state_layer_ids")
        if not ids:
            self.config(
                "aux-ids-missing",
                "eagle_aux_hidden_state_layer_ids is not written (vLLM then guesses "
                "[2, N//2, N-3], which breaks drafts trained on other layers)",
                "write the verifier layer ids the draft was trained on",
            )
            return None
        if (
            not isinstance(ids, list)
            or not all(as_int(i) is not None and i >= 0 for i in ids)
            or len(set(ids)) != len(ids)
        ):
            self.config(
                "aux-ids-invalid",
                f"eagle_aux_hidden_state_layer_ids {ids!r} is not a list of distinct "
                "non-negative layer ids",
                "write the verifier layer ids the draft was trained on",
            )
            return None
        if ids != sorted(ids):
            self.config(
                "aux-ids-order",
                f"eagle_aux_hidden_state_layer_ids {ids} is not ascending, but vLLM concatenates "
                "the states in layer order",
                "retrain with ascending ids (reordering the list alone does not fix fc)",
            )
        if (
            verifier is not None
            and verifier.num_layers is not None
            and max(ids) > verifier.num_layers
        ):
            self.config(
                "aux-ids-range",
                f"eagle_aux_hidden_state_layer_ids {ids} go beyond the verifier's "
                f"{verifier.num_layers} layers",
                f"use ids in 0..{verifier.num_layers} (id k = the state entering layer k)",
            )
        return list(ids)

    def _compare_with_verifier(
        self,
        layer: Mapping[str, Any],
        sizes: dict[str, int] | None,
        verifier: VerifierInfo,
    ) -> None:
        where = f"verifier '{verifier.folder}'"
        if sizes is not None:
            if verifier.vocab_size is not None and sizes["V"] != verifier.vocab_size:
                self.config(
                    "vocab-size-verifier",
                    f"transformer_layer_config.vocab_size {sizes['V']} differs from the "
                    f"vocab_size {verifier.vocab_size} of the {where}",
                    "build the draft for this verifier (vocab_size = the verifier's)",
                )
            elif verifier.tokenizer_len is not None and verifier.tokenizer_len > sizes["V"]:
                self.config(
                    "vocab-size-tokenizer",
                    f"transformer_layer_config.vocab_size {sizes['V']} is smaller than the "
                    f"tokenizer of the {where} ({verifier.tokenizer_len} tokens)",
                    "build the draft for this verifier and tokenizer",
                )
        draft_max = as_int(layer.get("max_position_embeddings"))
        if (
            draft_max is not None
            and verifier.max_positions is not None
            and draft_max < verifier.max_positions
        ):
            self.config(
                "max-position-embeddings",
                f"transformer_layer_config.max_position_embeddings {draft_max} is below the "
                f"{verifier.max_positions} of the {where}",
                f"set it to at least {verifier.max_positions}",
            )

    # ------------------------------------------------------------------ tensors

    def _check_tensors(
        self,
        data: Mapping[str, Any],
        layer: Mapping[str, Any],
        s: dict[str, int],
        ids: list[int] | None,
        tensors: Mapping[str, TensorInfo],
        verifier: VerifierInfo | None,
    ) -> None:
        H, hd, heads, kv, inter = s["H"], s["hd"], s["heads"], s["kv"], s["I"]
        num_aux = len(ids) if ids else 3
        qwen3 = layer.get("model_type") == "qwen3"
        attn_bias = bool(layer.get("attention_bias"))
        mlp_bias = bool(layer.get("mlp_bias"))

        # Expected shape of every known name (None: known, shape not checked).
        expected: dict[str, tuple[int, ...] | None] = {
            "fc.weight": None,  # its width is checked against the aux ids below
            "norm.weight": (H,),
            "lm_head.weight": None,
            "embed_tokens.weight": None,
            "d2t": None,
            "t2d": None,
        }
        required = ["fc.weight", "norm.weight"]
        if 0 < s["Vd"] < s["V"]:
            required.append("lm_head.weight")  # a full-vocab draft may share the verifier's
        if data.get("norm_before_fc"):
            expected["input_norm.weight"] = (num_aux * s["Ht"],)
            required.append("input_norm.weight")
        if data.get("fc_norm"):
            for i in range(num_aux):
                expected[f"fc_norm.{i}.weight"] = (s["Ht"],)
                required.append(f"fc_norm.{i}.weight")
        for i in range(s["L"]):
            width = 2 * H if i == 0 else H
            p = f"layers.{i}."
            shapes: dict[str, tuple[int, ...]] = {
                "self_attn.q_proj.weight": (heads * hd, width),
                "self_attn.k_proj.weight": (kv * hd, width),
                "self_attn.v_proj.weight": (kv * hd, width),
                "self_attn.o_proj.weight": (H, heads * hd),
                "mlp.gate_proj.weight": (inter, H),
                "mlp.up_proj.weight": (inter, H),
                "mlp.down_proj.weight": (H, inter),
                "input_layernorm.weight": (H,),
                "post_attention_layernorm.weight": (H,),
            }
            if i == 0:
                shapes["hidden_norm.weight"] = (H,)
            if qwen3:
                shapes["self_attn.q_norm.weight"] = (hd,)
                shapes["self_attn.k_norm.weight"] = (hd,)
            for name, shape in shapes.items():
                expected[p + name] = shape
                required.append(p + name)
            if i > 0:
                expected[p + "hidden_norm.weight"] = (H,)  # written by some exporters
            if attn_bias:
                for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    expected[f"{p}self_attn.{proj}.bias"] = None
            if mlp_bias:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    expected[f"{p}mlp.{proj}.bias"] = None

        self._extra_tensors(expected, required, num_aux * s["Ht"])

        # Fused projections were reported by the core; the separate projections a fused tensor
        # stands for are not reported missing as well.
        fused = self.context.fused
        explained: set[str] = set()
        for name in fused:
            for fused_name, parts in FUSED_PROJECTIONS.items():
                if f".{fused_name}." in name:
                    explained.update(name.replace(fused_name, part) for part in parts)
        unknown = sorted(n for n in tensors if n not in expected and n not in fused)
        if unknown:
            self.weights(
                "tensor-unknown",
                f"unexpected tensor(s) {format_names(unknown)} for an EAGLE-3 draft with "
                f"{s['L']} layer(s); vLLM fails to load names it does not know",
                "save only the draft's own weights (no verifier or training-only tensors)",
            )
        missing = [n for n in required if n not in tensors and n not in explained]
        if missing:
            self.weights(
                "tensor-missing",
                f"required tensor(s) {format_names(missing)} are missing",
                "re-save the full draft (layer count and norms as in transformer_layer_config)",
            )

        wrong = [
            f"{n} {list(tensors[n].shape)} (expected {list(shape)})"
            for n, shape in expected.items()
            if shape is not None and n in tensors and tensors[n].shape != shape
        ]
        if "fc.weight" in tensors:
            fc_shape = tensors["fc.weight"].shape
            if len(fc_shape) != 2 or fc_shape[0] != H:
                wrong.append(f"fc.weight {list(fc_shape)} (expected [{H}, {num_aux * s['Ht']}])")
            else:
                self._check_fc_width(data, s, ids, fc_shape[1], verifier)
        if wrong:
            self.weights(
                "tensor-shape",
                f"shape mismatch with transformer_layer_config: {format_names(wrong)}",
                "make transformer_layer_config describe the saved layers (sizes, heads, head_dim)",
            )
        self._check_vocab_tensors(s, tensors)
        not_float = sorted(
            n
            for n, info in tensors.items()
            if n not in ("d2t", "t2d") and info.dtype not in _FLOAT_DTYPES
        )
        if not_float:
            self.weights(
                "tensor-dtype",
                f"weight(s) {format_names(f'{n} ({tensors[n].dtype})' for n in not_float)} are "
                "not floating point",
                "save the weights in float32, bfloat16 or float16",
            )

    def _extra_tensors(
        self,
        expected: dict[str, tuple[int, ...] | None],
        required: list[str],
        fc_width: int,
    ) -> None:
        """Add a derived algorithm's own tensors to ``expected``/``required`` (none here)."""

    def _check_fc_width(
        self,
        data: Mapping[str, Any],
        s: dict[str, int],
        ids: list[int] | None,
        width: int,
        verifier: VerifierInfo | None,
    ) -> None:
        num_aux = len(ids) if ids else 3
        if width == num_aux * s["Ht"]:
            self._check_verifier_hidden(data, s, verifier)
            return
        state_width = width / num_aux
        verifier_hidden = verifier.hidden_size if verifier is not None else None
        if (
            data.get("target_hidden_size") is None
            and state_width.is_integer()
            and int(state_width) != s["H"]
            and (verifier_hidden is None or verifier_hidden == int(state_width))
        ):
            self.weights(
                "target-hidden-size",
                f"fc.weight takes {width} inputs = {num_aux} x {int(state_width)}, but "
                f"target_hidden_size is not set (vLLM then assumes {num_aux} x {s['H']})",
                f"set target_hidden_size to {int(state_width)} (the verifier's hidden size)",
            )
            return
        what = (
            f"{len(ids)} eagle_aux_hidden_state_layer_ids"
            if ids
            else "3 aux states (ids not written)"
        )
        self.weights(
            "aux-ids-fc-width",
            f"fc.weight takes {width} inputs but {what} x {s['Ht']} = {num_aux * s['Ht']}",
            "write exactly the aux layer ids the draft was trained on (fc width / verifier "
            "hidden size of them)",
        )

    def _check_vocab_tensors(self, s: dict[str, int], tensors: Mapping[str, TensorInfo]) -> None:
        V, Vd, H = s["V"], s["Vd"], s["H"]
        if Vd < 0:  # draft_vocab_size itself is invalid (already reported)
            return
        lm_head = tensors.get("lm_head.weight")
        if lm_head is not None and lm_head.shape != (Vd, H):
            self.weights(
                "lm-head-rows",
                f"lm_head.weight is {list(lm_head.shape)} but draft_vocab_size is {Vd} "
                f"(expected [{Vd}, {H}])",
                "set draft_vocab_size to the lm_head rows (and keep d2t of that length)",
            )
        embed = tensors.get("embed_tokens.weight")
        if embed is not None and embed.shape != (V, H):
            self.weights(
                "embed-rows",
                f"embed_tokens.weight is {list(embed.shape)} but transformer_layer_config."
                f"vocab_size is {V} (expected [{V}, {H}])",
                "embed_tokens must cover the verifier's whole vocabulary; set vocab_size to "
                "the verifier's",
            )
        d2t, t2d = tensors.get("d2t"), tensors.get("t2d")
        if d2t is None:
            if Vd < V:
                self.weights(
                    "d2t-missing",
                    f"draft_vocab_size {Vd} < vocab_size {V} but there is no d2t tensor, so vLLM "
                    "maps draft id i to verifier id i and acceptance collapses",
                    "save d2t (int64 [draft_vocab_size], verifier id = i + d2t[i])",
                )
        else:
            if d2t.dtype != "I64":
                self.weights(
                    "d2t-dtype", f"d2t is {d2t.dtype}, vLLM needs int64", "save d2t as int64"
                )
            if d2t.shape != (Vd,):
                self.weights(
                    "d2t-shape",
                    f"d2t has shape {list(d2t.shape)}, expected [{Vd}] (draft_vocab_size)",
                    "save one offset per draft token",
                )
        if t2d is not None:
            if t2d.dtype != "BOOL":
                self.weights("t2d-dtype", f"t2d is {t2d.dtype}, expected bool", "save t2d as bool")
            if t2d.shape != (V,):
                self.weights(
                    "t2d-shape",
                    f"t2d has shape {list(t2d.shape)}, expected [{V}] (vocab_size)",
                    "save one flag per verifier token",
                )
        if (
            d2t is not None
            and d2t.dtype == "I64"
            and d2t.shape == (Vd,)
            and not {"d2t-dtype", "d2t-shape", "t2d-dtype", "t2d-shape"} & self.codes
        ):
            self._check_mapping_values(d2t, t2d, V)

    def _check_mapping_values(self, d2t: TensorInfo, t2d: TensorInfo | None, vocab: int) -> None:
        """d2t must map draft ids to strictly increasing verifier ids < V; t2d must agree."""
        offsets = read_small_tensor(d2t)
        targets = [i + int(o) for i, o in enumerate(offsets)]
        problem = None
        if any(b <= a for a, b in itertools.pairwise(targets)):
            problem = "d2t does not map draft ids to strictly increasing verifier ids"
        elif targets and (targets[0] < 0 or targets[-1] >= vocab):
            problem = f"d2t maps draft ids outside the verifier vocabulary 0..{vocab - 1}"
        elif t2d is not None:
            flags = read_small_tensor(t2d)
            chosen = {j for j, flag in enumerate(flags) if flag}
            if chosen != set(targets):
                problem = "t2d does not mark exactly the verifier ids that d2t maps to"
        if problem:
            self.weights(
                "d2t-values",
                f"{problem} (d2t holds offsets: verifier id = i + d2t[i])",
                "rebuild d2t/t2d from the token counts (speculators_core.vocab.build_vocab_mapping)",
            )


def lint_peagle(context: LintContext) -> Iterable[Finding]:
    """The P-EAGLE findings: every EAGLE-3 rule, then what vLLM 0.32 reads for ``peagle``
    (FORMAT-PARALLEL.md 2.1, 2.6): ``mask_token_id``, ``mask_hidden``, no ``fc_norm``, and the
    aux-state count a Llama draft layer learns from its config."""
    rules = _PEagleRules(context)
    rules.run()
    return rules.findings


class _PEagleRules(_Eagle3Rules):
    def run(self) -> None:
        super().run()
        data = self.context.config
        token = data.get("mask_token_id")
        if isinstance(token, bool) or not isinstance(token, int):
            self.config(
                "peagle-mask-token",
                "mask_token_id is "
                + ("missing" if token is None else f"{token!r}, not a token id")
                + " (vLLM reads it as the parallel-drafting token and fails without it)",
                "write the mask token id the draft was trained with",
            )
        if data.get("fc_norm"):
            self.config(
                "peagle-fc-norm",
                "fc_norm is true, but vLLM does not read fc_norm for P-EAGLE drafts and would "
                "serve the draft without those norms",
                "retrain with norm_before_fc (or no input norm) instead of fc_norm",
            )
        layer = data.get("transformer_layer_config")
        ids = data.get("eagle_aux_hidden_state_layer_ids")
        if (
            isinstance(layer, dict)
            and layer.get("model_type") == "llama"
            and isinstance(ids, list)
            and len(ids) != 3
            and layer.get("num_aux_hidden_states") != len(ids)
        ):
            self.config(
                "peagle-aux-count",
                f"a Llama-layer P-EAGLE draft with {len(ids)} aux states: vLLM sizes its fc for "
                "3 unless transformer_layer_config says otherwise",
                f"write num_aux_hidden_states: {len(ids)} inside transformer_layer_config",
            )

    def _extra_tensors(
        self,
        expected: dict[str, tuple[int, ...] | None],
        required: list[str],
        fc_width: int,
    ) -> None:
        expected["mask_hidden"] = (1, 1, fc_width)
        required.append("mask_hidden")
