"""Evaluation prompts: the built-in held-out ShareGPT split, or a user file, rendered as chat."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from speculators_core.errors import SpeculatorsError

__all__ = ["BUILTIN_PROMPTS", "first_user_turn", "load_prompt_texts", "render_prompts"]

#: The name of the built-in prompt set: first user turns of the held-out ShareGPT records.
BUILTIN_PROMPTS = "sharegpt-heldout"

_USER_ROLES = {"human", "user"}


def first_user_turn(record: dict[str, Any]) -> str | None:
    """The text of the first user turn of a ShareGPT- or OpenAI-style conversation, if any."""
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list):
        return None
    for turn in turns:
        if not isinstance(turn, dict):
            continue
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role in _USER_ROLES and isinstance(text, str) and text.strip():
            return text
    return None


def _file_records(path: Path) -> Iterator[tuple[int, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpeculatorsError(
                f"prompt file '{path}' is not valid JSON (line {err.lineno}: {err.msg})"
            ) from err
        if not isinstance(data, list):
            raise SpeculatorsError(
                f"prompt file '{path}' must hold a JSON list of prompts or conversations"
            )
        yield from enumerate(data, start=1)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise SpeculatorsError(
                    f"{path}:{number}: not valid JSON ({err.msg}); fix the line"
                ) from err
        else:
            yield number, line


def load_prompt_texts(source: str | os.PathLike[str], limit: int) -> list[str]:
    """Up to ``limit`` user prompts from ``source``.

    ``source`` is :data:`BUILTIN_PROMPTS` (first user turn of each held-out ShareGPT record, in
    file order) or a file: ``.txt`` (one prompt per line), ``.jsonl``/``.json`` (objects with a
    ``prompt`` string, or conversations whose first user turn is used).
    """
    if limit < 1:
        raise SpeculatorsError(f"number of prompts must be at least 1, got {limit}")
    texts: list[str] = []
    if str(source) == BUILTIN_PROMPTS:
        from speculators_core.assets import sharegpt_records

        for record in sharegpt_records("heldout"):
            text = first_user_turn(record)
            if text:
                texts.append(text)
            if len(texts) >= limit:
                break
        return texts
    path = Path(source)
    if not path.is_file():
        raise SpeculatorsError(
            f"prompt file '{path}' does not exist; pass a .txt/.jsonl/.json file or '{BUILTIN_PROMPTS}'"
        )
    for number, item in _file_records(path):
        found: str | None
        if isinstance(item, str):
            found = item
        elif isinstance(item, dict):
            found = item["prompt"] if isinstance(item.get("prompt"), str) else first_user_turn(item)
        else:
            found = None
        if not found:
            raise SpeculatorsError(
                f"{path}:{number}: no prompt found (expected a 'prompt' string or a conversation with a user turn)"
            )
        texts.append(found)
        if len(texts) >= limit:
            break
    if not texts:
        raise SpeculatorsError(f"prompt file '{path}' holds no prompts")
    return texts


def render_prompts(
    texts: list[str], tokenizer: Any, *, max_prompt_tokens: int | None = None
) -> list[list[int]]:
    """Token ids of each text as a single user turn with the chat template and generation prompt.

    Prompts longer than ``max_prompt_tokens`` keep their last tokens (the generation prompt
    stays intact).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise SpeculatorsError(
            "the verifier's tokenizer has no chat template; evaluation prompts are rendered as chat"
        )
    out: list[list[int]] = []
    for text in texts:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        ids = list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            ids = ids[-max_prompt_tokens:]
        out.append(ids)
    return out
