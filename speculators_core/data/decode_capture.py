"""Regenerate answers and capture their hidden states in one pass (transformers, greedy).

``data regenerate`` followed by ``data hidden-states`` runs the verifier twice over every answer
token: once to write it (decoding), once to read its states (a prefill). Decoding already
computes those states, so this module records them as it decodes: the prompt's states come
from the prefill, each answer token's from the decoding step that reads it. On a 2-core CPU
this halves the cost of regenerated training data, and needs no vLLM engine start.

What is written is exactly what the two-pass route writes, with one difference in the sample
text: a sample is ``prompt + answer`` as token ids, never re-tokenized. The loss mask is 1 on
the answer tokens, including the end-of-turn token when the verifier wrote one; an answer cut
at ``max_new_tokens`` ends there (the two-pass route appends the template's end-of-turn text,
which the verifier did not write). Every token of a sample is fed to the verifier, the last one
included, so every position has its states.

Samples are stored in order of prompt length (stable; the training split is random anyway), so
that the conversations decoded together as one batch have prompts of similar length. Only the
first user turn of each conversation is answered (the quickstart's data); decoding is
greedy. Batches are left-padded with an attention mask and positions counted per row, so each
row's states equal an unbatched run up to floating-point reassociation. The key/value cache
grows in place in preallocated buffers (transformers' ``DynamicCache`` concatenates on every
step, which cost a third of a decoding step at batch 128), and rows that finish are dropped
from the batch once a quarter of it has finished.

**Resuming.** The store is written shard by shard through
:class:`~speculators_core.data.store.ShardStoreWriter`; rerunning the same call skips finished
shards. The prepared-data folder (token ids, masks and the regenerated conversations) is
written from the finished shards at the end, then the store is finished.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from speculators_core.data.capture import StateRecorder, decoder_parts
from speculators_core.data.chat import ChatRenderer
from speculators_core.data.conversations import (
    Conversation,
    ShuffledConversations,
    SkipCounter,
    SkipRecord,
    Turn,
    describe_source,
    first_turns,
)
from speculators_core.data.errors import DataSourceError, StoreError
from speculators_core.data.locking import exclusive_lock
from speculators_core.data.prepared import PreparedManifest, verifier_vocab_size, write_prepared
from speculators_core.data.regenerate import PROMPT_TOO_LONG
from speculators_core.data.summary import DataSummary
from speculators_core.features import HiddenStateSpec

__all__ = ["DecodedSample", "decode_with_states", "growing_cache", "regenerate_to_store"]

#: Rows that finished are dropped from the batch once this fraction of it has finished.
COMPACT_FRACTION = 0.25


class _GrowingLayer:
    """One layer's keys/values in a buffer that grows by doubling; ``update`` returns views."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[-2]
        if self._k is None or self._v is None or self.length + n > self._k.shape[-2]:
            capacity = max(2 * (self.length + n), 64)
            new_k = k.new_empty(*k.shape[:-2], capacity, k.shape[-1])
            new_v = v.new_empty(*v.shape[:-2], capacity, v.shape[-1])
            if self._k is not None and self._v is not None and self.length:
                new_k[..., : self.length, :] = self._k[..., : self.length, :]
                new_v[..., : self.length, :] = self._v[..., : self.length, :]
            self._k, self._v = new_k, new_v
        self._k[..., self.length : self.length + n, :] = k
        self._v[..., self.length : self.length + n, :] = v
        self.length += n
        self.keys = self._k[..., : self.length, :]
        self.values = self._v[..., : self.length, :]
        return self.keys, self.values

    def select(self, rows: torch.Tensor) -> None:
        if self._k is not None and self._v is not None:
            self._k, self._v = self._k[rows], self._v[rows]
            self.keys = self._k[..., : self.length, :]
            self.values = self._v[..., : self.length, :]


def _make_cache_class() -> type:
    """A transformers ``Cache`` over :class:`_GrowingLayer` (built lazily: transformers is heavy)."""
    from transformers.cache_utils import Cache, DynamicLayer

    class _Layer(DynamicLayer):
        def __init__(self) -> None:
            super().__init__()
            self._grow = _GrowingLayer()

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self.values = self._grow.update(key_states, value_states)
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._grow.select(indices)
            self.keys, self.values = self._grow.keys, self._grow.values

    class _GrowingCache(Cache):
        def __init__(self, num_layers: int) -> None:
            super().__init__(layers=[_Layer() for _ in range(num_layers)])

    return _GrowingCache


_CACHE_CLASS: type | None = None


def growing_cache(num_layers: int) -> Any:
    """A key/value cache for ``num_layers`` layers that grows in place (see the module docs)."""
    global _CACHE_CLASS
    if _CACHE_CLASS is None:
        _CACHE_CLASS = _make_cache_class()
    return _CACHE_CLASS(num_layers)


DECODE_ATTENTION = "speculators_grouped_decode"


def _grouped_decode_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of one new token per row against the cache, keys/values never repeated.

    transformers' SDPA path copies every cached key and value once per query head group
    (``repeat_kv``) and then runs a masked kernel: with left padding at batch 48 and 300 cached
    tokens that was 70% of a decoding step on a CPU. Here the query heads of a group share
    their key/value head through a reshape. Prompts (more than one query) go to SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    q = query.reshape(batch, kv_heads, groups, dim)  # heads h = kv * groups + g, as repeat_kv
    scores = torch.matmul(q, key.transpose(-1, -2))  # [B, kv, groups, L]
    scores = scores * (scaling if scaling is not None else dim**-0.5)
    if attention_mask is not None:  # [B, 1, 1, L]: bool (True = attend) or additive float
        mask = attention_mask[..., -key.shape[2] :]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value)  # [B, kv, groups, dim]
    return out.reshape(batch, 1, heads, dim), None


def _use_grouped_decode_attention(model: nn.Module) -> None:
    """Register and select :func:`_grouped_decode_attention` for ``model`` (masks as SDPA's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(DECODE_ATTENTION, _grouped_decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)
    model.set_attn_implementation(DECODE_ATTENTION)  # type: ignore[operator]


@dataclass
class DecodedSample:
    """One prompt's answer and the states of ``prompt + answer``, ``[len, n, H]``."""

    answer: list[int]
    states: torch.Tensor
    #: Whether the answer ends with an end-of-turn token the verifier wrote.
    finished: bool


@torch.inference_mode()
def decode_with_states(
    model: nn.Module,
    recorder: StateRecorder,
    prompts: Sequence[Sequence[int]],
    *,
    limits: Sequence[int],
    eos_ids: set[int] | frozenset[int],
    pad_id: int,
    state_dtype: torch.dtype = torch.bfloat16,
) -> list[DecodedSample]:
    """Greedy answers to ``prompts`` (one batch) with the states of every token of each sample.

    ``limits[i]`` is the most answer tokens prompt ``i`` gets. ``recorder`` must be attached to
    ``model``; states are kept in ``state_dtype`` on the CPU.
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    count = len(prompts)
    longest = max(len(p) for p in prompts)
    ids = torch.full((count, longest), pad_id, dtype=torch.long)
    attention = torch.zeros(count, longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        attention[row, longest - len(prompt) :] = 1
    ids, attention = ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    cache = growing_cache(len(decoder_parts(model)[1]))
    out = model(
        input_ids=ids,
        attention_mask=attention,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    states = recorder.take().to("cpu", state_dtype)  # [B, longest, n, H]
    pieces: list[list[torch.Tensor]] = [
        [states[row, longest - len(prompts[row]) :]] for row in range(count)
    ]
    answers: list[list[int]] = [[] for _ in range(count)]
    finished = [False] * count
    live = list(range(count))  # sample index of each batch row
    done_rows: set[int] = set()  # batch rows whose sample is complete but not yet dropped
    next_tokens = out.logits[:, -1].argmax(-1)
    lengths = attention.sum(-1)
    while len(done_rows) < len(live):
        tokens = next_tokens.tolist()
        for row, sample in enumerate(live):
            if row in done_rows:
                continue
            answers[sample].append(int(tokens[row]))
            if tokens[row] in eos_ids:
                finished[sample] = True
        # Feed the new tokens (every row keeps the same shape; finished rows are ignored).
        attention = torch.cat([attention, attention.new_ones(len(live), 1)], dim=1)
        lengths = lengths + 1
        out = model(
            input_ids=next_tokens[:, None],
            attention_mask=attention,
            position_ids=(lengths - 1)[:, None],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        step_states = recorder.take().to("cpu", state_dtype)  # [B, 1, n, H]
        for row, sample in enumerate(live):
            if row in done_rows:
                continue
            pieces[sample].append(step_states[row])
            if finished[sample] or len(answers[sample]) >= limits[sample]:
                done_rows.add(row)
        next_tokens = out.logits[:, -1].argmax(-1)
        if (
            done_rows
            and len(done_rows) >= COMPACT_FRACTION * len(live)
            and len(done_rows) < len(live)
        ):
            keep = [row for row in range(len(live)) if row not in done_rows]
            index = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(index)
            attention, lengths, next_tokens = attention[index], lengths[index], next_tokens[index]
            live = [live[row] for row in keep]
            done_rows = set()
    return [
        DecodedSample(answers[i], torch.cat(pieces[i], dim=0), finished[i]) for i in range(count)
    ]


def _first_prompts(
    conversations: Sequence[Conversation], renderer: ChatRenderer, skipped: SkipCounter
) -> list[tuple[list[Turn], list[int]]]:
    """``(turns before the first answer, prompt ids)`` per usable conversation, in order."""
    kept: list[tuple[list[Turn], list[int]]] = []
    limit = renderer.seq_length
    for conv in conversations:
        turns = list(first_turns(conv, 1))
        if not turns or turns[-1].role != "assistant":
            skipped.add("no assistant turn")
            continue
        context = turns[:-1]
        try:
            text = renderer.render_text(context, add_generation_prompt=True)
        except SkipRecord as skip:
            skipped.add(skip.reason)
            continue
        ids = list(renderer.tokenizer(text, add_special_tokens=False)["input_ids"])
        if limit is not None and len(ids) >= limit:
            skipped.add(PROMPT_TOO_LONG)
            continue
        kept.append((context, ids))
    return kept


def _shard_tokens(work: Path, num_shards: int) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, loss_mask)`` of every sample in the finished shards of ``work``, in order."""
    from safetensors import safe_open

    from speculators_core.data.store import shard_name

    pairs: list[tuple[list[int], list[int]]] = []
    for index in range(num_shards):
        with safe_open(str(work / shard_name(index)), framework="pt") as handle:
            ids = handle.get_tensor("input_ids").long()
            mask = handle.get_tensor("loss_mask").long()
            offsets = handle.get_tensor("offsets").tolist()
        for lo, hi in itertools.pairwise(offsets):
            pairs.append((ids[lo:hi].tolist(), mask[lo:hi].tolist()))
    return pairs


def regenerate_to_store(
    *,
    verifier: str | os.PathLike[str],
    sources: Sequence[str | os.PathLike[str]],
    prepared_output: str | os.PathLike[str],
    store_output: str | os.PathLike[str],
    spec: HiddenStateSpec,
    max_new_tokens: int = 256,
    seq_length: int = 2048,
    max_samples: int | None = None,
    split: str = "train",
    seed: int | None = 0,
    batch_size: int = 64,
    store_dtype: torch.dtype = torch.bfloat16,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> tuple[DataSummary, DataSummary]:
    """Answer the first user turn of each conversation greedily and store the states (one pass).

    Writes a prepared-data folder at ``prepared_output`` and a hidden-state store at
    ``store_output`` (both as ``data regenerate`` + ``data hidden-states`` would, see the module
    docs) and returns their summaries. Resumable per shard of ``batch_size`` samples.
    """
    from tqdm.auto import tqdm

    from speculators_core.data.fingerprint import tokenizer_fingerprint, verifier_fingerprint
    from speculators_core.data.store import _DTYPE_NAMES, ShardStoreWriter
    from speculators_core.data.store import layer_semantics as semantics_of
    from speculators_core.data.verifier import (
        load_verifier_model,
        read_verifier_config,
        verifier_folder,
    )

    started = time.perf_counter()
    if max_new_tokens < 1 or seq_length < 2 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1 and seq_length >= 2")
    if store_dtype not in _DTYPE_NAMES:
        raise StoreError(f"unsupported store dtype {store_dtype}")
    prepared_path, store_path = Path(prepared_output), Path(store_output)
    for path in (prepared_path, store_path):
        if path.exists() and not overwrite:
            raise DataSourceError(
                f"output '{path}' already exists; choose another output or pass --overwrite"
            )
    folder = verifier_folder(verifier)
    config = read_verifier_config(folder)
    num_layers = int(config.get("num_hidden_layers", 0))
    try:
        spec.validate(num_layers)
    except ValueError as err:
        raise StoreError(f"{err}; pick layer ids for verifier '{folder}'") from None
    renderer = ChatRenderer.from_verifier(folder, seq_length=seq_length)
    skipped = SkipCounter()
    conversations = ShuffledConversations(sources, split=split, seed=seed, skipped=skipped)
    prompts: list[tuple[list[Turn], list[int]]] = []
    # Render prompts until enough are kept (rendering is cheap; a long source is not rendered whole).
    step = max(64, max_samples or 0)
    for start in range(0, len(conversations), step):
        prompts += _first_prompts(conversations[start : start + step], renderer, skipped)
        if max_samples is not None and len(prompts) >= max_samples:
            prompts = prompts[:max_samples]
            break
    if not prompts:
        raise DataSourceError(
            f"no usable conversation in {', '.join(map(str, sources))} ({skipped.describe()})"
        )
    # Shards are decoded as batches: prompts of similar length together waste little padding
    # (a batch is as long as its longest prompt). Stable, so the order is deterministic.
    prompts.sort(key=lambda item: len(item[1]))
    fingerprint = verifier_fingerprint(folder)
    source_names = [describe_source(s) for s in sources]
    generation = {
        "backend": "transformers-decode-capture",
        "max_new_tokens": max_new_tokens,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": seed,
    }
    writer = ShardStoreWriter(
        store_path,
        run_settings={
            "verifier_path": str(folder.resolve()),
            "verifier_fingerprint": fingerprint,
            "spec": spec.to_json(),
            "dtype": _DTYPE_NAMES[store_dtype],
            "compute_dtype": "float32",
            "sources": source_names,
            "split": split,
            "seed": seed,
            "seq_length": seq_length,
            "generation": generation,
        },
        shard_size=batch_size,
        num_samples=len(prompts),
        overwrite=overwrite,
    )
    writer.work.mkdir(parents=True, exist_ok=True)
    eos_ids = frozenset(renderer.eos_ids)
    with exclusive_lock(writer.work / ".lock", f"'{store_path}'"):
        writer.start()
        done = writer.done_shards()
        todo = [i for i in range(writer.num_shards) if i not in done]
        if todo:
            model = load_verifier_model(folder, dtype=torch.float32, device=device)
            _use_grouped_decode_attention(model)
            pad = getattr(model.config, "pad_token_id", None)
            pad_id = int(pad) if isinstance(pad, int) else min(eos_ids)
            bar = tqdm(
                total=len(prompts),
                initial=len(prompts) - sum(len(writer.shard_range(i)) for i in todo),
                desc="regenerating + capturing",
                unit="conv",
                disable=not progress,
            )
            with StateRecorder(model, spec) as recorder:
                for index in todo:
                    rows = list(writer.shard_range(index))
                    batch = [prompts[i][1] for i in rows]
                    limits = [min(max_new_tokens, seq_length - len(p)) for p in batch]
                    decoded = decode_with_states(
                        model,
                        recorder,
                        batch,
                        limits=limits,
                        eos_ids=eos_ids,
                        pad_id=pad_id,
                        state_dtype=store_dtype,
                    )
                    samples = []
                    for prompt, result in zip(batch, decoded, strict=True):
                        ids = torch.tensor(prompt + result.answer, dtype=torch.long)
                        mask = torch.zeros(len(ids), dtype=torch.uint8)
                        mask[len(prompt) :] = 1
                        samples.append(
                            {"input_ids": ids, "loss_mask": mask, "hidden_states": result.states}
                        )
                    writer.write_shard(index, samples, dtype=store_dtype)
                    bar.update(len(rows))
            bar.close()
        # The prepared folder, from the finished shards (also what a resumed run finishes with).
        pairs = _shard_tokens(writer.work, writer.num_shards)
        convs: list[Conversation] = []
        for (sample_ids, _mask), (context, prompt) in zip(pairs, prompts, strict=True):
            answer = renderer.tokenizer.decode(sample_ids[len(prompt) :], skip_special_tokens=True)
            convs.append([*context, Turn("assistant", answer)])
        manifest = PreparedManifest(
            verifier_path=str(folder.resolve()),
            tokenizer_fingerprint=tokenizer_fingerprint(folder),
            vocab_size=verifier_vocab_size(folder, renderer.tokenizer),
            sources=source_names,
            split=split,
            seed=seed,
            seq_length=seq_length,
            skipped=skipped.to_json(),
            regenerated=generation,
        )
        write_prepared(prepared_path, pairs, manifest, overwrite=overwrite, conversations=convs)
        store_manifest = writer.finish(
            {
                "verifier_path": str(folder.resolve()),
                "verifier_fingerprint": fingerprint,
                "verifier_num_layers": num_layers,
                "hidden_size": int(config.get("hidden_size", 0)),
                "vocab_size": int(manifest.vocab_size),
                "layer_ids": list(spec.layer_ids),
                "post_norm_last": spec.post_norm_last,
                "layer_semantics": semantics_of(spec, num_layers),
                "dtype_name": _DTYPE_NAMES[store_dtype],
                "compute_dtype": "float32",
                "backend": "transformers-decode-capture",
                "source": {
                    "prepared_path": str(prepared_path.resolve()),
                    "sources": source_names,
                    "split": split,
                    "seed": seed,
                    "seq_length": seq_length,
                    "tokenizer_fingerprint": manifest.tokenizer_fingerprint,
                    "regenerated": generation,
                },
            }
        )
    seconds = time.perf_counter() - started
    data_summary = DataSummary.of_folder(
        "regenerated", prepared_path, manifest, seconds=seconds, skipped=skipped.to_json()
    )
    store_summary = DataSummary.of_folder(
        "captured",
        store_path,
        store_manifest,
        seconds=seconds,
        notes=[f"resumed with {len(done)} of {writer.num_shards} shards done"] if done else [],
    )
    return data_summary, store_summary
