"""Render conversations with the verifier's chat template and derive the loss mask.

The loss mask is 1 exactly on the tokens the assistant produces: the content of each assistant
turn and the token that ends it (the EOS / end-of-turn token the model emits to stop); it is 0
on system and user text, on role headers, and on template text after the end-of-turn token
(such as ChatML's newline).

How the assistant tokens are found, without guessing at the template's syntax: for the ``j``-th
turn, if it is an assistant turn, the template renders ``turns[:j]`` with the generation
prompt (everything the model sees before it starts answering) and ``turns[:j+1]`` without it
(the same plus the finished answer). Both renders must be prefixes of the render of the whole
conversation; the characters between their ends are the assistant's. The whole conversation is
tokenized once, and a token is supervised when its first character lies in such a span and no
end-of-turn token came before it in that span. A template that rewrites earlier turns once
later ones exist (so that a prefix render is not a prefix of the whole) is refused with a
:class:`~speculators_core.data.errors.ChatTemplateError`.

**Truncation point:** a conversation longer than ``seq_length`` tokens keeps its first
``seq_length`` tokens (the start of the chat is kept whole; an answer cut in the middle still
supervises its visible part). A sample left with no supervised token is dropped and counted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from speculators_core.data.conversations import SkipRecord, Turn
from speculators_core.data.errors import ChatTemplateError

__all__ = ["ChatRenderer", "RenderedSample"]


@dataclass(frozen=True)
class RenderedSample:
    """Token ids and loss mask of one conversation (plain lists; the caller picks tensor types)."""

    input_ids: list[int]
    loss_mask: list[int]
    #: Number of tokens before truncation.
    full_length: int

    @property
    def num_supervised(self) -> int:
        """Number of tokens with loss mask 1."""
        return sum(self.loss_mask)

    @property
    def truncated(self) -> bool:
        """Whether tokens were cut off at the end."""
        return self.full_length > len(self.input_ids)


class ChatRenderer:
    """Turns a normalised conversation into ``input_ids`` and ``loss_mask``.

    ``tokenizer`` must be a fast (Rust) tokenizer with a chat template; ``eos_ids`` are the ids
    that end an assistant turn (see :func:`speculators_core.data.verifier.eos_token_ids`).
    ``seq_length`` is the truncation length (None: no truncation).
    """

    def __init__(
        self, tokenizer: Any, *, eos_ids: set[int], seq_length: int | None = None, name: str = ""
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"tokenizer of '{name or 'the verifier'}' has no chat template; use a chat model"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise ChatTemplateError(
                f"tokenizer of '{name or 'the verifier'}' is not a fast tokenizer; loss masks "
                "need character offsets (install 'tokenizers' and save a tokenizer.json)"
            )
        if seq_length is not None and seq_length < 1:
            raise ValueError(f"seq_length must be positive, got {seq_length}")
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.seq_length = seq_length
        self.name = name

    @classmethod
    def from_verifier(
        cls, verifier: str | os.PathLike[str], *, seq_length: int | None = None
    ) -> ChatRenderer:
        """A renderer with the tokenizer, template and EOS ids of the verifier folder."""
        from speculators_core.data.verifier import eos_token_ids, load_tokenizer

        tokenizer = load_tokenizer(verifier)
        return cls(
            tokenizer,
            eos_ids=eos_token_ids(verifier, tokenizer),
            seq_length=seq_length,
            name=str(verifier),
        )

    def render_text(self, turns: Sequence[Turn], *, add_generation_prompt: bool) -> str:
        """The chat template's text for ``turns``; a template error becomes a :class:`SkipRecord`."""
        messages = [t.to_message() for t in turns]
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as err:  # jinja raises TemplateError / exceptions raised by the template
            if type(err).__name__ in ("TemplateError", "TemplateSyntaxError", "UndefinedError"):
                raise SkipRecord("rejected by the chat template") from err
            raise
        if not isinstance(text, str):
            raise ChatTemplateError(f"chat template of '{self.name}' did not render a string")
        return text

    def assistant_spans(self, turns: Sequence[Turn]) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation's text and the character span of each assistant turn."""
        full = self.render_text(turns, add_generation_prompt=False)
        spans: list[tuple[int, int]] = []
        for j, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            before = self.render_text(turns[:j], add_generation_prompt=True) if j else ""
            through = self.render_text(turns[: j + 1], add_generation_prompt=False)
            if not (full.startswith(through) and through.startswith(before)):
                raise ChatTemplateError(
                    f"chat template of '{self.name}' renders the start of a conversation "
                    "differently once later turns follow (it rewrites earlier turns), so loss "
                    "masks cannot be derived from prefixes; use a prefix-stable template"
                )
            spans.append((len(before), len(through)))
        return full, spans

    def __call__(self, turns: Sequence[Turn]) -> RenderedSample:
        """Render, tokenize, mask and truncate one conversation."""
        text, spans = self.assistant_spans(turns)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = list(encoded["input_ids"])
        offsets: list[tuple[int, int]] = [tuple(o) for o in encoded["offset_mapping"]]
        mask = [0] * len(ids)
        span_index = 0
        ended = False  # the current span's end-of-turn token has been seen
        for i, (start, _end) in enumerate(offsets):
            while span_index < len(spans) and start >= spans[span_index][1]:
                span_index += 1
                ended = False
            if span_index == len(spans):
                break
            lo, _hi = spans[span_index]
            if start < lo or ended:
                continue
            mask[i] = 1
            if ids[i] in self.eos_ids:
                ended = True
        full_length = len(ids)
        if self.seq_length is not None and full_length > self.seq_length:
            ids, mask = ids[: self.seq_length], mask[: self.seq_length]
        return RenderedSample(input_ids=ids, loss_mask=mask, full_length=full_length)
