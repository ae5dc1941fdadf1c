"""The plugin is found through its entry point and serves speculators' generic loaders."""

from __future__ import annotations

from pathlib import Path

import speculators_eagle3.plugin as eagle3_plugin
from eagle3_helpers import AUX_IDS
from speculators_eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
from speculators_eagle3.config import PEagleSpeculatorConfig
from speculators_eagle3.peagle import PEagleDraftModel
from transformers import AutoConfig, AutoModel

from speculators_core import PluginHost, PluginSettings, load_speculator


def test_hook_returns_the_eagle3_and_peagle_records() -> None:
    """``speculators_register_algorithms`` returns the ``eagle3`` and ``peagle`` records."""
    record, parallel = eagle3_plugin.speculators_register_algorithms()
    assert record.name == "eagle3"
    assert record.config_class is Eagle3SpeculatorConfig
    assert record.model_class is Eagle3DraftModel
    assert parallel.name == "peagle"
    assert parallel.config_class is PEagleSpeculatorConfig
    assert parallel.model_class is PEagleDraftModel


def test_entry_point_discovery() -> None:
    """A host built from installed entry points provides eagle3 from speculators-eagle3."""
    host = PluginHost(PluginSettings(strict=True))
    algorithm = host.algorithm("eagle3")
    assert algorithm.model_class is Eagle3DraftModel
    assert algorithm.provided_by.startswith("speculators-eagle3 ")
    assert "speculators.algorithms:eagle3" in host.plugin_names()
    assert host.hooks_of("speculators.algorithms:eagle3") == ["speculators_register_algorithms"]


def test_transformers_auto_classes_load_a_saved_draft(tiny_verifier: Path, tmp_path: Path) -> None:
    """AutoConfig/AutoModel and SpeculatorModel load the folder without trust_remote_code."""
    Eagle3DraftModel.from_verifier(tiny_verifier, aux_layer_ids=AUX_IDS).save_pretrained(
        tmp_path / "draft"
    )
    assert type(AutoConfig.from_pretrained(tmp_path / "draft")) is Eagle3SpeculatorConfig
    assert type(AutoModel.from_pretrained(tmp_path / "draft")) is Eagle3DraftModel
    assert type(load_speculator(tmp_path / "draft")) is Eagle3DraftModel
    PEagleDraftModel.from_verifier(tiny_verifier, aux_layer_ids=AUX_IDS).save_pretrained(
        tmp_path / "parallel"
    )
    assert type(AutoConfig.from_pretrained(tmp_path / "parallel")) is PEagleSpeculatorConfig
    assert type(AutoModel.from_pretrained(tmp_path / "parallel")) is PEagleDraftModel
    assert type(load_speculator(tmp_path / "parallel")) is PEagleDraftModel
