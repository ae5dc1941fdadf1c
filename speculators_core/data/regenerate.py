"""Response regeneration: replace the assistant turns of chat data with the verifier's own answers.

A draft learns to predict the verifier, so training on the verifier's own answers (rather than
on answers another model wrote) raises acceptance. Each assistant turn is regenerated in order:
turn ``r`` is answered given the conversation up to it, in which the earlier assistant turns are
already the verifier's answers. Prompts longer than ``seq_length`` tokens end the conversation
there (a conversation whose first prompt is already too long is dropped and counted).

Generation is batched (transformers: left-padded ``generate``; vLLM: its own scheduler) and
greedy by default; with ``temperature > 0`` it samples, seeded per chunk so a resumed run
repeats exactly what an uninterrupted one would do.

**Resuming.** Work happens in ``.OUTPUT.partial/``: conversations are processed in chunks of
``chunk_size`` (chunk ``k`` = input conversations ``[k*C, (k+1)*C)``), each written atomically
as ``chunk-00000.jsonl``. Rerunning the same command skips finished chunks. At the end the
conversations are rendered and masked like ``data prepare`` and written as a prepared-data
folder (with ``conversations.jsonl``) under ``OUTPUT``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from speculators_core.data.chat import ChatRenderer
from speculators_core.data.conversations import (
    Conversation,
    ShuffledConversations,
    SkipCounter,
    SkipRecord,
    Turn,
    describe_source,
    first_turns,
    normalize_record,
)
from speculators_core.data.errors import DataSourceError, StoreError
from speculators_core.data.locking import exclusive_lock
from speculators_core.data.prepared import (
    PreparedManifest,
    render_conversations,
    verifier_vocab_size,
    write_prepared,
)
from speculators_core.data.summary import DataSummary
from speculators_core.fsutil import atomic_file

__all__ = [
    "GenerationSettings",
    "Generator",
    "TransformersGenerator",
    "regenerate_conversations",
    "regenerate_data",
]

PROMPT_TOO_LONG = "prompt longer than seq_length"


class GenerationSettings:
    """How answers are generated: ``temperature`` 0 is greedy."""

    def __init__(
        self,
        *,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (recorded in the manifest)."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }


class Generator(Protocol):
    """A batched generation backend."""

    def generate(
        self, prompts: Sequence[list[int]], settings: GenerationSettings, *, seed: int
    ) -> list[list[int]]:
        """New token ids for each prompt, without the end-of-turn token and anything after it."""
        ...


def _cut_at_eos(tokens: list[int], eos_ids: frozenset[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:i]
    return tokens


class TransformersGenerator:
    """Batched ``generate`` with a transformers model (left padding)."""

    def __init__(
        self,
        verifier: str | os.PathLike[str],
        *,
        eos_ids: set[int],
        batch_size: int = 8,
        dtype: torch.dtype | None = None,
        device: str | None = None,
    ) -> None:
        from speculators_core.data.verifier import load_verifier_model

        self.model = load_verifier_model(verifier, dtype=dtype, device=device)
        self.eos_ids = frozenset(eos_ids)
        self.batch_size = batch_size
        config = self.model.config
        pad = getattr(config, "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) else min(self.eos_ids)

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[list[int]], settings: GenerationSettings, *, seed: int
    ) -> list[list[int]]:
        """See :class:`Generator`."""
        device = next(self.model.parameters()).device
        results: list[list[int]] = [[] for _ in prompts]
        # Similar lengths together wastes less padding; the order is deterministic.
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            longest = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
            attention = torch.zeros(len(batch), longest, dtype=torch.long)
            for row, i in enumerate(batch):
                n = len(prompts[i])
                ids[row, longest - n :] = torch.tensor(prompts[i], dtype=torch.long)
                attention[row, longest - n :] = 1
            torch.manual_seed(seed + start)
            sampling = settings.temperature > 0
            out = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=settings.max_new_tokens,
                do_sample=sampling,
                temperature=settings.temperature if sampling else None,
                top_p=settings.top_p if sampling else None,
                top_k=None,
                eos_token_id=sorted(self.eos_ids),
                pad_token_id=self.pad_id,
            )
            for row, i in enumerate(batch):
                results[i] = _cut_at_eos(out[row, longest:].tolist(), self.eos_ids)
        return results


def regenerate_conversations(
    conversations: Sequence[Conversation],
    *,
    renderer: ChatRenderer,
    generator: Generator,
    settings: GenerationSettings,
    seed: int,
    skipped: SkipCounter | None = None,
) -> list[Conversation | None]:
    """The conversations with every assistant turn replaced by the verifier's answer.

    A conversation whose first prompt exceeds ``renderer.seq_length`` becomes None (counted in
    ``skipped``); one whose later prompt does is cut before that turn.
    """
    work: list[list[Turn]] = [list(c) for c in conversations]
    ends: list[int] = [len(c) for c in work]  # turns kept so far (cut on long prompts)
    dropped: set[int] = set()
    positions = [[j for j, t in enumerate(c) if t.role == "assistant"] for c in work]
    rounds = max((len(p) for p in positions), default=0)
    limit = renderer.seq_length
    for r in range(rounds):
        jobs: list[tuple[int, int]] = []
        prompts: list[list[int]] = []
        for c, pos in enumerate(positions):
            if c in dropped or r >= len(pos) or pos[r] >= ends[c]:
                continue
            j = pos[r]
            try:
                text = renderer.render_text(work[c][:j], add_generation_prompt=True)
            except SkipRecord as skip:
                if skipped is not None:
                    skipped.add(skip.reason)
                dropped.add(c)
                continue
            ids = renderer.tokenizer(text, add_special_tokens=False)["input_ids"]
            if limit is not None and len(ids) >= limit:
                if r == 0:
                    dropped.add(c)
                    if skipped is not None:
                        skipped.add(PROMPT_TOO_LONG)
                else:
                    ends[c] = j
                continue
            jobs.append((c, j))
            prompts.append(list(ids))
        if not jobs:
            continue
        answers = generator.generate(prompts, settings, seed=seed + r * 1_000_003)
        for (c, j), answer in zip(jobs, answers, strict=True):
            content = renderer.tokenizer.decode(answer, skip_special_tokens=True)
            work[c][j] = Turn("assistant", content)
    out: list[Conversation | None] = []
    for c, turns in enumerate(work):
        if c in dropped:
            out.append(None)
            continue
        kept = turns[: ends[c]]
        while kept and kept[-1].role != "assistant":
            kept.pop()
        out.append(kept or None)
    return out


def _make_generator(
    backend: str,
    verifier: Path,
    eos_ids: set[int],
    batch_size: int,
    device: str | None,
    max_model_len: int | None,
) -> Generator:
    if backend == "transformers":
        return TransformersGenerator(
            verifier, eos_ids=eos_ids, batch_size=batch_size, device=device
        )
    if backend == "vllm":
        from speculators_core.data.vllm_backend import VllmGenerator

        return VllmGenerator(verifier, eos_ids=eos_ids, max_model_len=max_model_len)
    raise DataSourceError(f"unknown generation backend '{backend}'; use 'transformers' or 'vllm'")


def regenerate_data(
    *,
    verifier: str | os.PathLike[str],
    sources: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    settings: GenerationSettings | None = None,
    seq_length: int | None = 2048,
    max_samples: int | None = None,
    split: str = "train",
    seed: int | None = 0,
    batch_size: int = 8,
    chunk_size: int = 64,
    backend: str = "transformers",
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    generator: Generator | None = None,
    max_turns: int | None = None,
) -> DataSummary:
    """Regenerate the assistant turns of chat data and write prepared data (resumable).

    ``max_turns`` keeps each conversation only up to its ``max_turns``-th answer (1: the first
    user turn and the verifier's answer to it, the cheapest data to regenerate). ``generator``
    overrides the backend (tests pass a wrapped one).
    """
    from tqdm.auto import tqdm

    from speculators_core.data.fingerprint import tokenizer_fingerprint, verifier_fingerprint
    from speculators_core.data.verifier import verifier_folder

    start_time = time.perf_counter()
    settings = settings or GenerationSettings()
    out = Path(output)
    if out.exists() and not overwrite:
        raise DataSourceError(
            f"output '{out}' already exists; choose another --output or pass --overwrite"
        )
    folder = verifier_folder(verifier)
    renderer = ChatRenderer.from_verifier(folder, seq_length=seq_length)
    skipped = SkipCounter()
    shuffled = ShuffledConversations(sources, split=split, seed=seed, skipped=skipped)
    conversations = shuffled[:max_samples] if max_samples is not None else list(shuffled)
    if max_turns is not None:
        conversations = [first_turns(c, max_turns) for c in conversations]
    if not conversations:
        raise DataSourceError(
            f"no usable conversation in {', '.join(map(str, sources))} ({skipped.describe()})"
        )
    work = out.parent / f".{out.name}.partial"
    run_settings = {
        "verifier_fingerprint": verifier_fingerprint(folder),
        "sources": [describe_source(s) for s in sources],
        "split": split,
        "seed": seed,
        "seq_length": seq_length,
        "max_samples": max_samples,
        "max_turns": max_turns,
        "chunk_size": chunk_size,
        "batch_size": batch_size,
        "backend": backend,
        "generation": settings.to_json(),
    }
    work.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(work / ".lock", f"'{out}'"):
        run_file = work / "run.json"
        if run_file.is_file():
            if json.loads(run_file.read_text()) != run_settings:
                raise StoreError(
                    f"interrupted regeneration '{work}' used other settings; rerun with the same "
                    "arguments to resume it, or delete that folder to start again"
                )
        else:
            with atomic_file(run_file) as tmp:
                tmp.write_text(json.dumps(run_settings, indent=2, sort_keys=True) + "\n")
        num_chunks = (len(conversations) + chunk_size - 1) // chunk_size
        todo = [k for k in range(num_chunks) if not (work / f"chunk-{k:05d}.jsonl").is_file()]
        if todo:
            gen = generator or _make_generator(
                backend,
                folder,
                set(renderer.eos_ids),
                batch_size,
                device,
                (seq_length + settings.max_new_tokens) if seq_length else None,
            )
            bar = tqdm(
                total=len(conversations),
                initial=(num_chunks - len(todo)) * chunk_size,
                desc="regenerating",
                unit="conv",
                disable=not progress,
            )
            try:
                for k in todo:
                    chunk = conversations[k * chunk_size : (k + 1) * chunk_size]
                    chunk_skips = SkipCounter()
                    new = regenerate_conversations(
                        chunk,
                        renderer=renderer,
                        generator=gen,
                        settings=settings,
                        seed=settings.seed + k * 7919,
                        skipped=chunk_skips,
                    )
                    with (
                        atomic_file(work / f"chunk-{k:05d}.jsonl") as tmp,
                        tmp.open("w", encoding="utf-8") as handle,
                    ):
                        handle.write(json.dumps({"skipped": chunk_skips.to_json()}) + "\n")
                        for conv in new:
                            record = (
                                None
                                if conv is None
                                else {"messages": [t.to_message() for t in conv]}
                            )
                            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    bar.update(len(chunk))
            finally:
                if generator is None and hasattr(gen, "close"):
                    gen.close()  # stop a vLLM engine now, not when it is collected
            bar.close()
        regenerated: list[Conversation] = []
        for k in range(num_chunks):
            with (work / f"chunk-{k:05d}.jsonl").open(encoding="utf-8") as handle:
                head = json.loads(handle.readline())
                for reason, n in head.get("skipped", {}).items():
                    skipped.counts[reason] += n
                for line in handle:
                    record = json.loads(line)
                    if record is not None:
                        regenerated.append(normalize_record(record))
        kept, kept_convs = render_conversations(renderer, regenerated, skipped=skipped)
        if not kept:
            raise DataSourceError(f"regeneration kept no sample ({skipped.describe()})")
        manifest = PreparedManifest(
            verifier_path=str(folder.resolve()),
            tokenizer_fingerprint=tokenizer_fingerprint(folder),
            vocab_size=verifier_vocab_size(folder, renderer.tokenizer),
            sources=[describe_source(s) for s in sources],
            split=split,
            seed=seed,
            seq_length=seq_length,
            skipped=skipped.to_json(),
            regenerated={"backend": backend, **settings.to_json()},
        )
        write_prepared(out, kept, manifest, overwrite=overwrite, conversations=kept_convs)
        shutil.rmtree(work, ignore_errors=True)
    return DataSummary.of_folder(
        "regenerated",
        out,
        manifest,
        seconds=time.perf_counter() - start_time,
        skipped=skipped.to_json(),
    )
