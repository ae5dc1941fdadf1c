"""``speculators train``: options, config files, dry runs, bad input, and real short runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from speculators_core.cli.train import parse_algo_options, train_command
from speculators_core.errors import SpeculatorsError, UnknownAlgorithmError
from speculators_core.options import resolve_training_options
from speculators_core.plugins.host import PluginHost
from speculators_core.train import TrainingArguments, TrainingConfigError
from speculators_core.train.launch import resolve_run_config

QUIET = ["--no-progress", "--no-console-log"]


def _invoke(args: list, host: PluginHost | None = None):
    return CliRunner().invoke(train_command, [str(a) for a in args], obj=host)


def _base(verifier: Path, data: Path, output: Path) -> list:
    return [
        "--algorithm",
        "fixture-mlp",
        "--verifier",
        verifier,
        "--data",
        data,
        "--output",
        output,
    ]


def test_help_documents_every_training_argument():
    """--help lists the run options and every TrainingArguments field with its help text."""
    result = _invoke(["--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for option in (
        "--algorithm",
        "--verifier",
        "--data",
        "--output",
        "--config",
        "--dry-run",
        "--resume",
        "--overwrite",
        "--algo-opt",
        "--online",
    ):
        assert option in text
    for field in dataclasses.fields(TrainingArguments):
        if field.name == "output_dir":
            continue
        assert f"--{field.name.replace('_', '-')}" in text, field.name
        assert " ".join(field.metadata["help"].split())[:40] in text, field.name


def test_dry_run_prints_resolved_config_and_parameter_counts(
    fixture_host, small_verifier, store, tmp_path
):
    """--dry-run prints JSON (config, parameters, plan), trains nothing and writes nothing."""
    out = tmp_path / "run"
    result = _invoke(
        [*_base(small_verifier, store, out), "--dry-run", "--seq-len", "128", "--algo-opt", "k=4"],
        host=fixture_host,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    torch.manual_seed(0)
    model = fixture_host.algorithm("fixture-mlp").model_class.from_verifier(small_verifier)
    total = sum(p.numel() for p in model.parameters())
    assert report["parameters"] == {"total": total, "trainable": total}
    assert report["algorithm"] == "fixture-mlp"
    assert report["algo_options"] == {"k": 4}
    assert report["training"]["seq_len"] == 128
    assert report["training"]["output_dir"] == str(out.resolve())
    from speculators_core.data.store import ShardStore

    data = ShardStore.open(store)
    plan = report["plan"]
    assert plan["train_samples"] + plan["val_samples"] == len(data)
    assert plan["hidden_states"] == [1, 32]
    assert plan["total_steps"] == plan["steps_per_epoch"] * 3
    assert not out.exists()


def test_config_file_with_command_line_overrides(fixture_host, small_verifier, store, tmp_path):
    """A YAML config supplies values; flags given on the command line win; algo options merge."""
    config = tmp_path / "train.yaml"
    config.write_text(
        f"algorithm: fixture-mlp\nverifier: {small_verifier}\ndata: {store}\noutput: {tmp_path / 'run'}\n"
        "seq-len: 64\nlearning_rate: 0.002\nsave_total_limit: null\n"
        "algo_options:\n  k: 2\n  extra: hello\n"
    )
    result = _invoke(
        ["--config", config, "--seq-len", "128", "--algo-opt", "k=5", "--dry-run"],
        host=fixture_host,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["training"]["seq_len"] == 128
    assert report["training"]["learning_rate"] == 0.002
    assert report["training"]["save_total_limit"] is None
    assert report["algo_options"] == {"k": 5, "extra": "hello"}


def test_config_errors_are_one_line():
    """Unknown keys list the valid ones; missing required values name the flag."""
    with pytest.raises(
        TrainingConfigError, match=r"unknown option 'lerning_rate'; valid ones: .*learning_rate"
    ):
        resolve_run_config({"lerning_rate": 1}, {}, {})
    with pytest.raises(TrainingConfigError, match="missing --verifier"):
        resolve_run_config({"algorithm": "a", "data": "d", "output": "o"}, {}, {})
    with pytest.raises(SpeculatorsError, match="is not KEY=VALUE"):
        parse_algo_options(("ttt_steps",))


def test_trainer_hidden_state_noise_is_refused_with_its_replacement():
    """A nonzero hidden_state_noise names the algorithm option that replaced it; 0 still loads."""
    with pytest.raises(TrainingConfigError, match=r"--algo-opt noise_std=X") as err:
        TrainingArguments(output_dir="out", hidden_state_noise=0.05)
    assert "\n" not in str(err.value)
    assert TrainingArguments.from_dict({"output_dir": "out", "hidden_state_noise": 0.0})


def test_algo_options_of_an_algorithm_without_declared_options_are_json_or_strings(
    fixture_host,
):
    """With no declared options, values parse as JSON when they can, else stay strings."""
    given = parse_algo_options(("a=3", "b=[2, 4]", "c=true", "d=qwen3", "e-f=null"))
    assert given == {"a": "3", "b": "[2, 4]", "c": "true", "d": "qwen3", "e_f": "null"}
    resolved = resolve_training_options(fixture_host.algorithm("fixture-mlp"), given)
    assert resolved == {"a": 3, "b": [2, 4], "c": True, "d": "qwen3", "e_f": None}


def _bad(result, error_type: type[BaseException], fragment: str) -> str:
    assert result.exit_code == 1
    assert isinstance(result.exception, error_type), repr(result.exception)
    message = str(result.exception)
    assert "\n" not in message and fragment in message, message
    return message


def test_missing_store(fixture_host, small_verifier, tmp_path):
    """A store that does not exist: one line naming it, nothing written."""
    from speculators_core.data.errors import StoreError

    out = tmp_path / "run"
    result = _invoke(_base(small_verifier, tmp_path / "no-store", out), host=fixture_host)
    _bad(result, StoreError, "no-store' does not exist")
    assert not out.exists()


def test_store_from_another_verifier(fixture_host, other_small_verifier, store, tmp_path):
    """The store's verifier fingerprint differs from --verifier: refused before training."""
    from speculators_core.data.errors import VerifierMismatchError

    out = tmp_path / "run"
    result = _invoke(_base(other_small_verifier, store, out), host=fixture_host)
    _bad(result, VerifierMismatchError, "fingerprint")
    assert not out.exists()


def test_existing_output_folder(fixture_host, small_verifier, store, tmp_path):
    """An existing output folder is refused unless --overwrite or --resume; it is left alone."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _invoke(_base(small_verifier, store, out), host=fixture_host)
    _bad(result, TrainingConfigError, "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    both = _invoke(
        [*_base(small_verifier, store, out), "--overwrite", "--resume"], host=fixture_host
    )
    _bad(both, TrainingConfigError, "contradict")


def test_unknown_algorithm_lists_the_installed_ones(fixture_host, small_verifier, store, tmp_path):
    """An unknown --algorithm names the installed algorithms."""
    result = _invoke(
        [
            "--algorithm",
            "medusa",
            "--verifier",
            small_verifier,
            "--data",
            store,
            "--output",
            tmp_path / "run",
        ],
        host=fixture_host,
    )
    _bad(result, UnknownAlgorithmError, "installed: fixture-mlp")
    assert not (tmp_path / "run").exists()


def test_train_resume_and_overwrite_end_to_end(fixture_host, small_verifier, store, tmp_path):
    """A short run writes final/; --resume continues it; --overwrite starts again."""
    out = tmp_path / "run"
    args = [
        *_base(small_verifier, store, out),
        "--seq-len",
        "256",
        "--max-steps",
        "4",
        "--log-every",
        "1",
        "--algo-opt",
        "k=5",
        *QUIET,
    ]
    result = _invoke(args, host=fixture_host)
    assert result.exit_code == 0, result.output
    assert "trained 4 steps" in result.output
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["speculators_model_type"] == "fixture-mlp"
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 5
    assert (out / "run_config.json").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 4

    more = _invoke(
        [
            *args[: args.index("--max-steps")],
            "--max-steps",
            "6",
            "--log-every",
            "1",
            "--algo-opt",
            "k=5",
            "--resume",
            *QUIET,
        ],
        host=fixture_host,
    )
    assert more.exit_code == 0, more.output
    assert "trained 6 steps" in more.output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s <= 4] == sorted(s for s in steps if s <= 4)  # no duplicates
    assert max(steps) == 6

    again = _invoke([*args, "--overwrite"], host=fixture_host)
    assert again.exit_code == 0, again.output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4


def test_resume_with_other_data_is_refused(
    fixture_host, small_verifier, store, prepared_data, tmp_path
):
    """--resume checks that the run's algorithm, verifier and data did not change."""
    out = tmp_path / "run"
    ok = _invoke(
        [*_base(small_verifier, store, out), "--seq-len", "256", "--max-steps", "1", *QUIET],
        host=fixture_host,
    )
    assert ok.exit_code == 0, ok.output
    other = _invoke(
        [*_base(small_verifier, prepared_data, out), "--online", "--resume", *QUIET],
        host=fixture_host,
    )
    _bad(other, SpeculatorsError, "was trained with data=")


def test_online_mode_matches_the_store(
    fixture_host, small_verifier, store, prepared_data, tmp_path
):
    """--online computes the same hidden states the store holds, and trains on them."""
    from speculators_core.data.prepared import PreparedDataset
    from speculators_core.data.store import ShardStore
    from speculators_core.features import HiddenStateSpec
    from speculators_core.train import OnlineSource

    stored = ShardStore.open(store)
    online = OnlineSource.from_verifier(
        PreparedDataset.open(prepared_data), small_verifier, HiddenStateSpec((2,))
    )
    assert len(online) == len(stored)
    idx = [0, 3, 5]
    for i, sample in zip(idx, online.get_many(idx), strict=True):
        assert online.num_tokens(i) == stored.num_tokens(i)
        assert torch.equal(sample["input_ids"], stored[i]["input_ids"])
        torch.testing.assert_close(
            sample["hidden_states"], stored[i]["hidden_states"], rtol=1e-4, atol=1e-4
        )

    out = tmp_path / "online"
    result = _invoke(
        [
            *_base(small_verifier, prepared_data, out),
            "--online",
            "--seq-len",
            "256",
            "--max-steps",
            "2",
            *QUIET,
        ],
        host=fixture_host,
    )
    assert result.exit_code == 0, result.output
    assert (out / "final" / "model.safetensors").is_file()
