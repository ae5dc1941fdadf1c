"""Reading and writing safetensors files a piece at a time, so memory stays small.

A safetensors file is an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, offsets
relative to the end of the header) and the tensors' raw little-endian bytes.

* :func:`parse_header` is the one reader of a header's bytes (``speculators check`` uses it as
  it is); :func:`read_header` parses and checks a file's header (a truncated file or overlapping
  offsets is a one-line :class:`~speculators_core.errors.ConversionError`).
* :class:`StreamingSafetensorsWriter` writes the header first, from the shapes and dtypes known
  in advance, then each tensor's bytes in order, in chunks: memory is bounded by the chunk size,
  not by the tensor or the checkpoint.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from speculators_core.errors import ConversionError

__all__ = [
    "CHUNK_BYTES",
    "DTYPE_NAMES",
    "HeaderEntry",
    "RawEntry",
    "StreamingSafetensorsWriter",
    "TensorLayout",
    "dtype_from_name",
    "dtype_name",
    "parse_header",
    "read_chunks",
    "read_header",
    "read_tensor",
]

#: Bytes read or written per step when streaming a tensor (a multiple of every element size).
CHUNK_BYTES = 8 << 20

#: safetensors dtype names of the torch dtypes a speculator holds.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}

# A header larger than this is not a real safetensors file (the format caps it at 100 MB).
_MAX_HEADER = 100 << 20


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of ``dtype`` (``torch.float32`` -> ``"F32"``)."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ConversionError(
            f"tensors of dtype {dtype} cannot be written; use a float, integer or bool dtype"
        ) from None


def dtype_from_name(name: str, *, where: str = "safetensors file") -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``"BF16"`` -> ``torch.bfloat16``)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConversionError(
            f"{where} holds a tensor of dtype '{name}', which converters do not read; "
            f"re-save it with one of {', '.join(sorted(_BY_NAME))}"
        ) from None


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors file: dtype, shape, and where its bytes lie in the file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    nbytes: int


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


@dataclass(frozen=True)
class RawEntry:
    """One tensor as a safetensors header lists it, before any dtype is interpreted."""

    name: str
    dtype: str  # the safetensors name: F32, BF16, I64, BOOL, F8_E4M3, ...
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the end of the header
    end: int


def parse_header(path: str | os.PathLike[str]) -> tuple[int, dict[str, RawEntry]]:
    """The byte offset where tensor data starts, and the header's entries (metadata skipped).

    The one reader of safetensors headers in the project (``speculators check`` and the
    converters build on it). Raises :class:`ConversionError` for a file too short for a header,
    a header length that does not fit the file, a header that is not a JSON object, or a
    malformed entry.
    """
    path = Path(path)
    size = path.stat().st_size
    fix = "re-download or re-save the checkpoint"
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ConversionError(f"'{path}' is truncated ({size} bytes, no header); {fix}")
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER or 8 + length > size:
            raise ConversionError(
                f"'{path}' is truncated or not a safetensors file (header of {length} bytes, "
                f"file of {size} bytes); {fix}"
            )
        try:
            header = json.loads(handle.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConversionError(f"'{path}' has an unreadable header ({err}); {fix}") from err
    if not isinstance(header, dict):
        raise ConversionError(f"'{path}' has a header that is not a JSON object; {fix}")
    entries: dict[str, RawEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
            entries[name] = RawEntry(name, str(info["dtype"]), shape, begin, end)
        except (KeyError, TypeError, ValueError) as err:
            raise ConversionError(f"'{path}' has a malformed entry for '{name}'; {fix}") from err
    return 8 + length, entries


def read_header(path: str | os.PathLike[str]) -> dict[str, HeaderEntry]:
    """The tensors a safetensors file holds, checked against the file's size.

    Raises :class:`ConversionError` for a file that is cut off, whose header is not JSON, or
    whose offsets disagree with the tensors' shapes and dtypes.
    """
    path = Path(path)
    size = path.stat().st_size
    fix = "re-download or re-save the checkpoint"
    data_start, raw_entries = parse_header(path)
    data_size = size - data_start
    entries: dict[str, HeaderEntry] = {}
    for name, raw in raw_entries.items():
        dtype = dtype_from_name(raw.dtype, where=f"'{path}'")
        expected = _numel(raw.shape) * torch.empty((), dtype=dtype).element_size()
        if raw.end - raw.begin != expected or raw.begin < 0:
            raise ConversionError(
                f"'{path}': tensor '{name}' has offsets [{raw.begin}, {raw.end}) but its shape "
                f"{list(raw.shape)} and dtype {raw.dtype} need {expected} bytes; {fix}"
            )
        if raw.end > data_size:
            raise ConversionError(
                f"'{path}' is truncated: tensor '{name}' ends at byte {data_start + raw.end} but "
                f"the file has {size} bytes; {fix}"
            )
        entries[name] = HeaderEntry(
            name, dtype, raw.shape, path, data_start + raw.begin, raw.end - raw.begin
        )
    return entries


def read_chunks(entry: HeaderEntry, chunk_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
    """The tensor's bytes as consecutive 1-D tensors of ``entry.dtype`` (about ``chunk_bytes`` each)."""
    element = torch.empty((), dtype=entry.dtype).element_size()
    step = max(element, chunk_bytes - chunk_bytes % element)
    buffer = torch.empty(min(step, max(entry.nbytes, 1)), dtype=torch.uint8)
    with open(entry.file, "rb") as handle:
        handle.seek(entry.start)
        done = 0
        while done < entry.nbytes:
            n = min(step, entry.nbytes - done)
            view = buffer[:n]
            got = handle.readinto(view.numpy().data)
            if got != n:
                raise ConversionError(
                    f"'{entry.file}' is truncated inside tensor '{entry.name}'; re-download or "
                    "re-save the checkpoint"
                )
            yield view.view(entry.dtype)
            done += n


def read_tensor(entry: HeaderEntry) -> torch.Tensor:
    """The whole tensor (for small tensors and validation)."""
    out = torch.empty(entry.nbytes, dtype=torch.uint8)
    with open(entry.file, "rb") as handle:
        handle.seek(entry.start)
        if entry.nbytes and handle.readinto(out.numpy().data) != entry.nbytes:
            raise ConversionError(
                f"'{entry.file}' is truncated inside tensor '{entry.name}'; re-download or "
                "re-save the checkpoint"
            )
    return out.view(entry.dtype).reshape(entry.shape)


@dataclass(frozen=True)
class TensorLayout:
    """A tensor to be written: its name, dtype and shape (known before any byte is written)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes the tensor takes in the file."""
        return _numel(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _as_bytes(chunk: torch.Tensor) -> memoryview:
    flat = chunk.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return flat.view(torch.uint8).numpy().data


class StreamingSafetensorsWriter:
    """Write a safetensors file whose tensors are given one by one, in chunks.

    The header is written on construction from ``layouts`` (the file's tensors in order);
    then :meth:`write` is called once per tensor, in that order, with an iterable of chunks
    whose concatenation (row-major) is the tensor. :meth:`close` checks that every tensor was
    written in full. Use it as a context manager.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        layouts: Sequence[TensorLayout],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.layouts = list(layouts)
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for layout in self.layouts:
            header[layout.name] = {
                "dtype": dtype_name(layout.dtype),
                "shape": list(layout.shape),
                "data_offsets": [offset, offset + layout.nbytes],
            }
            offset += layout.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned
        self._handle: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._handle.write(struct.pack("<Q", len(encoded)))
        self._handle.write(encoded)
        self._next = 0

    def write(self, name: str, chunks: Iterable[torch.Tensor]) -> None:
        """Write the next tensor, ``name``, from ``chunks`` (cast to its dtype as they come)."""
        if self._next >= len(self.layouts) or self.layouts[self._next].name != name:
            expected = self.layouts[self._next].name if self._next < len(self.layouts) else None
            raise ConversionError(f"internal: wrote '{name}' where '{expected}' was due")
        layout = self.layouts[self._next]
        written = 0
        for chunk in chunks:
            if chunk.dtype != layout.dtype:
                chunk = chunk.to(layout.dtype)
            data = _as_bytes(chunk)
            self._handle.write(data)
            written += data.nbytes
        if written != layout.nbytes:
            raise ConversionError(
                f"tensor '{name}' gave {written} bytes but its shape {list(layout.shape)} needs "
                f"{layout.nbytes}; the source checkpoint is inconsistent"
            )
        self._next += 1

    def close(self) -> None:
        """Close the file; raises if a tensor announced in the header was not written."""
        self._handle.close()
        if self._next != len(self.layouts):
            raise ConversionError(
                f"internal: {len(self.layouts) - self._next} tensor(s) of '{self.path}' were not written"
            )

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self._handle.close()
            return
        self.close()
