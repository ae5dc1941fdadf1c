"""Declared algorithm options: ``--algo-opt`` checked and converted, listed in ``train --help``."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from speculators_core import Algorithm, TrainingOption, hookimpl
from speculators_core.cli.train import train_command
from speculators_core.errors import PluginError
from speculators_core.options import (
    OptionError,
    OptionText,
    int_list,
    parse_key_value,
    python_value,
    resolve_training_options,
)
from speculators_core.plugins import PluginHost, PluginSettings

TYPED_OPTIONS = (
    TrainingOption("k", int, 3, "Draft tokens the proposal records."),
    TrainingOption("scale", float, 1.0, "A float."),
    TrainingOption("flag", bool, False, "A boolean."),
    TrainingOption("name", str, "llama", "A string with choices.", choices=("llama", "qwen3")),
    TrainingOption("ids", int_list, None, "A list of layer ids."),
)


@pytest.fixture
def typed_host() -> PluginHost:
    """An isolated host whose fixture-mlp algorithm declares TYPED_OPTIONS (passed as obj)."""
    from speculators_fixture_good import plugin

    class TypedPlugin:
        @hookimpl
        def speculators_register_algorithms(self) -> list[Algorithm]:
            (record,) = plugin.speculators_register_algorithms()
            return [dataclasses.replace(record, training_options=TYPED_OPTIONS)]

    host = PluginHost(
        PluginSettings(),
        entry_points=False,
        plugins=[("speculators.algorithms:fixture-mlp", TypedPlugin())],
    )
    return host


def _train(verifier: Path, data: Path, output: Path, *extra: str, host: PluginHost):
    args = ["--algorithm", "fixture-mlp", "--verifier", verifier, "--data", data]
    return CliRunner().invoke(
        train_command, [str(a) for a in [*args, "--output", output, *extra]], obj=host
    )


def _one_line_error(result) -> str:
    assert result.exit_code != 0
    assert isinstance(result.exception, OptionError), repr(result.exception)
    message = str(result.exception)
    assert "\n" not in message, message
    return message


def test_unknown_algo_opt_is_refused_with_the_options_listed(
    typed_host, small_verifier, store, tmp_path
):
    """An undeclared name: one line listing the algorithm's options; nothing written."""
    out = tmp_path / "run"
    message = _one_line_error(
        _train(small_verifier, store, out, "--algo-opt", "ttt_steps=3", host=typed_host)
    )
    assert "no training option 'ttt_steps'" in message
    assert "flag, ids, k, name, scale" in message
    assert not out.exists()


@pytest.mark.parametrize(
    ("pair", "fragment"),
    [
        ("k=three", "'k' of algorithm 'fixture-mlp' must be int, not 'three'"),
        ("k=2.5", "must be int"),
        ("scale=big", "must be float"),
        ("flag=maybe", "must be bool"),
        ("ids=[1,x]", "must be int_list"),
        ("name=gpt", "must be one of llama, qwen3, not 'gpt'"),
    ],
)
def test_mistyped_algo_opt_is_refused_with_one_line(
    typed_host, small_verifier, store, tmp_path, pair, fragment
):
    """A value that does not parse as the declared type names option, value and type."""
    out = tmp_path / "run"
    message = _one_line_error(
        _train(small_verifier, store, out, "--algo-opt", pair, host=typed_host)
    )
    assert fragment in message, message
    assert not out.exists()


def test_algo_opt_values_reach_the_model_converted(typed_host, small_verifier, store, tmp_path):
    """Command-line text becomes the declared types before from_verifier sees it."""
    result = _train(
        small_verifier,
        store,
        tmp_path / "run",
        "--dry-run",
        *("--algo-opt", "k=4", "--algo-opt", "scale=2", "--algo-opt", "flag=yes"),
        *("--algo-opt", "name=qwen3", "--algo-opt", "ids=1,2"),
        host=typed_host,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["algo_options"] == {
        "k": 4,
        "scale": 2.0,
        "flag": True,
        "name": "qwen3",
        "ids": [1, 2],
    }
    assert isinstance(report["algo_options"]["scale"], float)


def test_config_file_values_are_checked_too(typed_host, small_verifier, store, tmp_path):
    """algo_options from a config file go through the same check."""
    config = tmp_path / "train.yaml"
    config.write_text("algo_options:\n  k: [1]\n")
    result = _train(small_verifier, store, tmp_path / "run", "--config", config, host=typed_host)
    assert "must be int, not [1]" in _one_line_error(result)


def test_train_help_lists_each_algorithms_options(typed_host):
    """--help ends with every declared option: name, type, default and help."""
    result = CliRunner().invoke(train_command, ["--help"], obj=typed_host)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Algorithm options (--algo-opt NAME=VALUE)" in text
    assert "fixture-mlp:" in text
    assert "k (int, default 3): Draft tokens the proposal records." in text
    assert 'name (str, default "llama"): A string with choices. [choices: llama, qwen3]' in text
    assert "ids (int_list, default unset): A list of layer ids." in text


def test_train_help_survives_a_host_that_fails():
    """A host that cannot load its plugins (strict mode) does not take --help down."""

    class Broken(PluginHost):
        def algorithms(self):
            raise PluginError("could not load plugin speculators.algorithms:bad (bad 0.1)")

    result = CliRunner().invoke(train_command, ["--help"], obj=Broken(entry_points=False))
    assert result.exit_code == 0, result.output
    assert "could not list the installed algorithms" in result.output


def test_an_algorithm_without_declared_options_gets_everything_through(fixture_host):
    """No declared options: any name passes; text reads as JSON, else stays a string."""
    record = fixture_host.algorithm("fixture-mlp")
    given = {"k": OptionText("4"), "tag": OptionText("v1"), "raw": [1, 2]}
    assert resolve_training_options(record, given) == {"k": 4, "tag": "v1", "raw": [1, 2]}


# ------------------------------------------------------------------------------------------
# TrainingOption and the KEY=VALUE reader on their own
# ------------------------------------------------------------------------------------------


def test_training_option_conversions():
    """Text and already-typed values convert; None means 'the algorithm's default'."""
    opt = {o.name: o for o in TYPED_OPTIONS}
    assert opt["k"].convert(OptionText("7")) == 7
    assert opt["k"].convert(7) == 7
    assert opt["scale"].convert(OptionText("1e-3")) == pytest.approx(1e-3)
    assert opt["scale"].convert(2) == 2.0
    for text, value in (("true", True), ("No", False), ("1", True), ("off", False)):
        assert opt["flag"].convert(OptionText(text)) is value
    assert opt["ids"].convert(OptionText("[2, 4]")) == [2, 4]
    assert opt["ids"].convert((2, 4)) == [2, 4]
    assert opt["k"].convert(None) is None
    with pytest.raises(OptionError, match="must be int, not True"):
        opt["k"].convert(True)  # a bool is not an int option's value
    with pytest.raises(OptionError, match="must be str, not 3"):
        opt["name"].convert(3)
    assert type(opt["name"].convert(OptionText("llama"))) is str


def test_python_value_refuses_command_line_text():
    """Options only Python callers can give (tensors) refuse text with the reason."""
    tensor_option = TrainingOption("d2t", python_value, None, "A tensor.")
    assert tensor_option.convert([1, 2]) == [1, 2]
    with pytest.raises(OptionError, match="cannot be given as text"):
        tensor_option.convert(OptionText("[1, 2]"))


def test_training_option_record_checks_itself():
    """A name that is not a keyword, or a type that is not callable, is refused at once."""
    with pytest.raises(OptionError, match="not a Python identifier"):
        TrainingOption("ttt-steps", int)
    with pytest.raises(OptionError, match="use int, float, str, bool or a parser"):
        TrainingOption("k", "int")  # type: ignore[arg-type]


def test_one_key_value_reader():
    """KEY=VALUE: dashes become underscores, the value is kept verbatim, errors are one line."""
    assert parse_key_value("ttt-steps=3", flag="--algo-opt", example="k=1") == ("ttt_steps", "3")
    assert parse_key_value("a=b=c", flag="--set", example="k=1") == ("a", "b=c")
    expected = "--set 'novalue' is not KEY=VALUE; write e.g. --set k=1"
    with pytest.raises(OptionError, match=re.escape(expected)):
        parse_key_value("novalue", flag="--set", example="k=1")
