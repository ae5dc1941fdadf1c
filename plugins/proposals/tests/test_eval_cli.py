"""``speculators eval --proposal NAME --temperature T``: the method reaches the decoder and the
report; what vLLM cannot serve stops before any decoding, in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from speculators_core import PluginHost
from speculators_core.cli.eval_cmd import eval_command


@pytest.fixture(scope="module")
def host(proposals_host: PluginHost) -> PluginHost:
    return proposals_host


@pytest.fixture(scope="module")
def draft(tiny_verifier: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from speculators_eagle3 import Eagle3DraftModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("draft") / "eagle3"
    Eagle3DraftModel.from_verifier(tiny_verifier, aux_layer_ids=[1, 2, 3]).save_pretrained(folder)
    prompts = folder.parent / "prompts.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"prompt": p}) for p in ["Name a colour.", "Write a poem."])
    )
    return folder


def invoke(host: PluginHost, draft: Path, *args: Any) -> Any:
    common = ["--prompts", str(draft.parent / "prompts.jsonl"), "--num-prompts", "2", "-k", "2",
              "--max-new-tokens", "8"]  # fmt: skip
    return CliRunner().invoke(eval_command, [str(draft), *common, *map(str, args)], obj=host)


@pytest.mark.parametrize("name", ["sampled", "block"])
def test_eval_decodes_with_the_named_method(
    name: str, host: PluginHost, draft: Path, tmp_path: Path
) -> None:
    result = invoke(host, draft, "--proposal", name, "--temperature", 1.0, "--seed", 3,
                    "--output", tmp_path / "eval")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["proposal"] == name and report["temperature"] == 1.0
    (ref,) = report["results"]
    assert ref["proposal"] == name and ref["engine"] == "reference"
    assert ref["mean_acceptance_length"] == 1 + sum(ref["accepted_per_position"]) / ref["rounds"]
    assert "identical_to_verifier" not in ref  # sampled: outputs are compared in distribution


def test_what_cannot_run_stops_in_one_line(host: PluginHost, draft: Path, tmp_path: Path) -> None:
    unknown = invoke(host, draft, "--proposal", "tree-of-life", "--output", tmp_path / "a")
    assert unknown.exit_code == 1 and "tree-of-life" in str(unknown.exception)
    served = invoke(host, draft, "--proposal", "block", "--temperature", 1, "--engine", "vllm",
                    "--output", tmp_path / "b")  # fmt: skip
    message = str(served.exception)
    assert served.exit_code == 1 and "not served by vLLM for CPU" in message, served.output
    assert "\n" not in message and "--engine reference" in message
    server = invoke(host, draft, "--proposal", "sampled", "--engine", "vllm-server")
    assert server.exit_code == 1 and "greedy decoding" in str(server.exception)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
