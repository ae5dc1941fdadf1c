"""Reading what a draft needs from a verifier folder: its config and three tensors.

EAGLE-style drafts share or copy the verifier's token embedding (``embed_tokens``), its LM head
and its final norm (frozen copies for training targets, or the shared head itself). Only those
tensors are read from the safetensors files (single or sharded); the verifier model itself is
never instantiated.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PreTrainedConfig

from speculators_core.errors import SpeculatorsError

__all__ = ["VerifierParts", "load_verifier_config", "load_verifier_parts"]


def load_verifier_config(folder: str | os.PathLike[str]) -> PreTrainedConfig:
    """The verifier's text-model config (``text_config`` of a multimodal model).

    ``folder`` is checked and read by :func:`speculators_core.data.verifier.read_verifier_config`
    (the one reader of a verifier's ``config.json``; one-line errors for a missing folder or file
    and for invalid JSON); transformers then builds the typed config from the same folder, since
    only it knows each architecture's config class and nested sub-configs.
    """
    # Function-level import: importing the modeling package must not load the data package.
    from speculators_core.data.verifier import read_verifier_config, verifier_folder

    path = verifier_folder(folder)
    read_verifier_config(path)
    config = AutoConfig.from_pretrained(path)
    text_config = config.get_text_config()
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if getattr(text_config, name, None) is None:
            raise SpeculatorsError(
                f"verifier '{path}' config has no '{name}'; the draft needs a decoder-only text model"
            )
    return text_config


@dataclass
class VerifierParts:
    """The verifier tensors a draft copies or shares (full vocabulary, verifier dtype)."""

    embed_tokens: torch.Tensor  # [V, Ht]
    lm_head: torch.Tensor  # [V, Ht] (the embedding for tied models)
    final_norm: torch.Tensor  # [Ht]


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise SpeculatorsError(
        f"verifier '{folder}' has no model.safetensors (or sharded index); save it with "
        "save_pretrained(safe_serialization=True)"
    )


def _pick(names: list[str], suffix: str, *, exclude: str | None = None) -> str | None:
    """The shortest tensor name ending in ``suffix`` (e.g. ``model.norm.weight``)."""
    found = [
        n
        for n in names
        if (n == suffix or n.endswith("." + suffix)) and (exclude is None or exclude not in n)
    ]
    return min(found, key=len) if found else None


def load_verifier_parts(folder: str | os.PathLike[str]) -> VerifierParts:
    """Read the embedding, LM head and final norm of the verifier in ``folder``."""
    path = Path(folder)
    files = _weight_files(path)
    located: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                located[name] = file
    names = sorted(located)
    embed = _pick(names, "embed_tokens.weight")
    head = _pick(names, "lm_head.weight")
    # The final norm of the text decoder: its usual names first, then any ``norm.weight``
    # outside the decoder layers.
    known = (
        "model.norm.weight",
        "model.language_model.norm.weight",
        "language_model.model.norm.weight",
    )
    norm = next((n for n in known if n in located), None) or _pick(
        names, "norm.weight", exclude="layers."
    )
    if embed is None or norm is None:
        missing = "embed_tokens.weight" if embed is None else "final norm.weight"
        raise SpeculatorsError(
            f"verifier '{path}' has no {missing} tensor; the draft needs a Llama/Qwen-style decoder"
        )

    def read(name: str) -> torch.Tensor:
        with safe_open(str(located[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    embed_tensor = read(embed)
    return VerifierParts(
        embed_tokens=embed_tensor,
        lm_head=read(head) if head is not None else embed_tensor,  # tied embeddings
        final_norm=read(norm),
    )
