"""``speculators data ...`` through click: the whole flow, --algorithm, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

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


def invoke(*args: object):
    return CliRunner().invoke(data_group, [str(a) for a in args])


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
    monkeypatch.setattr("speculators_core.plugins.host.get_host", lambda: host)
    return host


@pytest.mark.parametrize(("algorithm", "layer_ids"), [("fixture-mlp", [4]), ("cheap-spec", [1, 3])])
def test_algorithm_asks_the_plugin_for_its_spec(
    fixture_host, algorithm, layer_ids, tiny_verifier: Path, chat_file: Path, tmp_path: Path
):
    """--algorithm uses the classmethod when present, else a fresh draft's hidden_state_spec()."""
    prep = tmp_path / "prep"
    assert (
        invoke(
            "prepare", "--verifier", tiny_verifier, "--data", chat_file, "--output", prep
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
