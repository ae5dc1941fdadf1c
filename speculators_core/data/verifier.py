"""Loading the verifier's tokenizer and model for data work, with one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from speculators_core.data.errors import ChatTemplateError, VerifierError

__all__ = [
    "eos_token_ids",
    "load_tokenizer",
    "load_verifier_model",
    "read_verifier_config",
    "resolve_device",
    "verifier_folder",
]


def verifier_folder(path: str | os.PathLike[str]) -> Path:
    """``path`` as a verifier folder; a clear error if it is missing or has no ``config.json``.

    ``'smollm2'`` names the embedded default verifier (materialised on first use).
    """
    from speculators_core.assets import resolve_verifier_path

    folder = resolve_verifier_path(path)
    if not folder.exists():
        raise VerifierError(
            f"verifier '{folder}' does not exist; pass a local transformers model folder "
            "(hub downloads are not supported here)"
        )
    if not (folder / "config.json").is_file():
        raise VerifierError(f"verifier '{folder}' has no config.json; pass a model folder")
    return folder


def read_verifier_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The verifier's ``config.json`` as a dict (``text_config`` merged in for multimodal models).

    The one reader of a verifier folder's config (the typed
    :func:`speculators_core.modeling.verifier.load_verifier_config` checks through it): a
    one-line :class:`VerifierError` for a missing folder or ``config.json``, invalid JSON, or a
    file that is not a JSON object.
    """
    folder = verifier_folder(path)
    file = folder / "config.json"
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise VerifierError(f"'{file}' is not valid JSON: {err.msg}") from None
    if not isinstance(data, dict):
        raise VerifierError(
            f"'{file}' holds a JSON {type(data).__name__}, not an object; pass a model folder"
        )
    if isinstance(data.get("text_config"), dict):
        data = {**data, **data["text_config"]}
    return data


def load_tokenizer(path: str | os.PathLike[str], *, need_chat_template: bool = True) -> Any:
    """The verifier's tokenizer; a one-line error if it is missing or has no chat template."""
    from transformers import AutoTokenizer

    folder = verifier_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VerifierError(f"could not load a tokenizer from '{folder}': {first}") from err
    if need_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"verifier '{folder}' has no chat template (no chat_template.jinja and none in "
            "tokenizer_config.json); use the instruct/chat model or add its template"
        )
    return tokenizer


def eos_token_ids(path: str | os.PathLike[str], tokenizer: Any) -> set[int]:
    """Ids that end an assistant turn: the tokenizer's EOS plus the model's (generation) EOS ids."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    folder = Path(path)
    for name in ("generation_config.json", "config.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            value = json.loads(file.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value if isinstance(v, int))
    return ids


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_verifier_model(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Any:
    """The verifier as an eval-mode ``AutoModelForCausalLM``, or for a vision-language verifier
    (a ``text_config`` beside a ``vision_config``: Qwen2.5-VL, Qwen3-VL) its
    ``AutoModelForImageTextToText`` class, which reads text-only inputs the same way.

    ``dtype`` defaults to float32 on CPU (bf16 matmuls are slow on CPUs without AVX512-BF16)
    and bfloat16 on accelerators.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    folder = verifier_folder(path)
    dev = resolve_device(device)
    if dtype is None:
        dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    raw = read_verifier_config(folder)  # text_config merged in, the key itself kept
    multimodal = isinstance(raw.get("text_config"), dict) and "vision_config" in raw
    auto_class: Any = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    try:
        model: Any = auto_class.from_pretrained(str(folder), dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VerifierError(f"could not load the verifier model from '{folder}': {first}") from err
    model.to(dev)
    model.eval()
    return model
