"""Chat data sources: read conversations from files, folders, ``datasets`` or the built-in ShareGPT.

Accepted record shapes (one record = one conversation):

* ShareGPT: ``{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}``
* OpenAI: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}``

Roles are normalised to ``system`` / ``user`` / ``assistant`` / ``tool`` (``human`` -> user;
``gpt``, ``chatgpt``, ``bing``, ``bard``, ``model`` -> assistant; ``function``, ``ipython``,
``observation`` -> tool). Content may be a string or a list of OpenAI content parts (their text
parts are joined). An assistant message's ``reasoning_content`` (or ``reasoning``/``thinking``)
and ``tool_calls`` are kept and handed to the chat template, which renders them its own way;
thinking written inline in the content (``<think>...</think>``) stays in the content.

Sources: a ``.json`` file (a list of records, or one record), a ``.jsonl`` file (one record per
line), a columnar ``.parquet``, ``.arrow`` (Arrow IPC file or stream, as ``datasets`` caches
write) or ``.csv`` file (one record per row, read a record batch at a time; in CSV a
``conversations``/``messages`` cell holds the turns as JSON text), a folder (every such file under
it, sorted by path), a folder saved with ``datasets.Dataset.save_to_disk``, or the built-in name
``sharegpt`` (see :mod:`speculators_core.assets`; ``--split`` picks its train or held-out
records), or a ``datasets`` dataset by name: ``hf:NAME`` (a hub id such as
``HuggingFaceH4/ultrachat_200k``, or a local dataset folder or script ``datasets.load_dataset``
reads), also a bare ``owner/name`` that is not a local path; ``--data-config`` and
``--data-split`` pick its configuration and split (see :func:`resolve_sources`). Such a dataset
is streamed (``load_dataset(..., streaming=True)``), a record at a time.

What is an error and what is a counted skip: a source that does not exist, an empty file and a
line that is not JSON are errors (the data itself is broken; one line names the file and the
line). A record that is not a usable conversation (no assistant turn, an unknown role, content
that is not text) is skipped and counted by reason, because real chat dumps contain such
records; the summary reports the counts.

Normalisation of a conversation: system turns are kept where they are; assistant turns before
the first user turn are dropped (nothing prompted them; ShareGPT splits long chats that way);
turns after the last assistant turn are dropped (they carry no supervised token).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from speculators_core.data.errors import DataSourceError
from speculators_core.errors import SpeculatorsError

__all__ = [
    "BUILTIN_SOURCES",
    "Conversation",
    "ShuffledConversations",
    "SkipCounter",
    "SkipRecord",
    "Turn",
    "describe_source",
    "hub_source",
    "iter_records",
    "load_conversations",
    "normalize_record",
    "resolve_sources",
    "shuffled_indices",
]

#: Named built-in sources (``--data sharegpt``).
BUILTIN_SOURCES: tuple[str, ...] = ("sharegpt",)

_ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
    "observation": "tool",
}

#: Message keys that hold an assistant turn's reasoning (thinking) text, first match wins.
_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


@dataclass(frozen=True)
class Turn:
    """One message: ``role`` is ``system``, ``user``, ``assistant`` or ``tool`` (a tool's
    result). An assistant turn may carry ``reasoning`` (its thinking, rendered by templates
    that know ``reasoning_content``) and ``tool_calls`` (OpenAI-style calls, JSON text of the
    list, so turns stay hashable); a tool turn may carry the ``name`` of the tool and the
    ``tool_call_id`` it answers."""

    role: str
    content: str
    reasoning: str | None = None
    tool_calls: str | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def to_message(self) -> dict[str, Any]:
        """The message dict chat templates take: ``role`` and ``content``, and
        ``reasoning_content``, ``tool_calls``, ``name``, ``tool_call_id`` where set."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning is not None:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls is not None:
            message["tool_calls"] = json.loads(self.tool_calls)
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


#: A conversation is a list of turns, already normalised (see the module docs).
Conversation = list[Turn]


class SkipRecord(Exception):
    """Raised by :func:`normalize_record` for a record that is not a usable conversation."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class SkipCounter:
    """Counts skipped records by reason (the CLI prints the counts in its summary)."""

    counts: Counter[str] = field(default_factory=Counter)

    def add(self, reason: str) -> None:
        """Count one skipped record."""
        self.counts[reason] += 1

    @property
    def total(self) -> int:
        """Number of skipped records."""
        return sum(self.counts.values())

    def to_json(self) -> dict[str, int]:
        """The counts, most common first."""
        return dict(self.counts.most_common())

    def describe(self) -> str:
        """``"12 skipped: 10 no assistant turn, 2 unknown role 'bot'"`` or ``"none skipped"``."""
        if not self.counts:
            return "none skipped"
        parts = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        return f"{self.total} skipped: {parts}"


# ------------------------------------------------------------------------------------------------
# records -> conversations
# ------------------------------------------------------------------------------------------------


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise SkipRecord("content part without text")
                texts.append(text)
            else:
                raise SkipRecord("non-text content")
        return "".join(texts)
    raise SkipRecord("content that is not text")


def _tool_calls(calls: Any) -> str:
    """OpenAI-style tool calls as JSON text; ``arguments`` given as JSON text become objects,
    as chat templates (Qwen, Llama 3) expect."""
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise SkipRecord("tool_calls that are not a list of objects")
    normalized = []
    for call in calls:
        function = call.get("function", call)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise SkipRecord("tool call without a function name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise SkipRecord("tool call arguments that are not JSON") from None
        normalized.append(
            {**call, "type": "function", "function": {**function, "arguments": arguments}}
        )
    return json.dumps(normalized, ensure_ascii=False)


def _turn(role: str, message: dict[str, Any]) -> Turn:
    content = message.get("value", message.get("content"))
    calls = message.get("tool_calls") if role == "assistant" else None
    if content is None and calls:
        content = ""  # an assistant turn that only calls tools
    reasoning = None
    if role == "assistant":
        found = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
        if found is not None:
            if not isinstance(found, str):
                raise SkipRecord("reasoning that is not text")
            reasoning = found
    name = message.get("name") if role == "tool" else None
    call_id = message.get("tool_call_id") if role == "tool" else None
    return Turn(
        role,
        _content_text(content),
        reasoning=reasoning,
        tool_calls=_tool_calls(calls) if calls else None,
        name=name if isinstance(name, str) else None,
        tool_call_id=call_id if isinstance(call_id, str) else None,
    )


def normalize_record(record: Any) -> Conversation:
    """The normalised conversation of one record; raises :class:`SkipRecord` with a reason."""
    if not isinstance(record, dict):
        raise SkipRecord("record that is not an object")
    if isinstance(record.get("conversations"), list):
        raw = record["conversations"]
    elif isinstance(record.get("messages"), list):
        raw = record["messages"]
    else:
        raise SkipRecord("record without 'conversations' or 'messages'")
    turns: list[Turn] = []
    for message in raw:
        if not isinstance(message, dict):
            raise SkipRecord("turn that is not an object")
        role = message.get("from", message.get("role"))
        if not isinstance(role, str):
            raise SkipRecord("turn without a role")
        norm = _ROLE_ALIASES.get(role.strip().lower())
        if norm is None:
            raise SkipRecord(f"unknown role {role!r}")
        turns.append(_turn(norm, message))
    # Assistant turns before the first user turn answer nothing the data shows.
    first_user = next((i for i, t in enumerate(turns) if t.role == "user"), None)
    if first_user is None:
        raise SkipRecord("no user turn" if turns else "empty conversation")
    turns = [t for i, t in enumerate(turns) if i >= first_user or t.role == "system"]
    last_assistant = max((i for i, t in enumerate(turns) if t.role == "assistant"), default=None)
    if last_assistant is None:
        raise SkipRecord("no assistant turn")
    return turns[: last_assistant + 1]


# ------------------------------------------------------------------------------------------------
# sources -> records
# ------------------------------------------------------------------------------------------------


def describe_source(source: str | os.PathLike[str]) -> str:
    """A stable description of a source for manifests: ``builtin:sharegpt``, a
    :func:`hub_source` string, or an absolute path."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        return text
    if _builtin_name(text) is not None:
        return f"builtin:{_builtin_name(text)}"
    return str(Path(text).resolve())


def _builtin_name(text: str) -> str | None:
    name = text.removeprefix("builtin:")
    if name in BUILTIN_SOURCES and (text.startswith("builtin:") or not Path(text).exists()):
        return name
    return None


#: Prefix of a ``datasets`` dataset source (``hf:NAME?config=C&split=S``).
HUB_PREFIX = "hf:"
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_source(name: str, *, split: str = "train", config: str | None = None) -> str:
    """The source string of the ``datasets`` dataset ``name``: ``hf:NAME?config=C&split=S``
    (recorded as such in manifests, so the configuration and split are part of the data's
    identity)."""
    query = f"config={config}&split={split}" if config else f"split={split}"
    return f"{HUB_PREFIX}{name}?{query}"


def _parse_hub_source(text: str) -> tuple[str, str | None, str]:
    """``(name, config, split)`` of a :func:`hub_source` string (``hf:NAME`` alone: all
    defaults)."""
    body = text[len(HUB_PREFIX) :]
    name, _, query = body.partition("?")
    fields = dict(part.partition("=")[::2] for part in query.split("&") if part)
    unknown = sorted(set(fields) - {"config", "split"})
    if not name or unknown:
        raise DataSourceError(
            f"data source '{text}' is not a dataset name; write hf:NAME and pick the "
            "configuration and split with --data-config and --data-split"
        )
    return name, fields.get("config") or None, fields.get("split") or "train"


def _is_hub_name(text: str) -> bool:
    """``hf:...``, or ``owner/name`` that is no local path, built-in name or data file."""
    if text.startswith(HUB_PREFIX):
        return True
    if _builtin_name(text) is not None or Path(text).exists():
        return False
    return bool(_HUB_NAME.fullmatch(text)) and Path(text).suffix.lower() not in DATA_SUFFIXES


def resolve_sources(
    sources: Sequence[str | os.PathLike[str]],
    *,
    data_split: str | None = None,
    data_config: str | None = None,
) -> list[str]:
    """``sources`` with every ``datasets`` name written as a :func:`hub_source` string carrying
    ``data_split`` (default ``train``) and ``data_config``; other sources unchanged.

    ``data_split``/``data_config`` given without any dataset name among the sources is an error
    (they would silently do nothing).
    """
    resolved: list[str] = []
    any_hub = False
    for source in sources:
        text = str(source)
        if not _is_hub_name(text):
            resolved.append(text)
            continue
        any_hub = True
        if text.startswith(HUB_PREFIX):
            name, config, split = _parse_hub_source(text)
        else:
            name, config, split = text, None, "train"
        resolved.append(hub_source(name, split=data_split or split, config=data_config or config))
    if (data_split or data_config) and not any_hub:
        raise DataSourceError(
            "--data-split/--data-config apply to datasets names (hf:NAME or owner/name) only; "
            "no --data source is one"
        )
    return resolved


def _read_hub_dataset(text: str) -> Iterator[Any]:
    name, config, split = _parse_hub_source(text)
    try:
        import datasets
    except ImportError:
        from speculators_core.assets import MissingPackageError

        raise MissingPackageError(
            f"'{name}' names a datasets dataset; reading it needs: pip install datasets"
        ) from None
    try:
        loaded = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as err:  # datasets raises many types: name, config, split, network
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataSourceError(
            f"dataset '{name}' (configuration {config or 'default'}, split {split}) could not "
            f"be loaded: {first}; check the name, --data-config and --data-split, or download "
            "its files and pass them with --data"
        ) from None
    yield from loaded


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _not_utf8(path: Path, err: UnicodeDecodeError, where: str) -> DataSourceError:
    return DataSourceError(
        f"data file '{path}' is not UTF-8 text ({where}: byte 0x{err.object[err.start]:02x} "
        f"cannot be decoded); convert it, e.g. 'iconv -f latin1 -t utf-8 {path.name}'"
    )


def _read_json_file(path: Path) -> Iterator[Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err, f"at byte {err.start}") from None
    if not text.strip():
        raise DataSourceError(f"data file '{path}' is empty; give a file with chat records")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataSourceError(
            f"data file '{path}' is not valid JSON ({err.msg} at line {err.lineno} column "
            f"{err.colno}); fix the file, or use .jsonl for one record per line"
        ) from None
    if isinstance(data, dict) and ("conversations" in data or "messages" in data):
        yield data
    elif isinstance(data, list):
        yield from data
    else:
        raise DataSourceError(
            f"data file '{path}' holds a JSON {type(data).__name__}; expected a list of chat "
            "records with 'conversations' or 'messages'"
        )


def _read_jsonl_file(path: Path) -> Iterator[Any]:
    seen_any = False
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, err, f"line {lineno}") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataSourceError(
                    f"data file '{path}' line {lineno} is not valid JSON ({err.msg} at column "
                    f"{err.colno}); fix or delete that line"
                ) from None
            seen_any = True
            yield record
    if not seen_any:
        raise DataSourceError(f"data file '{path}' is empty; give a file with chat records")


#: Columnar file types read with pyarrow, record batch by record batch.
COLUMNAR_SUFFIXES: tuple[str, ...] = (".parquet", ".arrow", ".csv")
#: Every file type a data source may be (a folder is searched for these).
DATA_SUFFIXES: tuple[str, ...] = (".json", ".jsonl", *COLUMNAR_SUFFIXES)
_BATCH_ROWS = 256


def _columnar_batches(path: Path) -> Iterator[Any]:
    """pyarrow record batches of a parquet, Arrow IPC (file or stream) or CSV file."""
    try:
        import pyarrow as pa
    except ImportError:
        from speculators_core.assets import MissingPackageError

        raise MissingPackageError(
            f"'{path}' is a {path.suffix.lower()[1:]} file; reading it needs: pip install "
            "'speculators-core[columnar]' (pyarrow)"
        ) from None

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS)
    elif suffix == ".csv":
        import pyarrow.csv as pcsv

        yield from pcsv.open_csv(path)
    else:  # .arrow: the IPC file format, or the stream format datasets writes in its cache
        try:
            reader: Any = pa.ipc.open_file(path)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
        except pa.ArrowInvalid:
            with pa.ipc.open_stream(path) as stream:
                yield from stream


def _read_columnar_file(path: Path) -> Iterator[Any]:
    """Rows of a columnar file as dicts, a record batch at a time (the file is never loaded
    whole). A ``conversations``/``messages`` cell holding JSON text (CSV has no nested
    columns) is decoded."""
    seen_any = False
    row_number = 0
    try:
        for batch in _columnar_batches(path):
            for row in batch.to_pylist():
                row_number += 1
                seen_any = True
                for key in ("conversations", "messages"):
                    cell = row.get(key)
                    if isinstance(cell, str):
                        try:
                            row[key] = json.loads(cell)
                        except json.JSONDecodeError as err:
                            raise DataSourceError(
                                f"data file '{path}' row {row_number}: column '{key}' is text "
                                f"but not JSON ({err.msg}); store the turns as a JSON list"
                            ) from None
                yield row
    except SpeculatorsError:
        raise
    except Exception as err:  # pyarrow's own errors (ArrowInvalid, ...) and unreadable files
        raise DataSourceError(
            f"data file '{path}' could not be read as {path.suffix.lower()[1:]} ({err}); "
            "re-export it"
        ) from None
    if not seen_any:
        raise DataSourceError(f"data file '{path}' is empty; give a file with chat records")


def _read_file(path: Path) -> Iterator[Any]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl_file(path)
    if suffix == ".json":
        return _read_json_file(path)
    if suffix in COLUMNAR_SUFFIXES:
        return _read_columnar_file(path)
    raise DataSourceError(
        f"data file '{path}' has an unsupported extension '{suffix}'; use "
        f"{', '.join(DATA_SUFFIXES)}"
    )


def _read_saved_dataset(path: Path) -> Iterator[Any]:
    try:
        import datasets
    except ImportError:
        from speculators_core.assets import MissingPackageError

        raise MissingPackageError(
            f"'{path}' is a saved datasets dataset; reading it needs: pip install datasets"
        ) from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(loaded) == 1:
            loaded = next(iter(loaded.values()))
        else:
            raise DataSourceError(
                f"saved dataset '{path}' has splits {sorted(loaded)} and none is 'train'; "
                "save the split you want on its own"
            )
    if len(loaded) == 0:
        raise DataSourceError(f"saved dataset '{path}' is empty; give a dataset with chat records")
    yield from loaded


def iter_records(source: str | os.PathLike[str], *, split: str = "train") -> Iterator[Any]:
    """The raw records of ``source`` in a fixed order (see the module docs for what a source is).

    ``split`` selects the train or held-out part of a built-in source; user sources have no
    split of their own and accept only ``train`` (meaning: all of it).
    """
    text = str(source)
    builtin = _builtin_name(text)
    if builtin is not None:
        from speculators_core.assets import sharegpt_records

        if split not in ("train", "heldout"):
            raise DataSourceError(f"unknown split '{split}'; use 'train' or 'heldout'")
        return sharegpt_records(split)  # type: ignore[arg-type]
    if text.startswith(HUB_PREFIX):
        if split != "train":
            raise DataSourceError(
                f"split '{split}' applies to built-in sources only; pick a dataset's split "
                "with --data-split"
            )
        return _read_hub_dataset(text)
    if split != "train":
        raise DataSourceError(
            f"split '{split}' applies to built-in sources only ({', '.join(BUILTIN_SOURCES)}); "
            f"'{text}' is used whole with split 'train'"
        )
    path = Path(text)
    if not path.exists():
        raise DataSourceError(
            f"data source '{text}' does not exist; give a {'/'.join(DATA_SUFFIXES)} file, a "
            "folder of them, a saved datasets dataset, or a built-in name "
            f"({', '.join(BUILTIN_SOURCES)})"
        )
    if path.is_file():
        return _read_file(path)
    if _is_saved_dataset(path):
        return _read_saved_dataset(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise DataSourceError(
            f"data folder '{path}' holds no {', '.join(DATA_SUFFIXES)} files and is not a saved "
            "dataset"
        )
    return _chain(_read_file(f) for f in files)


def _chain(iterables: Iterable[Iterator[Any]]) -> Iterator[Any]:
    for it in iterables:
        yield from it


def first_turns(conversation: Conversation, max_turns: int) -> Conversation:
    """The conversation up to and including its ``max_turns``-th assistant turn.

    A system message and the user turns before each kept answer stay; later turns are dropped.
    """
    if max_turns < 1:
        raise ValueError(f"max_turns must be at least 1, not {max_turns}")
    answers = 0
    for end, turn in enumerate(conversation):
        if turn.role == "assistant":
            answers += 1
            if answers == max_turns:
                return list(conversation[: end + 1])
    return list(conversation)


def _usable_conversations(
    sources: Sequence[str | os.PathLike[str]], split: str, counter: SkipCounter | None
) -> Iterator[Conversation]:
    """Every usable conversation of ``sources`` in source order; skipped records are counted in
    ``counter`` (when given)."""
    for source in sources:
        for record in iter_records(source, split=split):
            try:
                yield normalize_record(record)
            except SkipRecord as skip:
                if counter is not None:
                    counter.add(skip.reason)


def load_conversations(
    sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    split: str = "train",
    seed: int | None = 0,
    skipped: SkipCounter | None = None,
) -> list[Conversation]:
    """All usable conversations of ``sources``, shuffled with ``seed`` (file order if None).

    Records that are not usable conversations are counted in ``skipped``. Shuffling is a
    seeded permutation of the whole list, so the same sources and seed give the same order.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    counter = skipped if skipped is not None else SkipCounter()
    conversations = list(_usable_conversations(sources, split, counter))
    if seed is not None:
        random.Random(seed).shuffle(conversations)
    return conversations


# ------------------------------------------------------------------------------------------------
# streaming in shuffled order
# ------------------------------------------------------------------------------------------------


def shuffled_indices(n: int, seed: int) -> np.ndarray:
    """``range(n)`` permuted exactly as ``random.Random(seed).shuffle`` permutes a list of ``n``
    items, held in an int64 array (8 bytes per item, not a Python list of ints).

    The same Fisher-Yates walk as :meth:`random.Random.shuffle` with the same draws, so the
    order of a :class:`ShuffledConversations` equals that of :func:`load_conversations`.
    """
    order = np.arange(n, dtype=np.int64)
    # The private draw random.shuffle makes for each swap (CPython 3.x); a test checks equality.
    randbelow = getattr(random.Random(seed), "_randbelow")  # noqa: B009
    for i in range(n - 1, 0, -1):
        j = randbelow(i + 1)
        order[i], order[j] = order[j], order[i]
    return order


class ShuffledConversations(Sequence[Conversation]):
    """The usable conversations of ``sources`` in the order of :func:`load_conversations`
    (seeded shuffle, or source order when ``seed`` is None), read from the sources on demand.

    Memory does not grow with the number of records: one pass at construction counts the
    usable conversations (skips are counted in ``skipped`` then, once) and keeps only the
    permutation (8 bytes a conversation); reading ``self[a:b]`` streams the sources once and
    keeps the conversations asked for. Iterating reads chunks that double in size, so taking
    the first ``m`` conversations costs about ``log2(m / 1024) + 1`` passes and holds at most
    about ``m`` conversations. The sources must give the same records in the same order on
    every pass (files, folders, built-in and ``datasets`` sources do).
    """

    _FIRST_CHUNK = 1024

    def __init__(
        self,
        sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
        *,
        split: str = "train",
        seed: int | None = 0,
        skipped: SkipCounter | None = None,
    ) -> None:
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        self._sources = list(sources)
        self._split = split
        counter = skipped if skipped is not None else SkipCounter()
        count = 0
        for _conversation in self._usable(counter):
            count += 1
        self._count = count
        self._order = shuffled_indices(count, seed) if seed is not None else None

    def _usable(self, counter: SkipCounter | None = None) -> Iterator[Conversation]:
        return _usable_conversations(self._sources, self._split, counter)

    def __len__(self) -> int:
        return self._count

    def _positions(self, start: int, stop: int) -> list[int]:
        if self._order is None:
            return list(range(start, stop))
        return [int(i) for i in self._order[start:stop]]

    def _fetch(self, positions: list[int]) -> list[Conversation]:
        """The conversations at these source positions (usable-conversation indices), in the
        order asked, from one pass that stops after the last one."""
        if not positions:
            return []
        slot = {position: i for i, position in enumerate(positions)}
        found: list[Conversation | None] = [None] * len(positions)
        last = max(positions)
        for index, conversation in enumerate(self._usable()):
            where = slot.get(index)
            if where is not None:
                found[where] = conversation
            if index >= last:
                break
        if any(c is None for c in found):
            raise DataSourceError(
                "the data sources gave fewer records on a second read than on the first; "
                "use sources that do not change while they are read"
            )
        return [c for c in found if c is not None]

    @overload
    def __getitem__(self, index: int) -> Conversation: ...

    @overload
    def __getitem__(self, index: slice) -> list[Conversation]: ...

    def __getitem__(self, index: int | slice) -> Conversation | list[Conversation]:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._count)
            if step != 1:
                raise ValueError("ShuffledConversations slices take step 1 only")
            return self._fetch(self._positions(start, max(start, stop)))
        position = index + self._count if index < 0 else index
        if not 0 <= position < self._count:
            raise IndexError(f"conversation {index} of {self._count}")
        return self._fetch(self._positions(position, position + 1))[0]

    def __iter__(self) -> Iterator[Conversation]:
        start, size = 0, self._FIRST_CHUNK
        while start < self._count:
            yield from self[start : start + size]
            start += size
            size *= 2
