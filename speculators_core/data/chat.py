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
end-of-turn token came before it in that span.

Templates that rewrite an earlier answer once later turns exist (Qwen3 drops the thinking of
answers before the last user turn): the answer's render as the last turn is then not a prefix of
the whole, so its span runs from the end of its prompt (which must still be a prefix) to the
next answer's prompt, and its end-of-turn token ends it; a template that rewrites the prompts
themselves, or ends no rewritten answer with an end-of-turn token, is refused with a
:class:`~speculators_core.data.errors.ChatTemplateError`.

Reasoning: with ``reasoning_loss=False`` an answer's span starts where its content starts (found
by rendering the turn with a sentinel for the content), or after an inline ``</think>``, so its
thinking stays in the context but out of the loss.

**Truncation point:** a conversation longer than ``seq_length`` tokens keeps its first
``seq_length`` tokens (the start of the chat is kept whole; an answer cut in the middle still
supervises its visible part). A sample left with no supervised token is dropped and counted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
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
        self,
        tokenizer: Any,
        *,
        eos_ids: set[int],
        seq_length: int | None = None,
        name: str = "",
        reasoning_loss: bool = True,
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
        self.reasoning_loss = reasoning_loss

    @classmethod
    def from_verifier(
        cls,
        verifier: str | os.PathLike[str],
        *,
        seq_length: int | None = None,
        reasoning_loss: bool = True,
    ) -> ChatRenderer:
        """A renderer with the tokenizer, template and EOS ids of the verifier folder."""
        from speculators_core.data.verifier import eos_token_ids, load_tokenizer

        tokenizer = load_tokenizer(verifier)
        return cls(
            tokenizer,
            eos_ids=eos_token_ids(verifier, tokenizer),
            seq_length=seq_length,
            name=str(verifier),
            reasoning_loss=reasoning_loss,
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
        """The whole conversation's text and the character span of what each assistant turn
        writes (without its thinking when ``reasoning_loss`` is off).

        A turn whose render as the last turn is not a prefix of the whole (templates such as
        Qwen3's drop the thinking of answers before the last user turn) is located where the
        whole render shows it: its span starts at the end of its prompt and is left open (end
        ``-1``); :meth:`__call__` runs it to the next answer's span, the mask stopping at its
        end-of-turn token.
        """
        full = self.render_text(turns, add_generation_prompt=False)
        spans: list[tuple[int, int]] = []
        for j, turn in enumerate(turns):
            if turn.role != "assistant":
                continue
            before = self.render_text(turns[:j], add_generation_prompt=True) if j else ""
            if not full.startswith(before):
                raise ChatTemplateError(
                    f"chat template of '{self.name}' renders the start of a conversation "
                    "differently once later turns follow (it rewrites earlier turns), so loss "
                    "masks cannot be derived from prefixes; use a prefix-stable template"
                )
            through = self.render_text(turns[: j + 1], add_generation_prompt=False)
            if full.startswith(through) and through.startswith(before):
                start = len(before)
                if not self.reasoning_loss:
                    start = self._answer_start(turns, j, before, through)
                spans.append((start, len(through)))
            else:
                # Rewritten once later turns follow: the turn as the conversation shows it.
                spans.append((len(before), -1))
        return full, spans

    #: Stands for an answer's content to find where the content starts in a render.
    _SENTINEL = "\ue000speculators-answer\ue000"

    def _answer_start(self, turns: Sequence[Turn], j: int, before: str, through: str) -> int:
        """Where turn ``j``'s answer starts in ``through``: after its thinking (the template's
        rendering of ``reasoning``, or inline text up to ``</think>``)."""
        turn = turns[j]
        if turn.reasoning is not None:
            marked = [*turns[:j], replace(turn, content=self._SENTINEL)]
            probe = self.render_text(marked, add_generation_prompt=False)
            at = probe.find(self._SENTINEL)
            if at < len(before) or probe[:at] != through[:at]:
                raise ChatTemplateError(
                    f"chat template of '{self.name}' does not render an answer's content after "
                    "its reasoning, so the thinking cannot be left out of the loss; keep it "
                    "supervised (--reasoning-loss)"
                )
            return at
        close = through.find("</think>", len(before))
        if close < 0:
            return len(before)
        end = close + len("</think>")
        while end < len(through) and through[end] in " \n":
            end += 1
        return end

    def __call__(self, turns: Sequence[Turn]) -> RenderedSample:
        """Render, tokenize, mask and truncate one conversation."""
        text, raw_spans = self.assistant_spans(turns)
        # Open spans (-1) run to the next span's start; their end-of-turn token ends them.
        spans = [
            (lo, hi if hi >= 0 else (raw_spans[i + 1][0] if i + 1 < len(raw_spans) else len(text)))
            for i, (lo, hi) in enumerate(raw_spans)
        ]
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = list(encoded["input_ids"])
        offsets: list[tuple[int, int]] = [tuple(o) for o in encoded["offset_mapping"]]
        mask = [0] * len(ids)
        span_index = 0
        ended = False  # the current span's end-of-turn token has been seen
        ended_open = [hi >= 0 for _lo, hi in raw_spans]  # closed spans need no end token
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
                ended_open[span_index] = True
        if not all(ended_open):
            raise ChatTemplateError(
                f"chat template of '{self.name}' rewrites earlier answers once later turns "
                "follow and ends no answer with an end-of-turn token, so where an earlier answer "
                "ends cannot be found; use a prefix-stable template"
            )
        full_length = len(ids)
        if self.seq_length is not None and full_length > self.seq_length:
            ids, mask = ids[: self.seq_length], mask[: self.seq_length]
        return RenderedSample(input_ids=ids, loss_mask=mask, full_length=full_length)
