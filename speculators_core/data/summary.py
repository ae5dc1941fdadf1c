"""The closing summary of a data command: samples, tokens, bytes, speed."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

__all__ = ["DataSummary", "folder_bytes"]


def folder_bytes(path: str | os.PathLike[str]) -> int:
    """Total size of the files under ``path`` (0 if it does not exist)."""
    root = Path(path)
    if root.is_file():
        return root.stat().st_size
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # pragma: no cover - loop always returns


class _Counts(Protocol):
    """What a prepared-data or store manifest counts."""

    num_samples: int
    num_tokens: int
    num_supervised_tokens: int


@dataclass
class DataSummary:
    """What a data command produced; :meth:`describe` is the line the CLI prints last."""

    action: str
    output: str
    num_samples: int = 0
    num_tokens: int = 0
    num_supervised_tokens: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    #: Tokens processed in this run (a resumed run counts only what it did itself).
    tokens_processed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of_folder(
        cls,
        action: str,
        output: str | os.PathLike[str],
        manifest: _Counts,
        *,
        seconds: float,
        tokens_processed: int | None = None,
        skipped: dict[str, int] | None = None,
        notes: list[str] | None = None,
    ) -> DataSummary:
        """The summary of a finished folder: counts from its ``manifest``, size from disk.

        ``tokens_processed`` defaults to all the manifest's tokens (a run that did everything).
        """
        return cls(
            action=action,
            output=str(output),
            num_samples=manifest.num_samples,
            num_tokens=manifest.num_tokens,
            num_supervised_tokens=manifest.num_supervised_tokens,
            bytes_written=folder_bytes(output),
            seconds=seconds,
            tokens_processed=manifest.num_tokens if tokens_processed is None else tokens_processed,
            skipped=dict(skipped or {}),
            notes=list(notes or []),
        )

    @property
    def tokens_per_second(self) -> float:
        """Tokens processed per second of this run."""
        return self.tokens_processed / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        """One line: ``prepared 120 samples, 51,234 tokens (20,001 supervised), ...``."""
        parts = [
            f"{self.action} {self.num_samples:,} samples",
            f"{self.num_tokens:,} tokens ({self.num_supervised_tokens:,} supervised)",
            _human_bytes(self.bytes_written),
            f"{self.tokens_per_second:,.0f} tokens/s",
        ]
        if self.skipped:
            total = sum(self.skipped.values())
            reasons = ", ".join(f"{n} {r}" for r, n in self.skipped.items())
            parts.append(f"{total:,} skipped ({reasons})")
        parts.extend(self.notes)
        return ", ".join(parts) + f" -> {self.output}"
