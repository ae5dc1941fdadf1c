"""Loss masks from prefix rendering, checked against a segment-by-segment derivation.

The derivation in these tests does not render prefixes: it knows each template's layout and
builds the expected token ids and mask by tokenizing the pieces of every message one after
another (header: 0, assistant content and its end-of-turn token: 1, separators: 0). The
contents are chosen so that no BPE merge crosses a piece boundary, which makes that
concatenation equal to tokenizing the whole text; the tests assert the ids too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from datatest_support import CHATS

from speculators_core.data.chat import ChatRenderer
from speculators_core.data.conversations import SkipCounter, Turn, normalize_record
from speculators_core.data.errors import ChatTemplateError
from speculators_core.data.prepared import NO_SUPERVISED, render_conversations
from speculators_core.data.verifier import load_tokenizer
from speculators_core.testing import TINY_CORPUS, make_tiny_tokenizer, make_tiny_verifier

WITH_SYSTEM = normalize_record(CHATS[0])  # system + two exchanges
WITHOUT_SYSTEM = normalize_record(CHATS[1])  # two exchanges, no system prompt


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chatml_expected(tokenizer, turns, default_system: str | None = None):
    """ChatML: ``<|im_start|>role\\n`` content ``<|im_end|>`` ``\\n``; supervise content + im_end."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    messages = list(turns)
    if default_system is not None and messages[0].role != "system":
        messages = [Turn("system", default_system), *messages]
    ids: list[int] = []
    mask: list[int] = []
    for turn in messages:
        supervised = 1 if turn.role == "assistant" else 0
        for piece, m in (
            (_encode(tokenizer, f"<|im_start|>{turn.role}\n"), 0),
            (_encode(tokenizer, turn.content), supervised),
            ([im_end], supervised),
            (_encode(tokenizer, "\n"), 0),
        ):
            ids += piece
            mask += [m] * len(piece)
    return ids, mask


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def llama3_tokenizer():
    """A tiny byte-level BPE with Llama-3-style special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        TINY_CORPUS,
        trainer=trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )
    fast.chat_template = LLAMA3_TEMPLATE
    return fast


def llama3_expected(tokenizer, turns):
    """Llama-3 layout: bos, then per message header ids, ``\\n\\n``, content, ``<|eot_id|>``."""
    conv = tokenizer.convert_tokens_to_ids
    ids = [conv("<|begin_of_text|>")]
    mask = [0]
    for turn in turns:
        supervised = 1 if turn.role == "assistant" else 0
        for piece, m in (
            ([conv("<|start_header_id|>")], 0),
            (_encode(tokenizer, turn.role), 0),
            ([conv("<|end_header_id|>")], 0),
            (_encode(tokenizer, "\n\n"), 0),
            (_encode(tokenizer, turn.content), supervised),
            ([conv("<|eot_id|>")], supervised),
        ):
            ids += piece
            mask += [m] * len(piece)
    return ids, mask


@pytest.mark.parametrize("turns", [WITH_SYSTEM, WITHOUT_SYSTEM], ids=["system", "no-system"])
def test_tiny_chatml_masks_match_derivation(turns):
    """Tiny tokenizer, ChatML template: ids and mask equal the segment derivation."""
    tokenizer = make_tiny_tokenizer()
    renderer = ChatRenderer(tokenizer, eos_ids={tokenizer.eos_token_id})
    sample = renderer(turns)
    expected_ids, expected_mask = chatml_expected(tokenizer, turns)
    assert sample.input_ids == expected_ids
    assert sample.loss_mask == expected_mask
    assert sample.num_supervised > 0


@pytest.mark.parametrize("turns", [WITH_SYSTEM, WITHOUT_SYSTEM], ids=["system", "no-system"])
def test_tiny_llama3_template_masks_match_derivation(turns):
    """A different template (Llama-3 headers, no newline after the end-of-turn token)."""
    tokenizer = llama3_tokenizer()
    renderer = ChatRenderer(tokenizer, eos_ids={tokenizer.convert_tokens_to_ids("<|eot_id|>")})
    sample = renderer(turns)
    expected_ids, expected_mask = llama3_expected(tokenizer, turns)
    assert sample.input_ids == expected_ids
    assert sample.loss_mask == expected_mask


@pytest.mark.slow
@pytest.mark.parametrize("turns", [WITH_SYSTEM, WITHOUT_SYSTEM], ids=["system", "no-system"])
def test_smollm2_masks_match_derivation(smollm2: Path, turns):
    """The real SmolLM2 template (which adds its own system prompt when none is given)."""
    renderer = ChatRenderer.from_verifier(smollm2)
    sample = renderer(turns)
    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    expected_ids, expected_mask = chatml_expected(renderer.tokenizer, turns, default_system)
    assert sample.input_ids == expected_ids
    assert sample.loss_mask == expected_mask
    # The supervised text is exactly the answers, each followed by its end-of-turn token.
    supervised = [t for t, m in zip(sample.input_ids, sample.loss_mask, strict=True) if m]
    answers = "".join(t.content + "<|im_end|>" for t in turns if t.role == "assistant")
    assert renderer.tokenizer.decode(supervised) == answers


def test_truncation_keeps_the_first_tokens():
    """A long sample keeps its first seq_length ids and mask; full_length records the rest."""
    tokenizer = make_tiny_tokenizer()
    full = ChatRenderer(tokenizer, eos_ids={tokenizer.eos_token_id})(WITH_SYSTEM)
    cut = ChatRenderer(tokenizer, eos_ids={tokenizer.eos_token_id}, seq_length=20)(WITH_SYSTEM)
    assert cut.input_ids == full.input_ids[:20]
    assert cut.loss_mask == full.loss_mask[:20]
    assert cut.truncated and cut.full_length == len(full.input_ids)


def test_samples_without_supervised_tokens_are_dropped_and_counted():
    """Truncated before the first answer: dropped and counted, not written."""
    tokenizer = make_tiny_tokenizer()
    renderer = ChatRenderer(tokenizer, eos_ids={tokenizer.eos_token_id}, seq_length=6)
    skipped = SkipCounter()
    kept, _ = render_conversations(renderer, [WITH_SYSTEM, WITHOUT_SYSTEM], skipped=skipped)
    assert kept == []
    assert skipped.to_json() == {NO_SUPERVISED: 2}


def test_prefix_unstable_template_is_refused():
    """A template that renders the last message differently cannot give prefix masks."""
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    renderer = ChatRenderer(tokenizer, eos_ids={tokenizer.eos_token_id}, name="weird")
    with pytest.raises(ChatTemplateError, match="rewrites earlier turns"):
        renderer(WITHOUT_SYSTEM)


def test_model_folder_without_chat_template(tmp_path: Path):
    """A verifier folder whose tokenizer has no template: one line saying so."""
    folder = make_tiny_verifier(tmp_path / "plain", chat_template=None)
    with pytest.raises(ChatTemplateError) as info:
        load_tokenizer(folder)
    assert "has no chat template" in str(info.value) and str(folder) in str(info.value)
    assert "\n" not in str(info.value)
