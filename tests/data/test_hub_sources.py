"""``datasets`` datasets by name as chat data: ``hf:NAME`` / ``owner/name`` with
``--data-config`` and ``--data-split``.

No hub is reachable here, so the names are local dataset folders, which ``datasets.load_dataset``
reads exactly as it reads a downloaded hub dataset (a ``README.md`` declaring configurations,
each with its split files, in parquet as the hub converts datasets to). What is
checked: the configuration and split asked for, and only those, are what is prepared (against
the records written here), the manifest records them, a bare ``owner/name`` is a dataset name
while a path is a path, and every mistake is one line with nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from speculators_core.data.conversations import (
    hub_source,
    iter_records,
    load_conversations,
    resolve_sources,
)
from speculators_core.errors import SpeculatorsError

pytest.importorskip("datasets")
pq = pytest.importorskip("pyarrow.parquet")

SPLITS = {("chat", "train"): 5, ("chat", "test"): 3, ("plain", "train"): 4}


def _record(config: str, split: str, i: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"{config} {split} question {i}"},
            {"role": "assistant", "content": f"{config} {split} answer {i}"},
        ]
    }


@pytest.fixture()
def dataset_folder(tmp_path: Path) -> Path:
    """A dataset folder as the hub serves one: configurations declared in README.md."""
    import pyarrow as pa

    root = tmp_path / "owner_dataset"
    for (config, split), n in SPLITS.items():
        (root / config).mkdir(parents=True, exist_ok=True)
        records = [_record(config, split, i) for i in range(n)]
        pq.write_table(pa.Table.from_pylist(records), root / config / f"{split}.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: chat\n  data_files:\n"
        "  - split: train\n    path: chat/train.parquet\n"
        "  - split: test\n    path: chat/test.parquet\n"
        "- config_name: plain\n  data_files:\n"
        "  - split: train\n    path: plain/train.parquet\n"
        "---\n"
    )
    return root


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.parametrize(("config", "split"), list(SPLITS))
def test_the_configuration_and_split_asked_for_are_read(
    dataset_folder: Path, config: str, split: str
) -> None:
    source = hub_source(str(dataset_folder), config=config, split=split)
    records = list(iter_records(source))
    assert records == [_record(config, split, i) for i in range(SPLITS[(config, split)])]
    conversations = load_conversations([source], seed=None)
    assert [c[0].content for c in conversations] == [
        f"{config} {split} question {i}" for i in range(SPLITS[(config, split)])
    ]


def test_resolve_sources_names_datasets_and_leaves_paths(tmp_path: Path) -> None:
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps(_record("x", "y", 0)) + "\n")
    resolved = resolve_sources(
        ["sharegpt", str(chats), "owner/name", "hf:other/set?split=dev", "missing/file.jsonl"],
        data_config="c",
    )
    assert resolved == [
        "sharegpt",
        str(chats),
        "hf:owner/name?config=c&split=train",
        "hf:other/set?config=c&split=dev",  # the option's config, the source's own split
        "missing/file.jsonl",  # a data file's name is a path, and its error says it is missing
    ]
    assert resolve_sources(["owner/name"], data_split="test") == ["hf:owner/name?split=test"]
    with pytest.raises(SpeculatorsError, match="apply to datasets names"):
        resolve_sources(["sharegpt", str(chats)], data_split="test")


def test_cli_prepares_the_split_and_records_it(dataset_folder: Path, tmp_path: Path) -> None:
    from _support import run_cli

    out = tmp_path / "prepared"
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = run_cli(
        ["data", "prepare", "--verifier", "smollm2", "--data", f"hf:{dataset_folder}",
         "--data-config", "chat", "--data-split", "test", "--output", str(out),
         "--seq-length", "256", "--seed", "3"],
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"] == [f"hf:{dataset_folder}?config=chat&split=test"]
    assert manifest["num_samples"] == SPLITS[("chat", "test")]

    # A name that cannot be loaded, and the options without a dataset: one line, nothing written.
    for args, message in [
        (["--data", "nobody/no-such-dataset"], "dataset 'nobody/no-such-dataset'"),
        (["--data", "sharegpt", "--data-split", "test"], "apply to datasets names"),
        (["--data", f"hf:{dataset_folder}", "--data-config", "nope"], "could not be loaded"),
    ]:
        bad = tmp_path / "bad"
        proc = run_cli(
            ["data", "prepare", "--verifier", "smollm2", *args, "--output", str(bad)], env=env
        )
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert message in lines[-1] and lines[-1].startswith("error:"), proc.stderr
        assert not bad.exists()
