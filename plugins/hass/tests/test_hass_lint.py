"""The ``eagle`` record's check rules and vLLM serving: vLLM serves only an export of the folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from speculators_hass import plugin
from speculators_hass.lint import EXPORT_HINT
from speculators_hass.model import EagleDraftModel

from speculators_core import PluginHost, PluginSettings
from speculators_core.check import check_checkpoint
from speculators_core.evaluate.vllm_runner import VllmError, vllm_serving


@pytest.fixture
def host() -> PluginHost:
    return PluginHost(
        PluginSettings(), entry_points=False, plugins=[("speculators.algorithms:eagle", plugin)]
    )


def test_an_eagle_folder_is_reported_with_the_export_command(
    tiny_verifier: Path, tmp_path: Path, host: PluginHost
) -> None:
    EagleDraftModel.from_verifier(tiny_verifier).save_pretrained(tmp_path / "draft")
    report = check_checkpoint(tmp_path / "draft", host=host)
    assert report.codes == ["speculators-model-type"], [str(f) for f in report.findings]
    line = str(report.findings[0])
    assert "'eagle' is not read by vLLM" in line and "method 'eagle'" in line
    assert line.endswith(f"; {EXPORT_HINT}") and "speculators hass export-vllm" in line
    with pytest.raises(VllmError, match="speculators hass export-vllm"):
        vllm_serving(tmp_path / "draft", host)


def test_a_draft_the_export_cannot_express_is_reported(
    tiny_verifier: Path, tmp_path: Path, host: PluginHost
) -> None:
    EagleDraftModel.from_verifier(tiny_verifier, fusion_bias=True).save_pretrained(
        tmp_path / "draft"
    )
    report = check_checkpoint(tmp_path / "draft", host=host)
    assert report.codes == ["speculators-model-type", "eagle-not-exportable"]
    assert "fusion_bias=true" in str(report.findings[1])
