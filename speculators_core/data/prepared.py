"""Prepared data: token ids and loss masks of rendered conversations, on disk.

A prepared-data folder (written by ``speculators data prepare`` and ``data regenerate``)::

    manifest.json          format, tokenizer fingerprint, verifier path, source, split, seed,
                           seq_length, counts, skipped records by reason
    tokens.safetensors     input_ids  int32 [total tokens]   (all samples concatenated)
                           loss_mask  uint8 [total tokens]
                           offsets    int64 [num samples + 1] (sample i = offsets[i]:offsets[i+1])
    conversations.jsonl    (regenerate only) the conversations the samples were rendered from

The folder is written under a temporary name and renamed into place when complete. Samples
read back as ``{"input_ids": LongTensor[L], "loss_mask": LongTensor[L]}``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from speculators_core.data.chat import ChatRenderer
from speculators_core.data.conversations import (
    Conversation,
    ShuffledConversations,
    SkipCounter,
    SkipRecord,
    describe_source,
)
from speculators_core.data.errors import DatasetFormatError, DataSourceError
from speculators_core.data.summary import DataSummary
from speculators_core.fsutil import atomic_directory

__all__ = [
    "PREPARED_FORMAT",
    "PreparedDataset",
    "PreparedManifest",
    "prepare_data",
    "render_conversations",
    "verifier_vocab_size",
    "write_prepared",
]

PREPARED_FORMAT = "speculators-prepared-data"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENS_NAME = "tokens.safetensors"
CONVERSATIONS_NAME = "conversations.jsonl"
#: Why a rendered conversation is dropped.
NO_SUPERVISED = "no supervised token after truncation"


@dataclass
class PreparedManifest:
    """What ``manifest.json`` of a prepared-data folder records."""

    verifier_path: str
    tokenizer_fingerprint: str
    vocab_size: int
    sources: list[str]
    split: str
    seed: int | None
    seq_length: int | None
    num_samples: int = 0
    num_tokens: int = 0
    num_supervised_tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    #: Regeneration settings when the assistant turns were written by the verifier itself.
    regenerated: dict[str, Any] | None = None
    format: str = PREPARED_FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], *, where: str) -> PreparedManifest:
        """Parse a manifest dict; a :class:`DatasetFormatError` naming ``where`` if it is wrong."""
        if not isinstance(data, dict) or data.get("format") != PREPARED_FORMAT:
            raise DatasetFormatError(
                f"'{where}' is not a prepared-data folder (manifest format "
                f"{data.get('format') if isinstance(data, dict) else None!r}); make one with "
                "'speculators data prepare'"
            )
        if data.get("format_version") != FORMAT_VERSION:
            raise DatasetFormatError(
                f"prepared data '{where}' has format version {data.get('format_version')!r}; "
                f"this version reads {FORMAT_VERSION}: prepare it again"
            )
        names = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as err:
            raise DatasetFormatError(
                f"prepared data '{where}' has a broken manifest: {err}"
            ) from None


class PreparedDataset(Dataset[dict[str, torch.Tensor]], Sequence[dict[str, torch.Tensor]]):
    """A prepared-data folder, read into memory (it holds only token ids and masks)."""

    def __init__(
        self,
        path: Path,
        manifest: PreparedManifest,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor,
        offsets: torch.Tensor,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self._ids = input_ids
        self._mask = loss_mask
        self._offsets = offsets.tolist()

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> PreparedDataset:
        """Open a prepared-data folder; a one-line :class:`DatasetFormatError` if it is unusable."""
        folder = Path(path)
        manifest_path = folder / MANIFEST_NAME
        if not folder.exists():
            raise DatasetFormatError(
                f"prepared data '{folder}' does not exist; make it with 'speculators data prepare'"
            )
        if not manifest_path.is_file():
            raise DatasetFormatError(
                f"'{folder}' has no {MANIFEST_NAME}, so it is not prepared data; make it with "
                "'speculators data prepare'"
            )
        try:
            data = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise DatasetFormatError(f"'{manifest_path}' is not valid JSON: {err.msg}") from None
        manifest = PreparedManifest.from_json(data, where=str(folder))
        try:
            tensors = load_file(str(folder / TOKENS_NAME))
        except (OSError, SafetensorError) as err:
            raise DatasetFormatError(
                f"prepared data '{folder}' has a missing or corrupt {TOKENS_NAME} ({err}); "
                "prepare it again"
            ) from None
        try:
            ids, mask, offsets = tensors["input_ids"], tensors["loss_mask"], tensors["offsets"]
        except KeyError as err:
            raise DatasetFormatError(
                f"prepared data '{folder}' lacks tensor {err}; prepare it again"
            ) from None
        if (
            offsets.numel() != manifest.num_samples + 1
            or ids.numel() != manifest.num_tokens
            or mask.numel() != ids.numel()
            or int(offsets[-1]) != ids.numel()
        ):
            raise DatasetFormatError(
                f"prepared data '{folder}' does not match its manifest (sample or token counts "
                "differ); prepare it again"
            )
        return cls(folder, manifest, ids, mask, offsets)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def num_tokens(self, index: int) -> int:
        """Length of sample ``index``."""
        return self._offsets[index + 1] - self._offsets[index]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        index %= len(self)
        lo, hi = self._offsets[index], self._offsets[index + 1]
        return {
            "input_ids": self._ids[lo:hi].long(),
            "loss_mask": self._mask[lo:hi].long(),
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(len(self)):
            yield self[i]

    def conversations(self) -> list[Conversation] | None:
        """The conversations of a regenerated folder (None for plain prepared data)."""
        from speculators_core.data.conversations import normalize_record

        path = self.path / CONVERSATIONS_NAME
        if not path.is_file():
            return None
        with path.open(encoding="utf-8") as handle:
            return [normalize_record(json.loads(line)) for line in handle if line.strip()]


def write_prepared(
    output: str | os.PathLike[str],
    samples: Sequence[tuple[Sequence[int], Sequence[int]]],
    manifest: PreparedManifest,
    *,
    overwrite: bool = False,
    conversations: Sequence[Conversation] | None = None,
) -> Path:
    """Write ``(input_ids, loss_mask)`` pairs as a prepared-data folder, atomically.

    The manifest's counts are filled in from ``samples``.
    """
    lengths = [len(ids) for ids, _ in samples]
    offsets = torch.zeros(len(samples) + 1, dtype=torch.int64)
    if lengths:
        offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    flat_ids = [t for ids, _ in samples for t in ids]
    flat_mask = [m for _, mask in samples for m in mask]
    manifest.num_samples = len(samples)
    manifest.num_tokens = len(flat_ids)
    manifest.num_supervised_tokens = int(sum(flat_mask))
    try:
        with atomic_directory(output, overwrite=overwrite) as tmp:
            save_file(
                {
                    "input_ids": torch.tensor(flat_ids, dtype=torch.int32),
                    "loss_mask": torch.tensor(flat_mask, dtype=torch.uint8),
                    "offsets": offsets,
                },
                str(tmp / TOKENS_NAME),
            )
            if conversations is not None:
                with (tmp / CONVERSATIONS_NAME).open("w", encoding="utf-8") as handle:
                    for conv in conversations:
                        record = {"messages": [t.to_message() for t in conv]}
                        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    except FileExistsError:
        raise DataSourceError(
            f"output '{output}' already exists; choose another --output or pass --overwrite"
        ) from None
    return Path(output)


def render_conversations(
    renderer: ChatRenderer,
    conversations: Sequence[Conversation],
    *,
    max_samples: int | None = None,
    skipped: SkipCounter,
    progress: bool = False,
) -> tuple[list[tuple[list[int], list[int]]], list[Conversation]]:
    """Render conversations in order until ``max_samples`` are kept; count what is dropped.

    Returns the kept ``(input_ids, loss_mask)`` pairs and the conversations they came from.
    """
    from tqdm.auto import tqdm

    kept: list[tuple[list[int], list[int]]] = []
    kept_convs: list[Conversation] = []
    total = len(conversations) if max_samples is None else min(max_samples, len(conversations))
    bar = tqdm(total=total, desc="rendering", unit="sample", disable=not progress)
    for conv in conversations:
        if max_samples is not None and len(kept) >= max_samples:
            break
        try:
            sample = renderer(conv)
        except SkipRecord as skip:
            skipped.add(skip.reason)
            continue
        if sample.num_supervised == 0:
            skipped.add(NO_SUPERVISED)
            continue
        kept.append((sample.input_ids, sample.loss_mask))
        kept_convs.append(conv)
        bar.update(1)
    bar.close()
    return kept, kept_convs


def verifier_vocab_size(verifier: str | os.PathLike[str], tokenizer: Any) -> int:
    """The verifier's ``vocab_size`` (embedding rows), else the tokenizer's length."""
    from speculators_core.data.verifier import read_verifier_config

    size = read_verifier_config(verifier).get("vocab_size")
    return int(size) if isinstance(size, int) else len(tokenizer)


def prepare_data(
    *,
    verifier: str | os.PathLike[str],
    sources: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    seq_length: int | None = 2048,
    max_samples: int | None = None,
    split: str = "train",
    seed: int | None = 0,
    overwrite: bool = False,
    progress: bool = False,
    reasoning_loss: bool = True,
) -> DataSummary:
    """Read chat data, render it with the verifier's template, mask it and write prepared data.

    Conversations are shuffled with ``seed`` (None keeps source order) and rendered in that
    order until ``max_samples`` are kept. ``reasoning_loss=False`` leaves each answer's
    thinking out of the loss mask (it stays in the context). Raises :class:`DataSourceError`
    if none is kept.
    """
    from speculators_core.data.fingerprint import tokenizer_fingerprint
    from speculators_core.data.verifier import verifier_folder

    start = time.perf_counter()
    if Path(output).exists() and not overwrite:
        raise DataSourceError(
            f"output '{output}' already exists; choose another --output or pass --overwrite"
        )
    # 'smollm2' names the embedded verifier: fingerprint and record the real folder.
    verifier = verifier_folder(verifier)
    renderer = ChatRenderer.from_verifier(
        verifier, seq_length=seq_length, reasoning_loss=reasoning_loss
    )
    skipped = SkipCounter()
    conversations = ShuffledConversations(sources, split=split, seed=seed, skipped=skipped)
    kept, _ = render_conversations(
        renderer, conversations, max_samples=max_samples, skipped=skipped, progress=progress
    )
    if not kept:
        raise DataSourceError(
            f"no usable conversation in {', '.join(map(str, sources))} ({skipped.describe()}); "
            "check the data format (ShareGPT 'conversations' or OpenAI 'messages')"
        )
    manifest = PreparedManifest(
        verifier_path=str(Path(verifier).resolve()),
        tokenizer_fingerprint=tokenizer_fingerprint(verifier),
        vocab_size=verifier_vocab_size(verifier, renderer.tokenizer),
        sources=[describe_source(s) for s in sources],
        split=split,
        seed=seed,
        seq_length=seq_length,
        skipped=skipped.to_json(),
    )
    write_prepared(output, kept, manifest, overwrite=overwrite)
    return DataSummary.of_folder(
        "prepared",
        output,
        manifest,
        seconds=time.perf_counter() - start,
        skipped=skipped.to_json(),
    )
