"""``speculators check``: an offline linter of a speculator folder against what vLLM reads.

It checks a folder without vLLM and without loading weights: ``config.json`` against the
contract of FORMAT.md 2.9 and the tensors' names, shapes and dtypes from the safetensors
headers (a single file or a sharded index). Only ``d2t``/``t2d`` (two small vectors) are read to
check that the vocabulary mapping is consistent. When the verifier is reachable (``verifier=``
or a local ``speculators_config.verifier.name_or_path``) the draft's vocabulary, hidden size,
aux layer ids and context length are compared with it and its tokenizer.

Every problem is a :class:`Finding` that prints as one line, ``<file>: <problem>; <fix>``.
Findings of one kind are grouped (three prefixed tensor names are one finding listing them),
so a single fault gives a single line. Only EAGLE-3 (``speculators_model_type: "eagle3"``) is
checked down to the tensors; other types vLLM knows get the config checks.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speculators_core.errors import SpeculatorsError

__all__ = [
    "VLLM_SPECULATOR_TYPES",
    "CheckReport",
    "Finding",
    "TensorInfo",
    "check_checkpoint",
    "looks_like_local_path",
    "read_safetensors_header",
    "read_tensor_infos",
]

logger = logging.getLogger(__name__)

#: ``speculators_model_type`` values vLLM 0.32 registers (``SUPPORTED_SPECULATORS_TYPES``).
VLLM_SPECULATOR_TYPES: tuple[str, ...] = ("eagle3", "peagle", "dflash", "dflash2", "dspark")
#: Draft decoder families vLLM maps to its EAGLE-3 classes.
EAGLE3_LAYER_TYPES: tuple[str, ...] = ("llama", "qwen3")

_FLOAT_DTYPES = frozenset({"F32", "F16", "BF16", "F64"})
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
# Prefixes that wrappers (DDP, FSDP, a parent module) put in front of the real names.
_WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.", "draft_model.", "speculator.", "drafter.")
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# A hub id: "name" or "org/name" (letters, digits, '-', '_', '.'), not starting with '.' or '/'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Finding:
    """One problem: the file it is in, a short stable ``code``, what is wrong and the fix."""

    file: str
    code: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}; {self.fix}"

    def to_json(self) -> dict[str, str]:
        """A JSON-ready dict (``speculators check --json``)."""
        return {"file": self.file, "code": self.code, "problem": self.problem, "fix": self.fix}


@dataclass
class CheckReport:
    """The outcome of :func:`check_checkpoint`."""

    folder: Path
    findings: list[Finding] = field(default_factory=list)
    algorithm: str | None = None
    num_tensors: int = 0
    verifier: Path | None = None

    @property
    def ok(self) -> bool:
        """True when nothing was found."""
        return not self.findings

    @property
    def codes(self) -> list[str]:
        """The finding codes, in order."""
        return [f.code for f in self.findings]


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as its safetensors header describes it (no data read)."""

    name: str
    dtype: str  # safetensors dtype: F32, BF16, I64, BOOL, ...
    shape: tuple[int, ...]
    file: Path
    offsets: tuple[int, int]


class _HeaderError(Exception):
    pass


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """The tensors listed in a safetensors file's JSON header (8-byte length + JSON)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) != 8:
            raise _HeaderError("file is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw_len)
        if length > min(size - 8, 100_000_000):
            raise _HeaderError(f"header length {length} does not fit the file ({size} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _HeaderError(f"header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _HeaderError("header is not a JSON object")
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            out[name] = TensorInfo(
                name=name,
                dtype=str(entry["dtype"]),
                shape=tuple(int(d) for d in entry["shape"]),
                file=path,
                offsets=(int(entry["data_offsets"][0]), int(entry["data_offsets"][1])),
            )
        except (KeyError, TypeError, ValueError, IndexError):
            raise _HeaderError(f"header entry for '{name}' is malformed") from None
    return out


def read_tensor_infos(folder: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """All tensors of a folder's ``model.safetensors`` or sharded index (headers only).

    Raises :class:`SpeculatorsError` when there are no safetensors weights or they are unreadable.
    """
    folder = Path(folder)
    single, index = folder / _WEIGHTS, folder / _INDEX
    try:
        if single.is_file():
            return read_safetensors_header(single)
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise _HeaderError(f"{_INDEX} has no 'weight_map' object")
            infos: dict[str, TensorInfo] = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = folder / str(shard)
                if not shard_path.is_file():
                    raise _HeaderError(f"{_INDEX} lists shard '{shard}', which does not exist")
                infos.update(read_safetensors_header(shard_path))
            return infos
    except (_HeaderError, json.JSONDecodeError, OSError) as err:
        raise SpeculatorsError(f"{folder}: unreadable safetensors weights ({err})") from None
    raise SpeculatorsError(f"{folder}: no {_WEIGHTS} or {_INDEX}")


# ------------------------------------------------------------------------------------------------
# The checker
# ------------------------------------------------------------------------------------------------


def _names(items: Iterable[str], limit: int = 3) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def looks_like_local_path(name: str) -> bool:
    """Whether ``name_or_path`` is meant as a filesystem path rather than a hub id."""
    return not _HUB_ID.match(name) or name.startswith((".", "~")) or "\\" in name


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass
class _Verifier:
    folder: Path
    num_layers: int | None
    hidden_size: int | None
    vocab_size: int | None
    max_positions: int | None
    tokenizer_len: int | None


def _load_verifier(folder: Path) -> _Verifier | None:
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("text_config"), dict):  # multimodal verifiers nest the text model
        data = {**data, **data["text_config"]}
    tokenizer_len: int | None = None
    try:
        from transformers import AutoTokenizer

        tokenizer_len = len(AutoTokenizer.from_pretrained(str(folder)))
    except Exception as err:  # any tokenizer problem only skips the tokenizer check
        logger.info("could not load the tokenizer of %s: %r", folder, err)
    return _Verifier(
        folder=folder,
        num_layers=_int(data.get("num_hidden_layers")),
        hidden_size=_int(data.get("hidden_size")),
        vocab_size=_int(data.get("vocab_size")),
        max_positions=_int(data.get("max_position_embeddings")),
        tokenizer_len=tokenizer_len,
    )


class _Checker:
    def __init__(self, folder: Path, verifier: Path | None) -> None:
        self.folder = folder
        self.config_file = str(folder / "config.json")
        self.weights_file = str(folder / _WEIGHTS)
        self.explicit_verifier = verifier
        self.report = CheckReport(folder=folder)

    def add(self, file: str, code: str, problem: str, fix: str) -> None:
        self.report.findings.append(Finding(file, code, problem, fix))

    def config(self, code: str, problem: str, fix: str) -> None:
        self.add(self.config_file, code, problem, fix)

    def weights(self, code: str, problem: str, fix: str) -> None:
        self.add(self.weights_file, code, problem, fix)

    # ------------------------------------------------------------------ config.json

    def run(self) -> CheckReport:
        if not self.folder.is_dir():
            self.add(
                str(self.folder),
                "folder-missing",
                "is not a folder",
                "pass the folder that holds the speculator's config.json and safetensors",
            )
            return self.report
        data = self._read_config()
        if data is None:
            return self.report
        self.report.algorithm = data.get("speculators_model_type")
        verifier = self._check_top_level(data)
        if self.report.algorithm == "eagle3":
            self._check_eagle3(data, verifier)
        return self.report

    def _read_config(self) -> dict[str, Any] | None:
        path = Path(self.config_file)
        if not path.is_file():
            self.config(
                "config-missing",
                "does not exist",
                "save the speculator with save_pretrained (it writes config.json)",
            )
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            self.config("config-json", f"is not valid JSON ({err})", "fix or re-save it")
            return None
        if not isinstance(data, dict):
            self.config(
                "config-json", f"holds a {type(data).__name__}, not an object", "re-save it"
            )
            return None
        return data

    def _check_top_level(self, data: Mapping[str, Any]) -> _Verifier | None:
        if "speculators_config" not in data and "speculators_model_type" not in data:
            kind = data.get("model_type")
            self.config(
                "not-speculators",
                "is not a speculators-format config (no speculators_config"
                + (f"; model_type '{kind}'" if kind else "")
                + ")",
                "convert the checkpoint with 'speculators convert', or check a speculator folder",
            )
            return None
        if "model_type" in data:
            self.config(
                "model-type-top-level",
                f"has a top-level 'model_type' ({data['model_type']!r}), so vLLM does not "
                "detect it as a speculator",
                "delete the top-level 'model_type' key (the type is speculators_model_type)",
            )
        kind = data.get("speculators_model_type")
        if not isinstance(kind, str) or not kind:
            self.config(
                "speculators-model-type",
                "has no speculators_model_type",
                "set speculators_model_type to the algorithm, e.g. 'eagle3'",
            )
        elif kind == "eagle":
            self.config(
                "speculators-model-type",
                "speculators_model_type 'eagle' (EAGLE-1/HASS) is not served by vLLM",
                "export the draft in vLLM's native EAGLE layout and serve it with method 'eagle'",
            )
        elif kind not in VLLM_SPECULATOR_TYPES:
            self.config(
                "speculators-model-type",
                f"speculators_model_type {kind!r} is not one vLLM serves",
                f"use one of {', '.join(VLLM_SPECULATOR_TYPES)}",
            )
        spec = data.get("speculators_config")
        if not isinstance(spec, dict):
            self.config(
                "speculators-config",
                "has no speculators_config object",
                "add speculators_config with algorithm, proposal_methods, "
                "default_proposal_method and verifier",
            )
        verifier = None
        if isinstance(spec, dict):
            self._check_proposals(spec)
            verifier = self._check_verifier_name(spec)
        elif self.explicit_verifier is not None:
            verifier = self._use_verifier(self.explicit_verifier)
        layer = data.get("transformer_layer_config")
        if not isinstance(layer, dict):
            self.config(
                "layer-config",
                "transformer_layer_config is "
                + ("missing" if layer is None else f"a {type(layer).__name__}, not an object"),
                "write the draft decoder's transformers config as a JSON object",
            )
        elif kind == "eagle3" and layer.get("model_type") not in EAGLE3_LAYER_TYPES:
            found = layer.get("model_type")
            self.config(
                "layer-model-type",
                "transformer_layer_config has "
                + (f"model_type {found!r}" if found is not None else "no model_type")
                + ", which vLLM cannot map to an EAGLE-3 draft class",
                f"set transformer_layer_config.model_type to one of {', '.join(EAGLE3_LAYER_TYPES)}",
            )
        return verifier

    def _check_proposals(self, spec: Mapping[str, Any]) -> None:
        methods = spec.get("proposal_methods")
        methods = methods if isinstance(methods, list) else []
        first = methods[0] if methods else None
        tokens = _int(first.get("speculative_tokens")) if isinstance(first, dict) else None
        if tokens is None or tokens < 1:
            self.config(
                "speculative-tokens",
                "speculators_config.proposal_methods[0].speculative_tokens is "
                + ("missing" if tokens is None else f"{tokens}")
                + " (vLLM reads it as num_speculative_tokens)",
                "add a proposal method {'proposal_type': 'greedy', 'speculative_tokens': 3}",
            )
            return
        default = spec.get("default_proposal_method")
        kinds = [m.get("proposal_type") for m in methods if isinstance(m, dict)]
        if default is not None and default not in kinds:
            self.config(
                "default-proposal",
                f"default_proposal_method {default!r} names none of the proposal_methods "
                f"({_names(str(k) for k in kinds)})",
                "set it to the proposal_type of one entry, e.g. 'greedy'",
            )

    def _check_verifier_name(self, spec: Mapping[str, Any]) -> _Verifier | None:
        entry = spec.get("verifier")
        name = entry.get("name_or_path") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name.strip():
            self.config(
                "verifier-name",
                "speculators_config.verifier.name_or_path is missing (vLLM serves that model "
                "as the target)",
                "set it to the verifier's hub id or its path where vLLM runs",
            )
        elif looks_like_local_path(name) and not Path(name).expanduser().exists():
            self.config(
                "verifier-path",
                f"speculators_config.verifier.name_or_path '{name}' is a path that does not "
                "exist here, so 'vllm serve' on this folder cannot load the verifier",
                "set it to a hub id or the verifier's path on the serving machine, or serve "
                "with --speculative-config and the verifier as the model",
            )
        folder = self.explicit_verifier
        if folder is None and isinstance(name, str) and name.strip():
            candidate = Path(name).expanduser()
            if (candidate / "config.json").is_file():
                folder = candidate
        return None if folder is None else self._use_verifier(folder)

    def _use_verifier(self, folder: Path) -> _Verifier | None:
        verifier = _load_verifier(folder)
        self.report.verifier = folder if verifier is not None else None
        return verifier

    # ------------------------------------------------------------------ EAGLE-3

    def _check_eagle3(self, data: Mapping[str, Any], verifier: _Verifier | None) -> None:
        layer = data.get("transformer_layer_config")
        layer = layer if isinstance(layer, dict) else {}
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

        sizes = self._eagle3_sizes(data, layer)
        ids = self._check_aux_ids(data, verifier)
        if verifier is not None:
            self._compare_with_verifier(data, layer, sizes, verifier)

        try:
            tensors = read_tensor_infos(self.folder)
        except SpeculatorsError as err:
            self._weights_missing(str(err))
            tensors = {}
        self.report.num_tensors = len(tensors)
        names = self._normalize_names(tensors)
        if sizes is None:
            return
        if names:
            self._check_eagle3_tensors(data, layer, sizes, ids, names, verifier)
        if "fc.weight" not in names:  # else checked together with the fc width
            self._check_verifier_hidden(data, sizes, verifier)

    def _check_verifier_hidden(
        self, data: Mapping[str, Any], sizes: dict[str, int], verifier: _Verifier | None
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

    def _eagle3_sizes(
        self, data: Mapping[str, Any], layer: Mapping[str, Any]
    ) -> dict[str, int] | None:
        needed = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
        missing = [k for k in needed if _int(layer.get(k)) is None]
        if missing:
            if isinstance(data.get("transformer_layer_config"), dict):
                self.config(
                    "layer-config-fields",
                    f"transformer_layer_config lacks {_names(missing, 4)} (vLLM would use "
                    "Llama defaults)",
                    "write the draft's sizes (copied from the verifier by the exporter)",
                )
            return None
        hidden = int(layer["hidden_size"])
        heads = int(layer["num_attention_heads"])
        vocab = int(layer["vocab_size"])
        draft_vocab = data.get("draft_vocab_size")
        if draft_vocab is not None and (_int(draft_vocab) is None or not 0 < draft_vocab <= vocab):
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
            "kv": _int(layer.get("num_key_value_heads")) or heads,
            "hd": _int(layer.get("head_dim")) or hidden // heads,
            "I": int(layer["intermediate_size"]),
            "L": _int(layer.get("num_hidden_layers")) or 1,
            "V": vocab,
            # vLLM: an absent draft_vocab_size means the full vocabulary.
            "Vd": int(draft_vocab) if draft_vocab is not None else vocab,
            "Ht": _int(target) or hidden,
        }

    def _check_aux_ids(
        self, data: Mapping[str, Any], verifier: _Verifier | None
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
            or not all(_int(i) is not None and i >= 0 for i in ids)
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
        data: Mapping[str, Any],
        layer: Mapping[str, Any],
        sizes: dict[str, int] | None,
        verifier: _Verifier,
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
        draft_max = _int(layer.get("max_position_embeddings"))
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

    def _weights_missing(self, message: str) -> None:
        if (self.folder / "pytorch_model.bin").is_file():
            self.weights(
                "weights-format",
                "does not exist; the weights are in pytorch_model.bin",
                "re-save with safetensors (save_pretrained writes model.safetensors)",
            )
        elif "unreadable" in message:
            self.weights("weights-unreadable", message.split(": ", 1)[-1], "re-save the weights")
        else:
            self.weights(
                "weights-missing",
                f"does not exist (nor {_INDEX})",
                "save the speculator with save_pretrained",
            )

    def _normalize_names(self, tensors: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
        """Strip wrapper prefixes (reporting them once) so later checks see the real names."""
        prefixed: list[str] = []
        out: dict[str, TensorInfo] = {}
        for name, info in tensors.items():
            real = name
            while real.startswith(_WRAPPER_PREFIXES):
                real = real.split(".", 1)[1]
            if real != name:
                prefixed.append(name)
            if real.startswith("midlayer."):  # SafeAILab layout; vLLM maps it to layers.0
                real = "layers.0." + real[len("midlayer.") :]
            out[real] = info
        if prefixed:
            self.weights(
                "tensor-prefixed",
                f"{len(prefixed)} tensor name(s) carry a wrapper prefix ({_names(prefixed)}); "
                "vLLM adds 'model.' itself and cannot find them",
                "save the bare module names (fc.weight, layers.0..., lm_head.weight)",
            )
        return out

    def _check_eagle3_tensors(
        self,
        data: Mapping[str, Any],
        layer: Mapping[str, Any],
        s: dict[str, int],
        ids: list[int] | None,
        tensors: Mapping[str, TensorInfo],
        verifier: _Verifier | None,
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

        fused = sorted(n for n in tensors if any(f".{f}." in n for f in _FUSED))
        if fused:
            self.weights(
                "tensor-fused",
                f"{_names(fused)} are fused projections; vLLM loads unfused HF-style "
                "q_proj/k_proj/v_proj and gate_proj/up_proj and fuses them itself",
                "split them into the separate projections before saving",
            )
        # The separate projections a fused tensor stands for are not reported missing as well.
        explained: set[str] = set()
        for name in fused:
            for fused_name, parts in _FUSED.items():
                if f".{fused_name}." in name:
                    explained.update(name.replace(fused_name, part) for part in parts)
        unknown = sorted(n for n in tensors if n not in expected and n not in fused)
        if unknown:
            self.weights(
                "tensor-unknown",
                f"unexpected tensor(s) {_names(unknown)} for an EAGLE-3 draft with "
                f"{s['L']} layer(s); vLLM fails to load names it does not know",
                "save only the draft's own weights (no verifier or training-only tensors)",
            )
        missing = [n for n in required if n not in tensors and n not in explained]
        if missing:
            self.weights(
                "tensor-missing",
                f"required tensor(s) {_names(missing)} are missing",
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
                f"shape mismatch with transformer_layer_config: {_names(wrong)}",
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
                f"weight(s) {_names(f'{n} ({tensors[n].dtype})' for n in not_float)} are not "
                "floating point",
                "save the weights in float32, bfloat16 or float16",
            )

    def _check_fc_width(
        self,
        data: Mapping[str, Any],
        s: dict[str, int],
        ids: list[int] | None,
        width: int,
        verifier: _Verifier | None,
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
            and not {"d2t-dtype", "d2t-shape", "t2d-dtype", "t2d-shape"} & set(self.report.codes)
        ):
            self._check_mapping_values(d2t, t2d, V)

    def _check_mapping_values(self, d2t: TensorInfo, t2d: TensorInfo | None, vocab: int) -> None:
        """d2t must map draft ids to strictly increasing verifier ids < V; t2d must agree."""
        offsets = _read_small_tensor(d2t)
        targets = [i + int(o) for i, o in enumerate(offsets)]
        problem = None
        if any(b <= a for a, b in itertools.pairwise(targets)):
            problem = "d2t does not map draft ids to strictly increasing verifier ids"
        elif targets and (targets[0] < 0 or targets[-1] >= vocab):
            problem = f"d2t maps draft ids outside the verifier vocabulary 0..{vocab - 1}"
        elif t2d is not None:
            flags = _read_small_tensor(t2d)
            chosen = {j for j, flag in enumerate(flags) if flag}
            if chosen != set(targets):
                problem = "t2d does not mark exactly the verifier ids that d2t maps to"
        if problem:
            self.weights(
                "d2t-values",
                f"{problem} (d2t holds offsets: verifier id = i + d2t[i])",
                "rebuild d2t/t2d from the token counts (speculators_core.vocab.build_vocab_mapping)",
            )


def _read_small_tensor(info: TensorInfo) -> list[int]:
    """The values of a 1-D int64 or bool tensor, read straight from the file."""
    start, end = info.offsets
    with open(info.file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        handle.seek(8 + length + start)
        raw = handle.read(end - start)
    if info.dtype == "I64":
        return list(struct.unpack(f"<{len(raw) // 8}q", raw))
    return list(raw)  # BOOL: one byte per value


def check_checkpoint(
    folder: str | os.PathLike[str], *, verifier: str | os.PathLike[str] | None = None
) -> CheckReport:
    """Lint a speculator folder against what vLLM reads (FORMAT.md 2.9); see the module doc.

    ``verifier`` is a local verifier folder to compare with; by default the folder named by
    ``speculators_config.verifier.name_or_path`` is used when it exists here. Raises
    :class:`SpeculatorsError` only when ``verifier`` is given and is not a model folder.
    """
    verifier_path = None
    if verifier is not None:
        verifier_path = Path(verifier)
        if not (verifier_path / "config.json").is_file():
            raise SpeculatorsError(
                f"verifier '{verifier_path}' is not a model folder (no config.json); pass the "
                "verifier's local folder"
            )
    return _Checker(Path(folder), verifier_path).run()
