"""The speculators format on disk: atomic save, reload through the host and the Auto classes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from speculators_fixture_good.plugin import FixtureMlpSpeculator

from speculators_core import (
    ConfigError,
    SpeculatorModel,
    SpeculatorsError,
    load_speculator,
    register_with_transformers,
)
from speculators_core.errors import UnknownAlgorithmError


@pytest.fixture
def draft(tiny_verifier):
    torch.manual_seed(0)
    return FixtureMlpSpeculator.from_verifier(tiny_verifier)


def _assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def test_save_writes_only_config_and_safetensors(tmp_path, draft):
    draft.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    # Unprefixed names, exactly the module's parameters.
    assert names == {"embed_tokens.weight", "fc.weight", "lm_head.weight"}
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "no temporary folder left"


def test_reload_through_speculator_model_and_automodel(tmp_path, draft, fixture_host):
    from transformers import AutoConfig, AutoModel

    draft.save_pretrained(tmp_path / "out")
    via_base = load_speculator(tmp_path / "out", host=fixture_host)
    assert type(via_base) is FixtureMlpSpeculator
    _assert_same_tensors(draft, via_base)

    register_with_transformers(fixture_host)
    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert config.speculators_model_type == "fixture-mlp"
    via_auto = AutoModel.from_pretrained(tmp_path / "out")
    assert type(via_auto) is FixtureMlpSpeculator
    _assert_same_tensors(draft, via_auto)


def test_subclass_from_pretrained_checks_type(tmp_path, draft, fixture_host):
    draft.save_pretrained(tmp_path / "out")
    assert type(FixtureMlpSpeculator.from_pretrained(tmp_path / "out")) is FixtureMlpSpeculator


def test_unknown_type_fails_with_installed_list_and_writes_nothing(tmp_path, draft, fixture_host):
    draft.save_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    cfg["speculators_model_type"] = "medusa"
    (tmp_path / "out" / "config.json").write_text(json.dumps(cfg))
    before = sorted(os.listdir(tmp_path / "out"))
    with pytest.raises(UnknownAlgorithmError, match=r"'medusa' \(installed: fixture-mlp\)"):
        load_speculator(tmp_path / "out", host=fixture_host)
    assert sorted(os.listdir(tmp_path / "out")) == before


def test_missing_folder_and_missing_weights(tmp_path, draft, fixture_host):
    with pytest.raises(SpeculatorsError, match="does not exist"):
        load_speculator(tmp_path / "nowhere", host=fixture_host)
    draft.save_pretrained(tmp_path / "out")
    (tmp_path / "out" / "model.safetensors").unlink()
    with pytest.raises(SpeculatorsError, match=r"has no model\.safetensors"):
        load_speculator(tmp_path / "out", host=fixture_host)


def test_failed_save_leaves_nothing(tmp_path, draft, monkeypatch):
    """A failure in the middle of writing leaves neither the target nor a temporary folder."""
    from transformers import PreTrainedModel

    def explode(self, directory, **kwargs):
        (directory / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", explode)
    with pytest.raises(OSError, match="disk full"):
        draft.save_pretrained(tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_old_folder(tmp_path, draft, monkeypatch):
    from transformers import PreTrainedModel

    draft.save_pretrained(tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    monkeypatch.setattr(
        PreTrainedModel, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("boom"))
    )
    with pytest.raises(OSError):
        draft.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_save_without_speculators_config_is_refused(tmp_path, draft):
    draft.config.speculators_config = None
    with pytest.raises(ConfigError, match="missing required field 'speculators_config'"):
        draft.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_base_class_from_pretrained_points_at_load_speculator(tmp_path, draft):
    """Only a plugin host can pick the class, so the base class says where to go instead."""
    draft.save_pretrained(tmp_path / "out")
    with pytest.raises(ConfigError, match=r"'fixture-mlp' speculator\); use .*load_speculator"):
        SpeculatorModel.from_pretrained(tmp_path / "out")


def test_subclass_refuses_another_algorithms_folder(tmp_path, draft):
    draft.save_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())

    class OtherConfig(type(draft.config)):
        speculators_model_type: str = "other-mlp"

    class OtherSpeculator(FixtureMlpSpeculator):
        config_class = OtherConfig

    assert cfg["speculators_model_type"] == "fixture-mlp"
    with pytest.raises(
        ConfigError, match="holds a 'fixture-mlp' speculator, not a OtherSpeculator"
    ):
        OtherSpeculator.from_pretrained(tmp_path / "out", config=draft.config)
