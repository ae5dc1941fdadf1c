"""A source checkpoint folder: its ``config.json`` and its tensors, read one at a time.

Weights may be ``model.safetensors``, ``pytorch_model.bin``, or either sharded with an
``*.index.json`` (``{"weight_map": {tensor: file}}``). Only names, shapes and dtypes are read
up front; a tensor's bytes are read when it is converted:

* safetensors: straight from the file in chunks (no memory map, so the resident size does not
  grow with the file);
* ``pytorch_model.bin``: ``torch.load(..., weights_only=True, mmap=True)`` — never a full
  unpickler — reopened for each tensor so the mapping is dropped after it; a legacy
  (non-zip) pickle cannot be memory-mapped and is loaded whole, still ``weights_only``.
  Anything in the pickle that is not a tensor is a one-line error.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from speculators_core.errors import ConversionError
from speculators_core.safetensors_io import (
    CHUNK_BYTES,
    HeaderEntry,
    read_chunks,
    read_header,
    read_tensor,
)

__all__ = ["SourceCheckpoint", "SourceTensor"]

logger = logging.getLogger(__name__)

_SAFETENSORS = "model.safetensors"
_BIN = "pytorch_model.bin"


@dataclass(frozen=True)
class SourceTensor:
    """A tensor of the source: its name, dtype, shape and the file holding it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path


class SourceCheckpoint:
    """A checkpoint folder opened for conversion (see the module docstring).

    ``config`` is the parsed ``config.json`` (``{}`` if the folder has none); ``tensors``
    describes every tensor without reading its bytes.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConversionError(
                f"source '{self.folder}' is not a folder; pass a checkpoint folder"
            )
        self.config = _read_config(self.folder)
        self._headers: dict[str, HeaderEntry] = {}
        self._bin_whole: dict[Path, dict[str, torch.Tensor]] = {}
        self.tensors: dict[str, SourceTensor] = {}
        self.kind = self._index()

    # ------------------------------------------------------------------ discovery

    def _index(self) -> str:
        folder = self.folder
        if (folder / _SAFETENSORS).is_file():
            self._add_safetensors(folder / _SAFETENSORS)
            return "safetensors"
        index = folder / f"{_SAFETENSORS}.index.json"
        if index.is_file():
            for file in self._shards(index):
                self._add_safetensors(file, expected=self._shard_names[file])
            return "safetensors-sharded"
        if (folder / _BIN).is_file():
            self._add_bin(folder / _BIN)
            return "bin"
        index = folder / f"{_BIN}.index.json"
        if index.is_file():
            for file in self._shards(index):
                self._add_bin(file, expected=self._shard_names[file])
            return "bin-sharded"
        raise ConversionError(
            f"source '{folder}' has no weights ({_SAFETENSORS}, {_BIN} or a sharded "
            "*.index.json); pass the checkpoint folder"
        )

    def _shards(self, index: Path) -> list[Path]:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise ConversionError(
                f"'{index}' is not a valid shard index ({err!r}); it needs a 'weight_map' object"
            ) from err
        self._shard_names: dict[Path, set[str]] = {}
        for name, file in weight_map.items():
            self._shard_names.setdefault(self.folder / str(file), set()).add(name)
        for file in self._shard_names:
            if not file.is_file():
                raise ConversionError(
                    f"'{index}' names shard '{file.name}', which is missing from '{self.folder}'; "
                    "copy every shard next to the index"
                )
        return sorted(self._shard_names)

    def _add(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], file: Path) -> None:
        if name in self.tensors:
            raise ConversionError(
                f"tensor '{name}' is in both '{self.tensors[name].file.name}' and '{file.name}'; "
                "keep one copy"
            )
        self.tensors[name] = SourceTensor(name, dtype, shape, file)

    def _check_expected(self, file: Path, found: set[str], expected: set[str] | None) -> None:
        if expected is None:
            return
        missing = sorted(expected - found)
        if missing:
            raise ConversionError(
                f"shard '{file.name}' lacks tensor '{missing[0]}' that the index places there "
                f"({len(missing)} missing); re-download the shard"
            )

    def _add_safetensors(self, file: Path, expected: set[str] | None = None) -> None:
        entries = read_header(file)
        self._check_expected(file, set(entries), expected)
        for name, entry in entries.items():
            if expected is not None and name not in expected:
                continue  # the index is authoritative for sharded checkpoints
            self._headers[name] = entry
            self._add(name, entry.dtype, entry.shape, file)

    def _add_bin(self, file: Path, expected: set[str] | None = None) -> None:
        state = self._load_bin(file)
        self._check_expected(file, set(state), expected)
        for name, tensor in state.items():
            if expected is not None and name not in expected:
                continue
            self._add(name, tensor.dtype, tuple(tensor.shape), file)

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        """The pickle's tensors, memory-mapped (or kept whole for a legacy pickle)."""
        if file in self._bin_whole:
            return self._bin_whole[file]
        fix = "re-save it with torch.save(state_dict) or as safetensors"
        try:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err) and "zip" not in str(err):
                    raise
                # A legacy (pre-zip) pickle cannot be mapped: load it whole, still weights-only.
                state = torch.load(file, map_location="cpu", weights_only=True)
                logger.warning("'%s' is a legacy pickle; it is loaded whole (no memory map)", file)
                self._bin_whole[file] = _check_state(file, state, fix)
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()
            detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), "")
            raise ConversionError(
                f"'{file}' holds objects other than tensors, which are never unpickled here"
                f"{' (' + detail.strip() + ')' if detail else ''}; {fix}"
            ) from err
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise ConversionError(
                f"'{file}' cannot be read as a PyTorch checkpoint ({err}); {fix}"
            ) from err
        return _check_state(file, state, fix)

    # ------------------------------------------------------------------ reading

    def has(self, name: str) -> bool:
        """Whether the source holds tensor ``name``."""
        return name in self.tensors

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` (a copy owned by the caller)."""
        if name in self._headers:
            return read_tensor(self._headers[name])
        tensor = self._bin_tensor(name)
        return tensor.clone()

    def chunks(self, name: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
        """The tensor ``name`` flattened, as consecutive 1-D pieces of about ``chunk_bytes``.

        A piece is valid only until the next one is produced (buffers are reused).
        """
        if name in self._headers:
            yield from read_chunks(self._headers[name], chunk_bytes)
            return
        flat = self._bin_tensor(name).reshape(-1)
        step = max(1, chunk_bytes // max(1, flat.element_size()))
        for start in range(0, flat.numel(), step):
            yield flat[start : start + step]

    def _bin_tensor(self, name: str) -> torch.Tensor:
        file = self.tensors[name].file
        if file in self._bin_whole:
            return self._bin_whole[file][name]
        # Reopened per tensor: the memory map (and the pages it made resident) is released
        # when the caller drops the tensor.
        return self._load_bin(file)[name]


def _check_state(file: Path, state: Any, fix: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict):
        raise ConversionError(
            f"'{file}' holds a {type(state).__name__}, not a state dict of tensors; {fix}"
        )
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConversionError(
                f"'{file}' holds a {type(value).__name__} under {key!r}, not a tensor; "
                f"only tensors are converted, {fix}"
            )
    return state


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(
            f"'{path}' is not valid JSON ({err}); fix the source's config"
        ) from err
    if not isinstance(data, dict):
        raise ConversionError(f"'{path}' holds a {type(data).__name__}, not a JSON object")
    return data
