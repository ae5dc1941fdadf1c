"""Reasoning and tool-use chats: thinking and tool calls render through the verifier's own
template, and the loss mask covers what the assistant writes (its thinking included or not).

The template is Qwen3-style: an answer after the last user turn shows its thinking as
``<think>\\nR\\n</think>\\n\\n`` before the content, earlier answers show the content only (the
template rewrites them once a later user turn follows), tool calls follow the content as
``<tool_call>`` blocks, and a tool's result is a user turn wrapped in ``<tool_response>``. The
expected text and mask are derived independently: the conversation's text is concatenated here
piece by piece, with the character ranges the assistant writes, and a token is supervised when
its first character lies in one of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from speculators_core.data.chat import ChatRenderer
from speculators_core.data.conversations import normalize_record
from speculators_core.data.errors import ChatTemplateError
from speculators_core.testing import make_tiny_tokenizer

QWEN3_STYLE = (
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}"
    "{%- set ns.last_query = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' or m.role == 'user' -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if loop.index0 > ns.last_query and m.reasoning_content is defined"
    " and m.reasoning_content is not none -%}"
    "{{- '<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{{- m.content -}}"
    "{%- if m.tool_calls is defined and m.tool_calls -%}{%- for call in m.tool_calls -%}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + call.function.name + \'", "arguments": \''
    " + (call.function.arguments | tojson) + '}\\n</tool_call>' -}}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif m.role == 'tool' -%}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

RECORD = {
    "messages": [
        {"role": "system", "content": "you are helpful"},
        {"role": "user", "content": "what is two and two"},
        {"role": "assistant", "reasoning_content": "add them up", "content": "it is four"},
        {"role": "user", "content": "and the weather in paris"},
        {
            "role": "assistant",
            "reasoning_content": "I should call the weather tool",
            "content": "let me check",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "paris"}'},
                }
            ],
        },
        {"role": "tool", "name": "weather", "content": "sunny and warm"},
        {"role": "assistant", "reasoning": "the tool said sunny", "content": "it is sunny"},
    ]
}


def _expected(reasoning_loss: bool) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text, concatenated here, and the ranges the assistant writes."""
    text = ""
    written: list[tuple[int, int]] = []

    def add(piece: str, *, assistant: bool = False) -> None:
        nonlocal text
        if assistant:
            written.append((len(text), len(text) + len(piece)))
        text += piece

    def answer(thinking: str | None, content: str) -> None:
        add("<|im_start|>assistant\n")
        if thinking is not None:
            add(f"<think>\n{thinking}\n</think>\n\n", assistant=reasoning_loss)
        add(content, assistant=True)
        add("<|im_end|>", assistant=True)
        add("\n")

    add("<|im_start|>system\nyou are helpful<|im_end|>\n")
    add("<|im_start|>user\nwhat is two and two<|im_end|>\n")
    answer(None, "it is four")  # before the last user turn: shown without its thinking
    add("<|im_start|>user\nand the weather in paris<|im_end|>\n")
    call = '\n<tool_call>\n{"name": "weather", "arguments": {"city": "paris"}}\n</tool_call>'
    answer("I should call the weather tool", "let me check" + call)
    add("<|im_start|>user\n<tool_response>\nsunny and warm\n</tool_response><|im_end|>\n")
    answer("the tool said sunny", "it is sunny")
    return text, written


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    tok = make_tiny_tokenizer(256)
    tok.chat_template = QWEN3_STYLE
    return tok


@pytest.mark.parametrize("reasoning_loss", [True, False])
def test_qwen3_style_mask_matches_an_independent_derivation(tokenizer, reasoning_loss) -> None:  # type: ignore[no-untyped-def]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    renderer = ChatRenderer(tokenizer, eos_ids={eos}, reasoning_loss=reasoning_loss)
    turns = normalize_record(RECORD)
    sample = renderer(turns)

    text, written = _expected(reasoning_loss)
    assert renderer.render_text(turns, add_generation_prompt=False) == text
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert sample.input_ids == list(encoded["input_ids"])
    expected = [
        int(any(lo <= start < hi for lo, hi in written)) for start, _ in encoded["offset_mapping"]
    ]
    assert sample.loss_mask == expected
    # Three answers end with their end-of-turn token, each supervised.
    assert sum(m for t, m in zip(sample.input_ids, sample.loss_mask, strict=True) if t == eos) == 3


def test_thinking_is_supervised_only_when_asked(tokenizer) -> None:  # type: ignore[no-untyped-def]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    turns = normalize_record(RECORD)
    with_thinking = ChatRenderer(tokenizer, eos_ids={eos})(turns)
    without = ChatRenderer(tokenizer, eos_ids={eos}, reasoning_loss=False)(turns)
    assert with_thinking.input_ids == without.input_ids  # the context is the same
    assert without.num_supervised < with_thinking.num_supervised
    assert all(b <= a for a, b in zip(with_thinking.loss_mask, without.loss_mask, strict=True))


def test_inline_thinking_stays_in_the_content_and_can_be_left_out(tokenizer) -> None:  # type: ignore[no-untyped-def]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    record = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "<think>\nsay hello\n</think>\n\nhello"},
        ]
    }
    turns = normalize_record(record)
    assert turns[-1].reasoning is None and turns[-1].content.startswith("<think>")
    sample = ChatRenderer(tokenizer, eos_ids={eos}, reasoning_loss=False)(turns)
    text = tokenizer.decode(
        [t for t, m in zip(sample.input_ids, sample.loss_mask, strict=True) if m]
    )
    assert text.replace(" ", "").startswith("hello") and "think" not in text


def test_tool_calls_and_roles_normalize() -> None:
    turns = normalize_record(RECORD)
    assert [t.role for t in turns] == [
        "system", "user", "assistant", "user", "assistant", "tool", "assistant",
    ]  # fmt: skip
    call = json.loads(turns[4].tool_calls or "[]")
    assert call[0]["function"]["arguments"] == {"city": "paris"}  # JSON text became an object
    assert turns[5].name == "weather" and turns[6].reasoning == "the tool said sunny"
    message = turns[4].to_message()
    assert message["reasoning_content"] == "I should call the weather tool"
    assert message["tool_calls"][0]["function"]["name"] == "weather"


def test_a_template_that_rewrites_and_ends_no_turn_is_refused(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Without an end-of-turn token an earlier, rewritten answer has no visible end."""
    renderer = ChatRenderer(tokenizer, eos_ids={10**6})  # an id no token has
    with pytest.raises(ChatTemplateError, match="ends no answer with an end-of-turn token"):
        renderer(normalize_record(RECORD))


def test_cli_prepares_reasoning_chats(tmp_path: Path, tiny_verifier: Path) -> None:
    """``data prepare --no-reasoning-loss`` on a verifier with the Qwen3-style template."""
    import shutil

    from _support import run_cli

    verifier = tmp_path / "verifier"
    shutil.copytree(tiny_verifier, verifier)
    config_path = verifier / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = QWEN3_STYLE
    config_path.write_text(json.dumps(config))
    for name in ("chat_template.jinja", "chat_template.json"):
        (verifier / name).unlink(missing_ok=True)
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps(RECORD) + "\n")
    counts = {}
    for flag in ("--reasoning-loss", "--no-reasoning-loss"):
        out = tmp_path / flag.strip("-")
        proc = run_cli(["data", "prepare", "--verifier", str(verifier), "--data", str(data),
                        "--output", str(out), flag])  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        counts[flag] = json.loads((out / "manifest.json").read_text())["num_supervised_tokens"]
    assert 0 < counts["--no-reasoning-loss"] < counts["--reasoning-loss"]
