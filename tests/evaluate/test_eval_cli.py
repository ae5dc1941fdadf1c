"""``speculators eval`` with the reference engine: table, JSON and PNG."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from speculators_fixture_good.plugin import FixtureMlpSpeculator

from speculators_core.cli.eval_cmd import eval_command


def test_eval_writes_json_and_png(tmp_path, tiny_verifier, fixture_host):
    torch.manual_seed(0)
    FixtureMlpSpeculator.from_verifier(tiny_verifier).save_pretrained(tmp_path / "draft")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(
            json.dumps({"prompt": p}) for p in ["What is the capital of France?", "Write a poem."]
        )
    )
    result = CliRunner().invoke(
        eval_command,
        [
            str(tmp_path / "draft"),
            "--prompts",
            str(prompts),
            "--num-prompts",
            "2",
            "-k",
            "2",
            "--max-new-tokens",
            "8",
            "--output",
            str(tmp_path / "eval"),
        ],
        catch_exceptions=False,
        obj=fixture_host,
    )
    assert result.exit_code == 0, result.output
    table = [
        line.split()
        for line in result.stdout.splitlines()
        if line.startswith(("engine ", "reference "))
    ]
    assert table[0][:2] == ["engine", "mean"] and table[1][0] == "reference"
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    (ref,) = report["results"]
    assert ref["engine"] == "reference" and ref["k"] == 2
    assert ref["identical_to_verifier"] is True  # greedy speculative output == verifier alone
    # Internal consistency of the counters (an independent recomputation).
    assert ref["mean_acceptance_length"] == 1 + sum(ref["accepted_per_position"]) / ref["rounds"]
    assert ref["new_tokens"] <= 2 * 8
    png = (tmp_path / "eval" / "acceptance.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_bad_inputs_are_one_line(tmp_path, tiny_verifier, fixture_host):
    runner = CliRunner()
    missing = runner.invoke(eval_command, [str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "is not a speculator folder" in str(missing.exception)
    torch.manual_seed(0)
    FixtureMlpSpeculator.from_verifier(tiny_verifier).save_pretrained(tmp_path / "draft")
    bad = runner.invoke(
        eval_command,
        [str(tmp_path / "draft"), "--prompts", str(tmp_path / "none.txt")],
        obj=fixture_host,
    )
    assert (
        bad.exit_code == 1
        and "prompt file" in str(bad.exception)
        and "does not exist" in str(bad.exception)
    )


def test_a_cut_off_weights_file_is_named_by_eval_and_check(tmp_path, tiny_verifier, fixture_host):
    """A truncated model.safetensors (an interrupted copy) gives one line naming the file and
    the fix, from eval and from check, not safetensors' bare SafetensorError."""
    from speculators_core.check import check_checkpoint

    torch.manual_seed(0)
    FixtureMlpSpeculator.from_verifier(tiny_verifier).save_pretrained(tmp_path / "draft")
    weights = tmp_path / "draft" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    result = CliRunner().invoke(
        eval_command,
        [str(tmp_path / "draft"), "--prompts", str(prompts), "--num-prompts", "1",
         "--max-new-tokens", "2", "--no-baseline"],
        obj=fixture_host,
    )  # fmt: skip
    message = str(result.exception)
    assert result.exit_code == 1 and str(weights) in message and "is truncated" in message
    assert "re-download or re-save" in message and "\n" not in message
    findings = check_checkpoint(tmp_path / "draft", host=fixture_host).findings
    assert any("is truncated" in str(f) for f in findings), [str(f) for f in findings]
