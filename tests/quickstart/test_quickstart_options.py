"""The quickstart's algorithm options: generic, checked against the algorithm, defaults declared."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from speculators_core import Algorithm, TrainingOption, hookimpl
from speculators_core.cli.quickstart import quickstart_command
from speculators_core.options import OptionError, OptionText
from speculators_core.plugins import PluginHost, PluginSettings
from speculators_core.quickstart.settings import QuickstartSettings

OPTIONS = (
    TrainingOption("ttt_steps", int, 3, "Training-time-test steps."),
    TrainingOption("speculative_tokens", int, None, "Tokens the proposal records."),
    TrainingOption("noise_std", float, 0.05, "Feature noise."),
)


def _record(options: tuple[TrainingOption, ...]) -> Algorithm:
    from speculators_fixture_good import plugin

    (record,) = plugin.speculators_register_algorithms()
    return dataclasses.replace(record, training_options=options)


def test_declared_defaults_and_k_complete_the_options():
    """Given values are converted; declared defaults fill the rest; speculative_tokens = k."""
    settings = QuickstartSettings(k=4, algo_options={"noise_std": OptionText("0.1")})
    resolved = settings.with_algorithm(_record(OPTIONS))
    assert resolved.algo_options == {"ttt_steps": 3, "speculative_tokens": 4, "noise_std": 0.1}
    assert settings.algo_options == {"noise_std": "0.1"}  # a copy; the original is unchanged


def test_an_option_the_algorithm_lacks_is_refused():
    """ttt_steps for an algorithm without it: one line listing the algorithm's options."""
    settings = QuickstartSettings(algo_options={"ttt_steps": 2})
    with pytest.raises(
        OptionError, match=r"no training option 'ttt_steps'; its options: noise_std \("
    ):
        settings.with_algorithm(_record((OPTIONS[2],)))


def test_an_algorithm_without_declared_options_gets_what_was_given():
    """No declared options: nothing added, nothing refused."""
    settings = QuickstartSettings(algo_options={"anything": 1})
    assert settings.with_algorithm(_record(())).algo_options == {"anything": 1}


def test_ttt_steps_flag_is_refused_before_any_output_when_the_algorithm_lacks_it(tmp_path):
    """--ttt-steps maps to the option only where declared; else one line, nothing written."""

    class Plugin:
        @hookimpl
        def speculators_register_algorithms(self) -> list[Algorithm]:
            return [_record((OPTIONS[2],))]

    host = PluginHost(
        PluginSettings(), entry_points=False, plugins=[("speculators.algorithms:x", Plugin())]
    )
    out = tmp_path / "out"
    args = ["--algorithm", "fixture-mlp", "--output", str(out), "--ttt-steps", "2"]
    result = CliRunner().invoke(quickstart_command, args, obj=host)
    assert isinstance(result.exception, OptionError), result.output
    assert "no training option 'ttt_steps'" in str(result.exception)
    assert not out.exists()
    mistyped = CliRunner().invoke(
        quickstart_command,
        ["--algorithm", "fixture-mlp", "--output", str(out), "--algo-opt", "noise_std=x"],
        obj=host,
    )
    assert "'noise_std' of algorithm 'fixture-mlp' must be float, not 'x'" in str(
        mistyped.exception
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--server-k-values", "1,x"], "--server-k-values takes positive integers separated by"),
        (["--server-concurrency", "0,4"], "--server-concurrency takes positive integers separated"),
    ],
)
def test_bad_serve_stage_options_are_one_line_before_any_output(tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(quickstart_command, ["--output", str(out), *args])
    assert message in str(result.exception), result.output
    assert not out.exists()


def test_serve_stage_settings_are_sorted_distinct_and_free_on_resume():
    settings = QuickstartSettings(server_k_values=[3, 1, 3], server_concurrency=[4, 1])
    assert settings.server_k_values == [1, 3] and settings.server_concurrency == [1, 4]
    with pytest.raises(Exception, match="--server-k-values takes positive integers"):
        QuickstartSettings(server_k_values=[])
    recorded = QuickstartSettings().to_json()
    changed = QuickstartSettings(server_k_values=[2], server_prompts=3, server_eval=False)
    assert changed.changed_fixed_fields(recorded) == []


def test_optimizer_is_checked_before_any_output_and_old_runs_resume(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(quickstart_command, ["--output", str(out), "--optimizer", "lion"])
    assert "unknown optimizer 'lion'" in str(result.exception), result.output
    assert not out.exists()
    # A run recorded before the optimizer was a setting resumes with the default (adamw) ...
    recorded = QuickstartSettings().to_json()
    del recorded["optimizer"]
    assert QuickstartSettings().changed_fixed_fields(recorded) == []
    # ... and not with another optimizer, which would train a different draft.
    assert QuickstartSettings(optimizer="muon").changed_fixed_fields(recorded) == ["optimizer"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ttt-steps", "2", "--algo-opt", "ttt_steps=3"], "--ttt-steps 2 and --algo-opt ttt_steps=3 disagree"),
        (["--loss", "kl", "--algo-opt", "objective=lk"], "--loss kl and --algo-opt objective=lk disagree"),
    ],
)  # fmt: skip
def test_a_shorthand_flag_and_its_algo_opt_must_agree(tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(quickstart_command, ["--output", str(out), *args])
    assert message in str(result.exception), result.output
    assert not out.exists()
