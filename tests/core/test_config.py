"""The config schema: JSON exactly as FORMAT.md 1.2, validation with one-line errors."""

from __future__ import annotations

import json

import pytest
from speculators_fixture_good.plugin import FixtureMlpConfig, FixtureMlpSpeculator

from speculators_core import (
    ConfigError,
    GreedyTokenProposalConfig,
    SpeculatorsConfig,
    VerifierConfig,
    load_config,
    validation_context,
)
from speculators_core.errors import UnknownAlgorithmError


def _speculators_config(**overrides):
    data = {
        "algorithm": "fixture-mlp",
        "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3}],
        "default_proposal_method": "greedy",
        "verifier": {"name_or_path": "org/verifier", "architectures": ["LlamaForCausalLM"]},
    }
    data.update(overrides)
    return data


def _raw_config(**overrides):
    data = {
        "speculators_model_type": "fixture-mlp",
        "speculators_version": "0.1.0",
        "speculators_config": _speculators_config(),
        "hidden_size": 32,
        "vocab_size": 128,
        "verifier_num_layers": 2,
    }
    data.update(overrides)
    return data


def test_saved_config_matches_format_field_by_field(tmp_path, fixture_host, tiny_verifier):
    """config.json holds exactly the FORMAT.md 1.2 fields, sorted, without top-level model_type."""
    import transformers

    model = FixtureMlpSpeculator.from_verifier(tiny_verifier)
    model.save_pretrained(tmp_path / "draft")
    text = (tmp_path / "draft" / "config.json").read_text()
    saved = json.loads(text)
    verifier_cfg = json.loads((tiny_verifier / "config.json").read_text())
    # Written from FORMAT.md 1.2 (common fields) plus the fixture algorithm's own fields.
    expected = {
        "architectures": ["FixtureMlpSpeculator"],
        "dtype": "float32",
        "speculators_model_type": "fixture-mlp",
        "speculators_version": "0.1.0",
        "transformers_version": transformers.__version__,
        "speculators_config": {
            "algorithm": "fixture-mlp",
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": 3,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "verifier": {
                "name_or_path": str(tiny_verifier.resolve()),
                "architectures": ["LlamaForCausalLM"],
            },
        },
        "hidden_size": verifier_cfg["hidden_size"],
        "vocab_size": verifier_cfg["vocab_size"],
        "verifier_num_layers": verifier_cfg["num_hidden_layers"],
    }
    assert saved == expected
    assert "model_type" not in saved
    assert list(saved) == sorted(saved), "keys are written sorted"


def test_greedy_proposal_defaults_match_format():
    """Field defaults of the greedy proposal are upstream's (FORMAT.md 1.2)."""
    greedy = GreedyTokenProposalConfig()
    assert greedy.model_dump() == {
        "proposal_type": "greedy",
        "speculative_tokens": 5,
        "verifier_accept_k": 1,
        "accept_tolerance": 0.0,
    }


def test_default_proposal_method_must_be_listed(fixture_host):
    with pytest.raises(ValueError, match="default_proposal_method 'tree' is not one of"):
        SpeculatorsConfig.model_validate(
            _speculators_config(default_proposal_method="tree"),
            context=validation_context(fixture_host),
        )


def test_unknown_proposal_type_names_the_installed_ones(fixture_host):
    with pytest.raises(ValueError, match=r"proposal method 'medusa-tree'.*installed: greedy"):
        SpeculatorsConfig.model_validate(
            _speculators_config(proposal_methods=[{"proposal_type": "medusa-tree"}]),
            context=validation_context(fixture_host),
        )


def test_load_config_roundtrip_keeps_unknown_keys(tmp_path, fixture_host):
    raw = _raw_config(inference_type="text")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = load_config(tmp_path, host=fixture_host)
    assert isinstance(config, FixtureMlpConfig)
    assert config.speculators_config.default_proposal().speculative_tokens == 3
    assert config.to_dict()["inference_type"] == "text"
    assert "model_type" not in config.to_dict()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"is not valid JSON \(line 1, column 2"),
        ("[1, 2]", "must hold a JSON object"),
        (
            json.dumps({k: v for k, v in _raw_config().items() if k != "speculators_config"}),
            "missing required field 'speculators_config'",
        ),
        (
            json.dumps({k: v for k, v in _raw_config().items() if k != "speculators_model_type"}),
            "missing required field 'speculators_model_type'",
        ),
        (json.dumps(_raw_config(hidden_size="wide")), "field 'hidden_size'"),
        (
            json.dumps(_raw_config(speculators_config=_speculators_config(verifier="x"))),
            "field 'speculators_config.verifier'",
        ),
        (
            json.dumps(
                _raw_config(
                    speculators_config=_speculators_config(
                        proposal_methods=[{"proposal_type": "greedy", "speculative_tokens": 0}]
                    )
                )
            ),
            "field 'speculators_config.proposal_methods.0.speculative_tokens'",
        ),
        (json.dumps({"model_type": "llama", "hidden_size": 8}), "looks like a plain 'llama' model"),
    ],
)
def test_malformed_config_fails_with_one_line_naming_the_field(
    tmp_path, fixture_host, text, message
):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(tmp_path, host=fixture_host)
    assert "\n" not in str(info.value)


def test_unknown_model_type_lists_installed_types(tmp_path, fixture_host):
    (tmp_path / "config.json").write_text(json.dumps(_raw_config(speculators_model_type="medusa")))
    with pytest.raises(UnknownAlgorithmError) as info:
        load_config(tmp_path, host=fixture_host)
    message = str(info.value)
    assert message == (
        "no installed plugin provides algorithm 'medusa' (installed: fixture-mlp); "
        "install the distribution that provides it"
    )


def test_known_missing_algorithm_names_its_distribution(tmp_path, fixture_host):
    (tmp_path / "config.json").write_text(json.dumps(_raw_config(speculators_model_type="eagle3")))
    with pytest.raises(UnknownAlgorithmError, match="install speculators-eagle3"):
        load_config(tmp_path, host=fixture_host)


def test_config_class_rejects_wrong_model_type(fixture_host):
    with pytest.raises(ConfigError, match="FixtureMlpConfig is for 'fixture-mlp'"):
        FixtureMlpConfig(speculators_model_type="eagle3")


def test_verifier_config_from_folder(tiny_verifier):
    verifier = VerifierConfig.from_pretrained(tiny_verifier, name_or_path="org/tiny")
    assert verifier.model_dump() == {
        "name_or_path": "org/tiny",
        "architectures": ["LlamaForCausalLM"],
    }
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        VerifierConfig.from_pretrained(tiny_verifier / "nope")
