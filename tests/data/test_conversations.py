"""Reading chat sources: record shapes, normalisation, counted skips and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datatest_support import CHATS, write_jsonl

from speculators_core.data.conversations import (
    SkipCounter,
    Turn,
    iter_records,
    load_conversations,
    normalize_record,
)
from speculators_core.data.errors import DataSourceError
from speculators_core.errors import SpeculatorsError


def test_sharegpt_and_openai_records_normalise_to_the_same_turns():
    """``from``/``value`` and ``role``/``content`` records give identical conversations."""
    sharegpt = {
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    }
    openai = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    }
    expected = [Turn("user", "Hi"), Turn("assistant", "Hello")]
    assert normalize_record(sharegpt) == expected
    assert normalize_record(openai) == expected


def test_system_turns_are_kept_and_leading_or_trailing_turns_trimmed():
    """System kept; assistant before the first user and turns after the last assistant dropped."""
    record = {
        "conversations": [
            {"from": "gpt", "value": "orphan answer"},
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2 without answer"},
        ]
    }
    assert normalize_record(record) == [
        Turn("system", "S"),
        Turn("user", "Q1"),
        Turn("assistant", "A1"),
    ]


def test_openai_content_parts_are_joined():
    """A list of text parts becomes one string."""
    record = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": "c"},
        ]
    }
    assert normalize_record(record)[0] == Turn("user", "ab")


def test_unusable_records_are_skipped_and_counted(tmp_path: Path):
    """No assistant turn, unknown role, no user turn: counted by reason, the rest is kept."""
    records = [
        *CHATS,
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": []},
        {"text": "not a chat"},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    skipped = SkipCounter()
    convs = load_conversations(path, seed=None, skipped=skipped)
    assert len(convs) == len(CHATS)
    assert skipped.to_json() == {
        "no assistant turn": 1,
        "unknown role 'robot'": 1,
        "empty conversation": 1,
        "record without 'conversations' or 'messages'": 1,
    }
    assert skipped.describe().startswith("4 skipped: ")


def test_json_list_folder_and_saved_dataset_sources(tmp_path: Path):
    """A JSON list, a folder of files and a saved datasets dataset give the same records."""
    import datasets

    (tmp_path / "list.json").write_text(json.dumps(CHATS[:2]))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps(CHATS[:1]))
    write_jsonl(folder / "b.jsonl", CHATS[1:2])
    (folder / "notes.txt").write_text("ignored")
    saved = tmp_path / "saved"
    rows = [{"messages": [t.to_message() for t in normalize_record(c)]} for c in CHATS[:2]]
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    expected = [normalize_record(c) for c in CHATS[:2]]
    for source in (tmp_path / "list.json", folder, saved):
        assert load_conversations(source, seed=None) == expected, source


def test_shuffle_is_a_seeded_permutation(chat_file: Path):
    """Same seed, same order; the shuffled list is a permutation of the file order."""
    plain = load_conversations(chat_file, seed=None)
    a = load_conversations(chat_file, seed=3)
    b = load_conversations(chat_file, seed=3)
    assert a == b
    assert sorted(map(repr, a)) == sorted(map(repr, plain))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"messages": []}\n{"messages": [\n', "line 2 is not valid JSON"),
        ("empty.jsonl", "\n\n", "is empty"),
        ("empty.json", "", "is empty"),
        ("bad.json", "[{]", "is not valid JSON"),
        ("scalar.json", "42", "holds a JSON int"),
        ("data.txt", "a,b", "unsupported extension '.txt'"),
        ("empty.csv", "messages\n", "is empty"),
        ("cells.csv", 'messages\n"[{oops"\n', "row 1: column 'messages' is text but not JSON"),
        ("broken.parquet", "PAR1 not really", "could not be read as parquet"),
        # Latin-1 bytes (0xe9 is é): not UTF-8; named with the line, not a bare UnicodeDecodeError
        ("latin1.jsonl", b'{"messages": []}\n{"messages": "caf\xe9"}\n', "line 2: byte 0xe9"),
        ("latin1.json", b'[{"messages": "caf\xe9"}]', "is not UTF-8 text (at byte 18"),
    ],
)
def test_broken_files_fail_with_one_line(
    tmp_path: Path, name: str, content: str | bytes, message: str
):
    """Malformed JSON lines, empty files, wrong types, other encodings: one line naming the file
    (and line)."""
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(DataSourceError) as info:
        load_conversations(path)
    text = str(info.value)
    assert message in text and str(path) in text
    assert "\n" not in text


def test_missing_source_and_empty_folder(tmp_path: Path):
    """A missing path and a folder without data files are one-line SpeculatorsErrors."""
    with pytest.raises(SpeculatorsError, match="does not exist"):
        load_conversations(tmp_path / "nope.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        SpeculatorsError, match=r"holds no \.json, \.jsonl, \.parquet, \.arrow, \.csv files"
    ):
        load_conversations(tmp_path / "empty")


def test_split_is_only_for_builtin_sources(chat_file: Path):
    """Asking a user file for the held-out split is refused."""
    with pytest.raises(DataSourceError, match="applies to built-in sources only"):
        list(iter_records(chat_file, split="heldout"))


def _columnar_copies(folder: Path, records: list[dict]) -> dict[str, Path]:
    """The same records as parquet (nested columns), Arrow IPC file and stream, and CSV (the
    turns as JSON text), as users and ``datasets`` write them."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(records)
    paths = {kind: folder / name for kind, name in (
        ("parquet", "chats.parquet"), ("arrow-file", "file.arrow"),
        ("arrow-stream", "stream.arrow"), ("csv", "chats.csv"),
    )}  # fmt: skip
    pq.write_table(table, paths["parquet"], row_group_size=2)  # several row groups
    with pa.ipc.new_file(paths["arrow-file"], table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    with pa.ipc.new_stream(paths["arrow-stream"], table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    text = pa.Table.from_pylist([{"messages": json.dumps(r["messages"])} for r in records])
    pcsv.write_csv(text, paths["csv"])
    return paths


@pytest.mark.parametrize("kind", ["parquet", "arrow-file", "arrow-stream", "csv"])
def test_columnar_files_give_the_same_conversations_as_jsonl(tmp_path: Path, kind: str):
    """parquet / Arrow / CSV rows are records; the conversations equal the JSONL copy's."""
    records = [
        {"messages": [{"role": "user", "content": f"question {i}"},
                      {"role": "assistant", "content": f"answer {i}, with, commas"}]}
        for i in range(7)
    ]  # fmt: skip
    records.append({"messages": [{"role": "user", "content": "no answer"}]})  # a counted skip
    jsonl = write_jsonl(tmp_path / "chats.jsonl", records)
    want_skips, got_skips = SkipCounter(), SkipCounter()
    want = load_conversations(jsonl, seed=None, skipped=want_skips)
    path = _columnar_copies(tmp_path, records)[kind]
    assert load_conversations(path, seed=None, skipped=got_skips) == want
    assert got_skips.to_json() == want_skips.to_json() == {"no assistant turn": 1}
    assert len(want) == 7


def test_a_folder_mixes_file_types_in_path_order(tmp_path: Path):
    records = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(3)
    ]
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", records[:1])
    _columnar_copies(tmp_path, records[1:])
    (tmp_path / "chats.parquet").rename(folder / "b.parquet")
    (tmp_path / "chats.csv").rename(folder / "c.csv")
    got = [c[0].content for c in load_conversations(folder, seed=None)]
    assert got == ["q0", "q1", "q2", "q1", "q2"]


# ------------------------------------------------------------------------------------------------
# ShuffledConversations: the same order as load_conversations, read on demand
# ------------------------------------------------------------------------------------------------


def test_shuffled_indices_is_random_shuffle() -> None:
    import random

    from speculators_core.data.conversations import shuffled_indices

    for n in (0, 1, 2, 3, 10, 257, 5000):
        for seed in (0, 1, 12345):
            expected = list(range(n))
            random.Random(seed).shuffle(expected)
            assert shuffled_indices(n, seed).tolist() == expected


@pytest.mark.parametrize("seed", [0, 3, None])
def test_shuffled_conversations_equal_load_conversations(
    tmp_path: Path, seed: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from speculators_core.data.conversations import (
        ShuffledConversations,
        SkipCounter,
        load_conversations,
    )

    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    lines = []
    for i in range(2500):
        if i % 7 == 0:
            lines.append(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}))
        else:
            lines.append(json.dumps({"messages": [
                {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"},
            ]}))  # fmt: skip
    first.write_text("\n".join(lines[:1200]) + "\n")
    second.write_text("\n".join(lines[1200:]) + "\n")
    sources = [str(first), str(second)]
    expected_skips, got_skips = SkipCounter(), SkipCounter()
    expected = load_conversations(sources, seed=seed, skipped=expected_skips)
    lazy = ShuffledConversations(sources, seed=seed, skipped=got_skips)
    assert got_skips.counts == expected_skips.counts  # counted once, at construction
    assert len(lazy) == len(expected)
    # Slices and indexing read what they are asked for, in the shuffled order.
    assert lazy[10:25] == expected[10:25]
    assert lazy[-1] == expected[-1] and lazy[0] == expected[0]
    assert lazy[len(expected) - 3 : len(expected) + 9] == expected[-3:]
    with pytest.raises(IndexError):
        lazy[len(expected)]
    # Iteration reads chunks of 1024, 2048, ...: count the passes over the sources.
    import speculators_core.data.conversations as module

    passes = 0
    original = module.iter_records

    def counting(source, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal passes
        if source == sources[0]:
            passes += 1
        return original(source, **kwargs)

    monkeypatch.setattr(module, "iter_records", counting)
    assert list(lazy) == expected
    assert passes == 2  # 1024 + 2048 >= 2142 usable conversations
    assert got_skips.counts == expected_skips.counts  # re-reading counts nothing again


def test_shuffled_conversations_refuse_a_source_that_shrinks(tmp_path: Path) -> None:
    from speculators_core.data.conversations import ShuffledConversations

    path = tmp_path / "chats.jsonl"
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path.write_text((json.dumps(record) + "\n") * 10)
    lazy = ShuffledConversations([str(path)], seed=None)
    path.write_text((json.dumps(record) + "\n") * 4)
    with pytest.raises(SpeculatorsError, match="fewer records on a second read"):
        lazy[0:10]
