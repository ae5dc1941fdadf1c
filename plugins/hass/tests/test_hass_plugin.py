"""The plugin is found through its entry point and serves speculators' generic loaders."""

from __future__ import annotations

from pathlib import Path

import speculators_hass.plugin as hass_plugin
from speculators_hass import EagleDraftModel, EagleSpeculatorConfig
from transformers import AutoConfig, AutoModel

from speculators_core import HiddenStateSpec, PluginHost, PluginSettings, load_speculator
from speculators_core.data import spec_for_algorithm


def test_hook_returns_the_eagle_record() -> None:
    """``speculators_register_algorithms`` returns one ``eagle`` Algorithm record."""
    (record,) = hass_plugin.speculators_register_algorithms()
    assert record.name == "eagle"
    assert record.config_class is EagleSpeculatorConfig
    assert record.model_class is EagleDraftModel


def test_entry_point_discovery() -> None:
    """A host built from installed entry points provides eagle from speculators-hass."""
    host = PluginHost(PluginSettings(strict=True))
    algorithm = host.algorithm("eagle")
    assert algorithm.model_class is EagleDraftModel
    assert algorithm.provided_by.startswith("speculators-hass ")
    assert "speculators.algorithms:eagle" in host.plugin_names()
    assert host.hooks_of("speculators.algorithms:eagle") == ["speculators_register_algorithms"]


def test_data_pipeline_asks_the_plugin_for_its_spec(tiny_verifier: Path) -> None:
    """``speculators data`` learns the final post-norm state from the plugin (no draft built)."""
    host = PluginHost(PluginSettings(strict=True))
    spec = spec_for_algorithm("eagle", tiny_verifier, host=host)
    assert spec == HiddenStateSpec(layer_ids=(4,), post_norm_last=True)


def test_transformers_auto_classes_load_a_saved_draft(tiny_verifier: Path, tmp_path: Path) -> None:
    """AutoConfig/AutoModel and SpeculatorModel load the folder without trust_remote_code."""
    EagleDraftModel.from_verifier(tiny_verifier).save_pretrained(tmp_path / "draft")
    assert type(AutoConfig.from_pretrained(tmp_path / "draft")) is EagleSpeculatorConfig
    assert type(AutoModel.from_pretrained(tmp_path / "draft")) is EagleDraftModel
    assert type(load_speculator(tmp_path / "draft")) is EagleDraftModel


def test_export_command(tiny_verifier: Path, tmp_path: Path) -> None:
    """``speculators hass export-vllm`` writes the export and refuses an existing output."""
    from click.testing import CliRunner
    from speculators_hass.cli import hass_group

    from speculators_core import SpeculatorsError

    EagleDraftModel.from_verifier(tiny_verifier).save_pretrained(tmp_path / "draft")
    args = ["export-vllm", str(tmp_path / "draft"), str(tmp_path / "vllm")]
    result = CliRunner().invoke(hass_group, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "vllm").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    again = CliRunner().invoke(hass_group, args)
    assert isinstance(again.exception, SpeculatorsError)
    assert "--overwrite" in str(again.exception)
    assert CliRunner().invoke(hass_group, [*args, "--overwrite"]).exit_code == 0


def test_command_is_registered() -> None:
    """The ``hass`` command group comes from the speculators.commands entry point."""
    from importlib.metadata import entry_points

    (point,) = [e for e in entry_points(group="speculators.commands") if e.name == "hass"]
    assert point.value == "speculators_hass.cli:hass_group"
