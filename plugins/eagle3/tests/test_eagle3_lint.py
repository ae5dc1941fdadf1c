"""The eagle3 record's check rules (``speculators_eagle3.lint``) and its vLLM serving info."""

from __future__ import annotations

import json
from pathlib import Path

import speculators_eagle3.plugin as eagle3_plugin
import torch
from eagle3_helpers import AUX_IDS
from speculators_eagle3 import Eagle3DraftModel

from speculators_core import PluginHost, PluginSettings
from speculators_core.check import check_checkpoint
from speculators_core.evaluate.vllm_runner import speculative_config

HOST = PluginHost(
    PluginSettings(), entry_points=False, plugins=[("speculators.algorithms:eagle3", eagle3_plugin)]
)


def test_a_saved_draft_is_clean_and_a_planted_fault_is_the_plugins_finding(
    tiny_verifier: Path, tmp_path: Path
) -> None:
    vocab = json.loads((tiny_verifier / "config.json").read_text())["vocab_size"]
    Eagle3DraftModel.from_verifier(
        tiny_verifier, aux_layer_ids=AUX_IDS, draft_vocab_size=128, token_counts=torch.arange(vocab)
    ).save_pretrained(tmp_path / "draft")
    report = check_checkpoint(tmp_path / "draft", host=HOST)
    assert report.findings == [], [str(f) for f in report.findings]

    config = json.loads((tmp_path / "draft" / "config.json").read_text())
    config["eagle_aux_hidden_state_layer_ids"] = [3, 1, 2]
    (tmp_path / "draft" / "config.json").write_text(json.dumps(config))
    assert check_checkpoint(tmp_path / "draft", host=HOST).codes == ["aux-ids-order"]


def test_vllm_serves_speculators_eagle3_folders_with_method_eagle3(
    tiny_verifier: Path, tmp_path: Path
) -> None:
    Eagle3DraftModel.from_verifier(tiny_verifier, aux_layer_ids=AUX_IDS).save_pretrained(
        tmp_path / "draft"
    )
    assert speculative_config(tmp_path / "draft", 3, host=HOST) == {
        "method": "eagle3",
        "model": str((tmp_path / "draft").resolve()),
        "num_speculative_tokens": 3,
    }
