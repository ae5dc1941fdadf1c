"""What an algorithm's lint rules see and return: :class:`LintContext` in, :class:`Finding` out.

``speculators check`` (:mod:`speculators_core.check`) runs the core's generic checks on a
folder and then the rules of the folder's algorithm, the ``lint`` field of its
:class:`~speculators_core.plugins.records.Algorithm` record::

    def lint(context: LintContext) -> Iterable[Finding]:
        if "fc.weight" not in context.tensors:
            yield context.weights_finding(
                "tensor-missing", "fc.weight is missing", "re-save the full draft"
            )

The context is read-only: a rule reports by returning (or yielding) findings. It holds the
parsed ``config.json``, the tensors from the safetensors headers (no tensor data is read; use
:func:`read_small_tensor` for a small vector such as ``d2t``) and the verifier when it is
reachable here. This module also holds the safetensors header readers the check uses.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speculators_core.errors import SpeculatorsError

__all__ = [
    "CONFIG_FILE",
    "FUSED_PROJECTIONS",
    "INDEX_FILE",
    "WEIGHTS_FILE",
    "Finding",
    "LintContext",
    "LintFunction",
    "TensorInfo",
    "VerifierInfo",
    "as_int",
    "format_names",
    "looks_like_local_path",
    "read_safetensors_header",
    "read_small_tensor",
    "read_tensor_infos",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: Fused projection names and the separate ones vLLM loads instead (it fuses them itself).
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
# A hub id: "name" or "org/name" (letters, digits, '-', '_', '.'), not starting with '.' or '/'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Finding:
    """One problem: the file it is in, a short stable ``code``, what is wrong and the fix."""

    file: str
    code: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}; {self.fix}"

    def to_json(self) -> dict[str, str]:
        """A JSON-ready dict (``speculators check --json``)."""
        return {"file": self.file, "code": self.code, "problem": self.problem, "fix": self.fix}


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as its safetensors header describes it (no data read)."""

    name: str
    dtype: str  # safetensors dtype: F32, BF16, I64, BOOL, ...
    shape: tuple[int, ...]
    file: Path
    offsets: tuple[int, int]


@dataclass(frozen=True)
class VerifierInfo:
    """The verifier a folder is checked against: its ``config.json`` and the sizes rules use.

    ``config`` is the verifier's parsed ``config.json`` (a multimodal verifier's
    ``text_config`` merged on top). A size is None when the config does not state it;
    ``tokenizer_len`` is None when the tokenizer could not be loaded.
    """

    folder: Path
    config: Mapping[str, Any]
    num_layers: int | None
    hidden_size: int | None
    vocab_size: int | None
    max_positions: int | None
    tokenizer_len: int | None


@dataclass(frozen=True)
class LintContext:
    """What an algorithm's lint rule sees of a speculator folder (read-only).

    * ``folder``: the speculator folder.
    * ``config``: its parsed ``config.json`` (a JSON object; the generic checks already
      reported a missing ``speculators_config`` or top-level ``model_type``).
    * ``tensors``: the tensors of ``model.safetensors`` (or the sharded index) by name, from
      the headers, with wrapper prefixes (``model.``, ``module.``, ...) stripped and
      ``midlayer.`` read as ``layers.0.``; empty when the weights are missing or unreadable
      (already reported).
    * ``fused``: names in ``tensors`` that are fused projections (already reported).
    * ``verifier``: the verifier when it is reachable here (``--verifier`` or a local
      ``speculators_config.verifier.name_or_path``), else None.
    """

    folder: Path
    config: Mapping[str, Any]
    tensors: Mapping[str, TensorInfo] = field(default_factory=dict)
    fused: tuple[str, ...] = ()
    verifier: VerifierInfo | None = None

    @property
    def config_file(self) -> str:
        """The path findings about ``config.json`` name."""
        return str(self.folder / CONFIG_FILE)

    @property
    def weights_file(self) -> str:
        """The path findings about the weights name."""
        return str(self.folder / WEIGHTS_FILE)

    def config_finding(self, code: str, problem: str, fix: str) -> Finding:
        """A finding in ``config.json``."""
        return Finding(self.config_file, code, problem, fix)

    def weights_finding(self, code: str, problem: str, fix: str) -> Finding:
        """A finding in the weights (``model.safetensors``)."""
        return Finding(self.weights_file, code, problem, fix)


#: An algorithm's own rules: ``lint(context)`` returns (or yields) its findings, in order.
LintFunction = Callable[[LintContext], Iterable[Finding]]


# ------------------------------------------------------------------------------------------------
# Reading safetensors headers
# ------------------------------------------------------------------------------------------------


class _HeaderError(Exception):
    pass


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """The tensors listed in a safetensors file's header (no data read; dtypes as named).

    A file shorter than its header says (cut off) is refused like an unreadable header.
    """
    from speculators_core.errors import ConversionError
    from speculators_core.safetensors_io import parse_header

    try:
        data_start, entries = parse_header(path)
    except ConversionError as err:
        raise _HeaderError(str(err)) from None
    size = Path(path).stat().st_size
    for name, e in entries.items():
        if data_start + e.end > size:  # a cut-off download or copy: the header is intact
            raise _HeaderError(
                f"'{path}' is truncated: tensor '{name}' ends at byte {data_start + e.end} but "
                f"the file has {size} bytes; re-download or re-save it"
            )
    return {
        name: TensorInfo(
            name=name, dtype=e.dtype, shape=e.shape, file=Path(path), offsets=(e.begin, e.end)
        )
        for name, e in entries.items()
    }


def read_tensor_infos(folder: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """All tensors of a folder's ``model.safetensors`` or sharded index (headers only).

    Raises :class:`SpeculatorsError` when there are no safetensors weights or they are unreadable.
    """
    folder = Path(folder)
    single, index = folder / WEIGHTS_FILE, folder / INDEX_FILE
    try:
        if single.is_file():
            return read_safetensors_header(single)
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise _HeaderError(f"{INDEX_FILE} has no 'weight_map' object")
            infos: dict[str, TensorInfo] = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = folder / str(shard)
                if not shard_path.is_file():
                    raise _HeaderError(f"{INDEX_FILE} lists shard '{shard}', which does not exist")
                infos.update(read_safetensors_header(shard_path))
            return infos
    except (_HeaderError, json.JSONDecodeError, OSError) as err:
        raise SpeculatorsError(f"{folder}: unreadable safetensors weights ({err})") from None
    raise SpeculatorsError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE}")


def read_small_tensor(info: TensorInfo) -> list[int]:
    """The values of a 1-D int64 or bool tensor, read straight from the file."""
    from speculators_core.safetensors_io import parse_header

    start, end = info.offsets
    data_start, _ = parse_header(info.file)
    with open(info.file, "rb") as handle:
        handle.seek(data_start + start)
        raw = handle.read(end - start)
    if info.dtype == "I64":
        return list(struct.unpack(f"<{len(raw) // 8}q", raw))
    return list(raw)  # BOOL: one byte per value


# ------------------------------------------------------------------------------------------------
# Small helpers rules share
# ------------------------------------------------------------------------------------------------


def format_names(items: Iterable[str], limit: int = 3) -> str:
    """``a, b, c and 2 more``: a finding names a few offenders, not all of them."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def as_int(value: Any) -> int | None:
    """``value`` when it is a JSON integer (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def looks_like_local_path(name: str) -> bool:
    """Whether ``name_or_path`` is meant as a filesystem path rather than a hub id."""
    return not _HUB_ID.match(name) or name.startswith((".", "~")) or "\\" in name
