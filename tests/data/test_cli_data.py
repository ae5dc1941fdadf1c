"""``speculators data ...`` through click: the whole flow, --algorithm, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from datatest_support import CHATS, many_chats, write_jsonl

from speculators_core.cli.data import data_group
from speculators_core.data.errors import (
    ChatTemplateError,
    DataSourceError,
    VerifierError,
)
from speculators_core.data.prepared import PreparedDataset
from speculators_core.data.store import ShardStore
from speculators_core.errors import SpeculatorsError
from speculators_core.features import HiddenStateSpec
from speculators_core.plugins import Algorithm, PluginHost, hookimpl
from speculators_core.testing import make_tiny_verifier

FIXTURE_PLUGIN = Path(__file__).resolve().parents[1] / "fixtures" / "good_plugin"


def invoke(*args: object, host: PluginHost | None = None):
    return CliRunner().invoke(data_group, [str(a) for a in args], obj=host)


def test_prepare_hidden_states_vocab_flow(tiny_verifier: Path, chat_file: Path, tmp_path: Path):
    """The three commands chain; each ends with its summary line."""
    prep, store, vocab = tmp_path / "prep", tmp_path / "hs", tmp_path / "vocab"
    result = invoke(
        "prepare",
        "--verifier",
        tiny_verifier,
        "--data",
        chat_file,
        "--output",
        prep,
        "--max-samples",
        3,
    )
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("prepared 3 samples, ") and "supervised" in last and "tokens/s" in last
    assert last.endswith(f"-> {prep}")
    assert len(PreparedDataset.open(prep)) == 3

    result = invoke(
        "hidden-states",
        "--verifier",
        tiny_verifier,
        "--prepared",
        prep,
        "--output",
        store,
        "--layer-ids",
        "1,2,4",
        "--dtype",
        "float16",
        "--batch-size",
        2,
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1].startswith("captured 3 samples, ")
    hs = ShardStore.open(store)
    assert hs.manifest.spec == HiddenStateSpec((1, 2, 4)) and hs.manifest.dtype_name == "float16"

    result = invoke("vocab", "--data", store, "--output", vocab, "--draft-vocab-size", 32)
    assert result.exit_code == 0, result.output
    assert "draft vocab 32 covers" in result.output
    assert {p.name for p in vocab.iterdir()} == {"token_freq.json", "d2t.npy", "t2d.npy"}


def test_hidden_states_needs_exactly_one_spec_source(tiny_verifier: Path, tmp_path: Path):
    """Neither or both of --layer-ids / --algorithm: one line."""
    for extra in ([], ["--layer-ids", "1", "--algorithm", "eagle3"]):
        result = invoke(
            "hidden-states",
            "--verifier",
            tiny_verifier,
            "--prepared",
            tmp_path,
            "--output",
            tmp_path / "o",
            *extra,
        )
        assert isinstance(result.exception, SpeculatorsError)
        assert "exactly one of --layer-ids" in str(result.exception)


def test_malformed_layer_ids(tiny_verifier: Path, tmp_path: Path):
    result = invoke(
        "hidden-states",
        "--verifier",
        tiny_verifier,
        "--prepared",
        tmp_path,
        "--output",
        tmp_path / "o",
        "--layer-ids",
        "2,x",
    )
    assert isinstance(result.exception, VerifierError)
    assert "layer ids must be integers" in str(result.exception)


@pytest.fixture()
def fixture_host(monkeypatch: pytest.MonkeyPatch) -> PluginHost:
    """An isolated host with the fixture algorithm and one that gives its spec cheaply."""
    monkeypatch.syspath_prepend(str(FIXTURE_PLUGIN))
    from speculators_fixture_good import plugin as fixture

    class CheapConfig(fixture.FixtureMlpConfig):
        speculators_model_type: str = "cheap-spec"

    class CheapSpeculator(fixture.FixtureMlpSpeculator):
        config_class = CheapConfig

        @classmethod
        def hidden_state_spec_for_verifier(cls, verifier):
            return HiddenStateSpec((1, 3))

        @classmethod
        def from_verifier(cls, verifier, **options):
            raise AssertionError("the cheap path must not build a model")

    class CheapPlugin:
        @hookimpl
        def speculators_register_algorithms(self):
            return [
                Algorithm(name="cheap-spec", config_class=CheapConfig, model_class=CheapSpeculator)
            ]

    host = PluginHost(entry_points=False, plugins=[("fixture", fixture), ("cheap", CheapPlugin())])
    return host


@pytest.mark.parametrize(("algorithm", "layer_ids"), [("fixture-mlp", [4]), ("cheap-spec", [1, 3])])
def test_algorithm_asks_the_plugin_for_its_spec(
    fixture_host, algorithm, layer_ids, tiny_verifier: Path, chat_file: Path, tmp_path: Path
):
    """--algorithm uses the classmethod when present, else a fresh draft's hidden_state_spec()."""
    prep = tmp_path / "prep"
    assert (
        invoke(
            "prepare",
            "--verifier",
            tiny_verifier,
            "--data",
            chat_file,
            "--output",
            prep,
            host=fixture_host,
        ).exit_code
        == 0
    )
    result = invoke(
        "hidden-states",
        "--verifier",
        tiny_verifier,
        "--prepared",
        prep,
        "--output",
        tmp_path / "hs",
        "--algorithm",
        algorithm,
        host=fixture_host,
    )
    assert result.exit_code == 0, result.output
    assert ShardStore.open(tmp_path / "hs").manifest.layer_ids == layer_ids


def test_unknown_algorithm(fixture_host, tiny_verifier: Path, tmp_path: Path):
    result = invoke(
        "hidden-states",
        "--verifier",
        tiny_verifier,
        "--prepared",
        tmp_path,
        "--output",
        tmp_path / "o",
        "--algorithm",
        "medusa",
        host=fixture_host,
    )
    assert isinstance(result.exception, SpeculatorsError)
    assert "medusa" in str(result.exception)


def _write(folder: Path, name: str, text: str) -> Path:
    (folder / name).write_text(text)
    return folder / name


@pytest.mark.parametrize(
    ("make_input", "error", "message"),
    [
        (lambda d: d / "missing.jsonl", DataSourceError, "does not exist"),
        (lambda d: _write(d, "e.jsonl", ""), DataSourceError, "is empty"),
        (
            lambda d: _write(d, "m.jsonl", '{"messages": []}\n{oops\n'),
            DataSourceError,
            "line 2 is not valid JSON",
        ),
        (
            lambda d: _write(
                d, "n.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
            ),
            DataSourceError,
            "no usable conversation",
        ),
    ],
    ids=["missing", "empty", "malformed-line", "no-assistant"],
)
def test_prepare_bad_data_writes_nothing(
    tiny_verifier: Path, tmp_path: Path, make_input, error, message
):
    """Each bad input is one line; the output folder does not appear."""
    src = make_input(tmp_path)
    result = invoke(
        "prepare", "--verifier", tiny_verifier, "--data", src, "--output", tmp_path / "out"
    )
    assert isinstance(result.exception, error), result.output
    assert message in str(result.exception) and "\n" not in str(result.exception)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_prepare_bad_verifiers(tmp_path: Path, chat_file: Path):
    """A missing verifier folder, and one whose tokenizer has no chat template."""
    result = invoke(
        "prepare", "--verifier", tmp_path / "nope", "--data", chat_file, "--output", tmp_path / "o"
    )
    assert isinstance(result.exception, VerifierError) and "does not exist" in str(result.exception)
    plain = make_tiny_verifier(tmp_path / "plain", chat_template=None)
    result = invoke("prepare", "--verifier", plain, "--data", chat_file, "--output", tmp_path / "o")
    assert isinstance(result.exception, ChatTemplateError) and "has no chat template" in str(
        result.exception
    )
    assert not (tmp_path / "o").exists()


def test_hidden_states_on_a_non_prepared_folder(tiny_verifier: Path, tmp_path: Path):
    result = invoke(
        "hidden-states",
        "--verifier",
        tiny_verifier,
        "--prepared",
        tmp_path,
        "--output",
        tmp_path / "o",
        "--layer-ids",
        "1",
    )
    assert isinstance(result.exception, SpeculatorsError)
    assert "is not prepared data" in str(result.exception)


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("prepare", "regenerate", "hidden-states", "vocab"):
        assert name in result.output


@pytest.mark.slow
def test_prepare_names_the_embedded_verifier_by_its_name(tmp_path, smollm2):
    """'--verifier smollm2' resolves to the materialised folder, which the manifest records."""
    out = tmp_path / "prepared"
    args = ["prepare", "--verifier", "smollm2", "--data", "sharegpt", "--max-samples", "2"]
    result = CliRunner().invoke(data_group, [*args, "--seq-length", "256", "--output", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert Path(manifest["verifier_path"]).resolve() == smollm2.resolve()


# ``data regenerate --store``: answers and hidden states in one decoding pass.


def _one_pass_args(verifier: Path, data: Path, prep: Path, store: Path) -> list[object]:
    return [
        "regenerate",
        "--verifier",
        verifier,
        "--data",
        data,
        "--output",
        prep,
        "--store",
        store,
        "--max-samples",
        5,
        "--max-new-tokens",
        6,
        "--seq-length",
        256,
        "--batch-size",
        2,  # 3 shards, the last one short
        "--seed",
        3,
    ]


def test_regenerate_store_equals_regenerate_to_store(tiny_verifier: Path, tmp_path: Path):
    """The CLI writes what a direct regenerate_to_store call with the same settings writes."""
    import torch

    from speculators_core.data.decode_capture import regenerate_to_store

    data = write_jsonl(tmp_path / "chats.jsonl", CHATS + many_chats(4))
    prep, store = tmp_path / "prep", tmp_path / "store"
    args = _one_pass_args(tiny_verifier, data, prep, store)
    result = invoke(*args, "--layer-ids", "1,2,4", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[-2].startswith("regenerated 5 samples, ") and lines[-2].endswith(f"-> {prep}")
    assert lines[-1].startswith("captured 5 samples, ") and lines[-1].endswith(f"-> {store}")

    ref_prep, ref_store = tmp_path / "ref-prep", tmp_path / "ref-store"
    regenerate_to_store(
        verifier=tiny_verifier,
        sources=[data],
        prepared_output=ref_prep,
        store_output=ref_store,
        spec=HiddenStateSpec((1, 2, 4)),
        max_new_tokens=6,
        seq_length=256,
        max_samples=5,
        seed=3,
        batch_size=2,
        store_dtype=torch.float32,
    )
    ready, states = PreparedDataset.open(prep), ShardStore.open(store)
    ref_ready, ref_states = PreparedDataset.open(ref_prep), ShardStore.open(ref_store)
    assert len(ready) == len(states) == len(ref_ready) == 5
    assert states.manifest.spec == HiddenStateSpec((1, 2, 4))
    assert states.manifest.dtype_name == "float32" and len(states.manifest.shards) == 3
    assert ready.manifest.regenerated["backend"] == "transformers-decode-capture"
    assert ready.conversations() == ref_ready.conversations()
    assert ready.manifest.num_supervised_tokens == states.manifest.num_supervised_tokens
    for i in range(5):
        row, sample, ref = ready[i], states[i], ref_states[i]
        ids, mask = row["input_ids"].tolist(), row["loss_mask"].tolist()
        # The prepared folder and the store agree; the mask is the answer, after the prompt.
        assert sample["input_ids"].tolist() == ids and sample["loss_mask"].tolist() == mask
        answer_start = mask.index(1)
        assert set(mask[:answer_start]) == {0} and set(mask[answer_start:]) == {1}
        assert 1 <= len(ids) - answer_start <= 6
        assert sample["hidden_states"].shape == (len(ids), 3, 64)
        # ... and equal what the direct call wrote.
        assert ids == ref["input_ids"].tolist() and mask == ref["loss_mask"].tolist()
        torch.testing.assert_close(sample["hidden_states"], ref["hidden_states"])
    convs = ready.conversations()
    assert convs is not None  # first user turn only: one answer, at the end
    for conv in convs:
        assert [t.role for t in conv].count("assistant") == 1 and conv[-1].role == "assistant"


def test_regenerate_store_with_algorithm(
    fixture_host, tiny_verifier: Path, chat_file: Path, tmp_path: Path
):
    """--algorithm asks the plugin for its spec, as in 'data hidden-states'."""
    prep, store = tmp_path / "prep", tmp_path / "store"
    args = _one_pass_args(tiny_verifier, chat_file, prep, store)
    result = invoke(*args, "--algorithm", "cheap-spec", "--max-turns", 1, host=fixture_host)
    assert result.exit_code == 0, result.output
    opened = ShardStore.open(store)
    assert opened.manifest.layer_ids == [1, 3] and opened.manifest.dtype_name == "bfloat16"
    assert len(opened) == len(PreparedDataset.open(prep)) == 4


def test_regenerate_store_resumes(tiny_verifier: Path, tmp_path: Path, monkeypatch):
    """An interrupted 'data regenerate --store' is finished by rerunning the same command."""
    import speculators_core.data.decode_capture as module

    data = write_jsonl(tmp_path / "chats.jsonl", CHATS + many_chats(4))
    prep, store = tmp_path / "prep", tmp_path / "store"
    args = [*_one_pass_args(tiny_verifier, data, prep, store), "--layer-ids", "2"]
    real, calls = module.decode_with_states, {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(module, "decode_with_states", flaky)
    assert invoke(*args).exit_code != 0
    assert not prep.exists() and not store.exists()
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert calls["n"] == 4  # the two missing shards, not three
    assert "resumed with 1 of 3 shards done" in result.stdout.strip().splitlines()[-1]
    assert len(ShardStore.open(store)) == len(PreparedDataset.open(prep)) == 5


@pytest.mark.parametrize(
    ("extra", "option"),
    [
        (["--store", "STORE", "--layer-ids", "1", "--backend", "vllm"], "--backend vllm"),
        (["--store", "STORE", "--layer-ids", "1", "--temperature", "0.7"], "--temperature 0.7"),
        (["--store", "STORE", "--layer-ids", "1", "--top-p", "0.9"], "--top-p 0.9"),
        (["--store", "STORE", "--layer-ids", "1", "--max-turns", "2"], "--max-turns 2"),
        (["--store", "STORE", "--layer-ids", "1", "--chunk-size", "16"], "--chunk-size"),
        (["--store", "STORE"], "exactly one of --layer-ids"),
        (["--store", "STORE", "--layer-ids", "1", "--algorithm", "eagle3"], "exactly one of"),
        (["--store", "STORE", "--algorithm", "x", "--post-norm-last"], "--post-norm-last"),
        (["--store", "OUT", "--layer-ids", "1"], "--store and --output are the same"),
        (["--layer-ids", "1"], "--layer-ids"),
        (["--algorithm", "eagle3"], "--algorithm"),
        (["--post-norm-last"], "--post-norm-last"),
        (["--dtype", "float32"], "--dtype"),
    ],
    ids=[
        "vllm",
        "temperature",
        "top-p",
        "max-turns",
        "chunk-size",
        "no-spec",
        "two-specs",
        "post-norm-with-algorithm",
        "store-is-output",
        "layer-ids-alone",
        "algorithm-alone",
        "post-norm-alone",
        "dtype-alone",
    ],
)
def test_regenerate_store_refusals_write_nothing(
    tiny_verifier: Path, chat_file: Path, tmp_path: Path, extra: list[str], option: str
):
    """Each setting the one-pass route cannot honour is one line naming it; nothing is written."""
    out, store = tmp_path / "out", tmp_path / "store"
    paths = {"STORE": str(store), "OUT": str(out)}
    before = set(tmp_path.iterdir())
    result = invoke(
        "regenerate",
        "--verifier",
        tiny_verifier,
        "--data",
        chat_file,
        "--output",
        out,
        *(paths.get(e, e) for e in extra),
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, SpeculatorsError), result.output
    message = str(result.exception)
    assert option in message and "\n" not in message
    assert set(tmp_path.iterdir()) == before  # no output, no store, no partial folder


def test_regenerate_store_refusal_is_one_line_on_stderr(
    tiny_verifier: Path, chat_file: Path, tmp_path: Path, capsys
):
    """Through the console entry point: exit 1 and one 'error: ...' line naming the fix."""
    from speculators_core.cli.main import main

    argv = ["data", "regenerate", "--verifier", str(tiny_verifier), "--data", str(chat_file)]
    argv += ["--output", str(tmp_path / "out"), "--store", str(tmp_path / "store")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--layer-ids", "1", "--max-turns", "3"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --store decodes in one pass")
    assert "first user turn" in err[0] and "drop --max-turns" in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()
