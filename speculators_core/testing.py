"""Helpers for tests of the core and of plugins: tiny random verifiers with real tokenizers.

``make_tiny_verifier(folder)`` writes a complete transformers model folder (a random Llama or
Qwen3 of a few layers, a byte-level BPE tokenizer trained on a few KB of text, and a chat
template), in well under a second. Plugins use it in their own tests; nothing here is imported
by the core at run time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHATML_TEMPLATE", "TINY_CORPUS", "make_tiny_tokenizer", "make_tiny_verifier"]

#: A ChatML template (the family SmolLM2 and Qwen use), with a default system prompt omitted.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: A few KB of varied English to train the tiny tokenizer on.
TINY_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Speculative decoding lets a small draft propose tokens that a large model verifies.",
    "Every accepted token is exactly what the verifier would have produced on its own.",
    "How do I sort a list in Python? Use sorted(items) or items.sort() for in-place sorting.",
    "Write a short poem about the sea: waves roll in, the tide goes out, gulls cry above.",
    "What is two plus two? Two plus two is four. What is three times three? Nine.",
    "Explain photosynthesis: plants turn light, water and carbon dioxide into sugar and oxygen.",
    "User: hello there! Assistant: Hello! How can I help you today?",
    "A function returns a value; a loop repeats; a variable names a value for later use.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
] * 8


def make_tiny_tokenizer(vocab_size: int = 256) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def make_tiny_verifier(
    folder: str | os.PathLike[str],
    *,
    model_type: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 256,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    chat_template: str | None = CHATML_TEMPLATE,
) -> Path:
    """Write a tiny random causal LM with a real tokenizer to ``folder``; return the folder.

    ``model_type`` is ``llama`` or ``qwen3``. The tokenizer is trained to ``vocab_size`` tokens
    (the model's vocab is exactly the tokenizer's size). ``chat_template=None`` writes a
    tokenizer without a template (to test that error path).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(vocab_size)
    if chat_template is None:
        tokenizer.chat_template = None
    config = AutoConfig.for_model(
        model_type,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        intermediate_size=intermediate_size,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM" if model_type == "llama" else "Qwen3ForCausalLM"],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Larger-than-default weights so hidden states and logits are far from uniform.
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
