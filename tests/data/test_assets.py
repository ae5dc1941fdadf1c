"""The embedded assets: ShareGPT's recovered records and fixed split; SmolLM2 materialised once."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from speculators_core import assets
from speculators_core.assets import (
    SHAREGPT_HELDOUT_START,
    SHAREGPT_NUM_RECORDS,
    MissingPackageError,
    sharegpt_records,
    smollm2_path,
)
from speculators_core.data.conversations import load_conversations


def test_sharegpt_recovers_every_complete_record_and_splits_at_15000():
    """17,671 complete records; train = the first 15,000, held out = the rest, in file order."""
    everything = [r["id"] for r in sharegpt_records("all")]
    assert len(everything) == SHAREGPT_NUM_RECORDS == 17_671
    heldout = [r["id"] for r in sharegpt_records("heldout")]
    assert heldout == everything[SHAREGPT_HELDOUT_START:]
    train = [r["id"] for r in sharegpt_records("train")]
    assert train == everything[:SHAREGPT_HELDOUT_START]


def test_builtin_sharegpt_source_respects_the_split():
    """``--data sharegpt --split heldout`` reads held-out records only and normalises them."""
    heldout_ids = {r["id"] for r in sharegpt_records("heldout")}
    convs = load_conversations("sharegpt", split="heldout", seed=None)
    assert 0 < len(convs) <= len(heldout_ids)
    assert all(c[-1].role == "assistant" for c in convs)


def test_missing_package_names_the_install_command():
    with pytest.raises(MissingPackageError, match="pip install no_such_package_xyz"):
        assets.package_dir("no_such_package_xyz")


def test_concurrent_materialisation_converts_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Two concurrent callers: one conversion, both get the same complete folder."""
    calls = []

    def fake_convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        threading.Event().wait(0.3)  # long enough for the other caller to arrive
        (out / "config.json").write_text("{}")
        (out / assets._MARKER).write_text("{}")

    monkeypatch.setattr(assets, "_convert_smollm2", fake_convert)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(smollm2_path(tmp_path))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / assets.SMOLLM2_DIR_NAME] * 2
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        assets.SMOLLM2_DIR_NAME
    ]


def test_losing_a_rename_race_is_tolerated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """If a complete folder appears under the name while converting, it is used as is."""
    target = tmp_path / assets.SMOLLM2_DIR_NAME

    def racing_convert(gguf: Path, out: Path) -> None:
        target.mkdir()
        (target / assets._MARKER).write_text("{}")
        (target / "winner").write_text("")
        (out / assets._MARKER).write_text("{}")

    monkeypatch.setattr(assets, "_convert_smollm2", racing_convert)
    assert smollm2_path(tmp_path) == target
    assert (target / "winner").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def broken(gguf: Path, out: Path) -> None:
        (out / "partial").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(assets, "_convert_smollm2", broken)
    with pytest.raises(RuntimeError, match="boom"):
        smollm2_path(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.slow
def test_smollm2_folder_is_a_normal_transformers_model(smollm2: Path):
    """Loads with the Auto classes; the architecture ASSETS.md describes; has a chat template."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(smollm2)
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert smollm2_path() == smollm2  # second call reuses the folder


def test_smollm2_is_a_verifier_name_everywhere(tmp_path, monkeypatch):
    """'smollm2' names the embedded verifier; an existing folder of that name still wins."""
    from speculators_core.assets import resolve_verifier_path, smollm2_path
    from speculators_core.data.verifier import verifier_folder

    monkeypatch.chdir(tmp_path)
    assert resolve_verifier_path("smollm2") == smollm2_path()
    assert verifier_folder("smollm2") == smollm2_path()
    (tmp_path / "smollm2").mkdir()
    assert resolve_verifier_path("smollm2") == Path("smollm2")
