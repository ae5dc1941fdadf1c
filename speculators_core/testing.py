"""Helpers for tests of the core and of plugins: tiny random verifiers with real tokenizers.

``make_tiny_verifier(folder)`` writes a complete transformers model folder (a random Llama or
Qwen3 of a few layers, a byte-level BPE tokenizer trained on a few KB of text, and a chat
template), in well under a second. Plugins use it in their own tests; nothing here is imported
by the core at run time.

Algorithm plugins train drafts in their tests with :func:`train_on_samples` and read held-out
metrics with :func:`evaluation_metrics`; they share their test fixtures through :func:`tiny_verifier_fixtures` and
:func:`one_torch_thread_fixture` (a plugin's ``conftest.py`` assigns what they return; pytest is
imported only then).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHATML_TEMPLATE",
    "TINY_CORPUS",
    "VERIFIER_FAMILIES",
    "VISION_LANGUAGE_FAMILIES",
    "chi_square_p_value",
    "evaluation_metrics",
    "make_tiny_tokenizer",
    "make_tiny_verifier",
    "one_torch_thread_fixture",
    "packed_documents",
    "tiny_verifier_fixtures",
    "train_on_samples",
]

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


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit of ``counts`` to ``probs`` (same length): the
    p-value, with the cells expecting fewer than 5 observations pooled into one.

    For losslessness tests of sampled decoding (no scipy needed: the upper regularized incomplete
    gamma function is the chi-square survival function).
    """
    expected = probs.double() * counts.sum()
    observed = counts.double()
    big = expected >= 5
    observed = torch.cat([observed[big], observed[~big].sum().reshape(1)])
    expected = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof = int(observed.numel()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(statistic / 2.0)))


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


#: Tiny-model settings of each verifier family :func:`make_tiny_verifier` builds beyond the
#: shared sizes: its architecture class and the fields the family needs (experts, sliding
#: windows, attention biases are on by default in Qwen2).
VERIFIER_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"architectures": ["LlamaForCausalLM"]},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"]},
    "mistral": {"architectures": ["MistralForCausalLM"], "sliding_window": None},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"]},
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 1,
    },
    "gemma2": {
        "architectures": ["Gemma2ForCausalLM"],
        "tie_word_embeddings": True,  # as the real ones (vLLM's Gemma has no separate head)
        "query_pre_attn_scalar": 16,
        "sliding_window": 8,
    },
    "gemma3_text": {
        "architectures": ["Gemma3ForCausalLM"],
        "tie_word_embeddings": True,  # as the real ones (vLLM's Gemma has no separate head)
        "query_pre_attn_scalar": 16,
        "sliding_window": 8,
    },
    "gpt_oss": {
        "architectures": ["GptOssForCausalLM"],
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": 8,
    },
}

#: Vision-language verifiers: the text model's fields go into ``text_config`` (with the family's
#: multimodal RoPE sections), beside a one-block vision tower.
VISION_LANGUAGE_FAMILIES: dict[str, dict[str, Any]] = {
    "qwen2_5_vl": {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "text": {"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
        "vision_config": {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2},
    },
    "qwen3_vl": {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "text": {
            "rope_scaling": {
                "rope_type": "default",
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            }
        },
        "vision_config": {
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "deepstack_visual_indexes": [],
        },
    },
}


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

    ``model_type`` is a key of :data:`VERIFIER_FAMILIES`. The tokenizer is trained to ``vocab_size`` tokens
    (the model's vocab is exactly the tokenizer's size). ``chat_template=None`` writes a
    tokenizer without a template (to test that error path).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    families = [*VERIFIER_FAMILIES, *VISION_LANGUAGE_FAMILIES]
    if model_type not in families:
        raise ValueError(f"model_type '{model_type}' is not one of {', '.join(families)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(vocab_size)
    if chat_template is None:
        tokenizer.chat_template = None
    text: dict[str, Any] = dict(
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
    )
    torch.manual_seed(seed)
    if model_type in VISION_LANGUAGE_FAMILIES:
        family = VISION_LANGUAGE_FAMILIES[model_type]
        config = AutoConfig.for_model(
            model_type,
            text_config={**text, **family["text"]},
            vision_config={**family["vision_config"], "out_hidden_size": hidden_size},
            architectures=family["architectures"],
            tie_word_embeddings=tie_word_embeddings,
        )
        model = AutoModelForImageTextToText.from_config(config)
    else:
        config = AutoConfig.for_model(model_type, **{**text, **VERIFIER_FAMILIES[model_type]})
        model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Larger-than-default weights so hidden states and logits are far from uniform.
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------
# Training a draft in a test
# ------------------------------------------------------------------------------------------------


def packed_documents(document_ids: torch.Tensor) -> Iterator[tuple[int, int, int]]:
    """``(row, start, length)`` of every document of a packed batch (``document_ids`` ``[B, T]``,
    -1 on padding, each document one contiguous run), row by row, in document-id order."""
    for row in range(document_ids.shape[0]):
        docs = document_ids[row]
        for doc in range(int(docs.max()) + 1):
            where = (docs == doc).nonzero()[:, 0]
            yield row, int(where[0]), int(where.shape[0])


def evaluation_metrics(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """``model.training_step(batch)``'s metrics in eval mode without gradients (then train mode),
    with those the core's trainer derives (``est_accept_len``) added."""
    from speculators_core.train.metrics import derive_metrics

    model.eval()
    with torch.no_grad():
        metrics = derive_metrics(model.training_step(batch)).metrics
    model.train()
    return {key: float(value.item()) for key, value in metrics.items()}


def train_on_samples(
    model: Any,
    samples: list[dict[str, torch.Tensor]],
    collate: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    betas: tuple[float, float] = (0.9, 0.999),
    max_grad_norm: float | None = None,
) -> None:
    """A plain AdamW loop: each epoch visits ``samples`` in a random order (from ``generator``),
    ``batch_size`` at a time, collated into one packed batch by ``collate``, one step each
    (gradient norm clipped to ``max_grad_norm`` when given)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas)
    for _epoch in range(epochs):
        order = torch.randperm(len(samples), generator=generator).tolist()
        for start in range(0, len(samples), batch_size):
            out = model.training_step(
                collate([samples[i] for i in order[start : start + batch_size]])
            )
            optimizer.zero_grad()
            out.loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()


# ------------------------------------------------------------------------------------------------
# Shared pytest fixtures of algorithm plugins
# ------------------------------------------------------------------------------------------------


def tiny_verifier_fixtures() -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    """Three session fixtures: ``tiny_verifier``, ``tiny_qwen3_verifier``, ``verifier_model``.

    * ``tiny_verifier``: a 4-layer random Llama (hidden 64, vocab 259) with a real tokenizer;
    * ``tiny_qwen3_verifier``: a 4-layer random Qwen3 (hidden 32) with tied embeddings;
    * ``verifier_model``: the tiny Llama loaded with plain transformers, in eval mode.

    Use in a ``conftest.py``: ``tiny_verifier, tiny_qwen3_verifier, verifier_model =
    tiny_verifier_fixtures()`` (each is registered under its own name).
    """
    import pytest

    @pytest.fixture(scope="session", name="tiny_verifier")
    def tiny_verifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
        """A 4-layer random Llama verifier (hidden 64, vocab 259) with a real tokenizer."""
        return make_tiny_verifier(tmp_path_factory.mktemp("verifier") / "llama", num_layers=4)

    @pytest.fixture(scope="session", name="tiny_qwen3_verifier")
    def tiny_qwen3_verifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
        """A 4-layer random Qwen3 verifier (hidden 32) with tied embeddings."""
        return make_tiny_verifier(
            tmp_path_factory.mktemp("verifier") / "qwen3",
            model_type="qwen3",
            num_layers=4,
            hidden_size=32,
            tie_word_embeddings=True,
            seed=3,
        )

    @pytest.fixture(scope="session", name="verifier_model")
    def verifier_model(tiny_verifier: Path) -> Any:
        """The tiny Llama verifier, loaded with plain transformers."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(tiny_verifier).eval()

    return tiny_verifier, tiny_qwen3_verifier, verifier_model


def one_torch_thread_fixture(*, except_slow: bool = False) -> Callable[..., Any]:
    """An autouse fixture that runs each test on one torch thread.

    The tiny models of plugin tests are so small that, with two threads on a shared two-core
    machine, thread hand-off costs more than the matrix products (measured 15x slower under
    load). With ``except_slow`` the tests marked ``slow`` (real SmolLM2) keep every thread.
    """
    import pytest

    @pytest.fixture(autouse=True, name="_one_torch_thread")
    def one_torch_thread(request: pytest.FixtureRequest) -> Iterator[None]:
        if except_slow and request.node.get_closest_marker("slow") is not None:
            yield
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(previous)

    return one_torch_thread
