"""``Algorithm.lint`` and ``Algorithm.vllm``: check runs the folder's own algorithm rules, serve its method."""

from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from speculators_core import Algorithm, PluginHost, PluginSettings, hookimpl
from speculators_core.check import check_checkpoint
from speculators_core.cli.serve import build_serve_command, serve_command
from speculators_core.evaluate.vllm_runner import VllmError, speculative_config, vllm_serving


@pytest.fixture
def fixture_draft(tmp_path: Path, tiny_verifier: Path) -> Path:
    """A fixture-mlp draft saved for the session's tiny verifier (clean for check)."""
    from speculators_fixture_good.plugin import FixtureMlpSpeculator

    torch.manual_seed(0)
    FixtureMlpSpeculator.from_verifier(tiny_verifier).save_pretrained(tmp_path / "draft")
    return tmp_path / "draft"


def _host_with(record: Algorithm) -> PluginHost:
    """An isolated host whose only algorithm is ``record``."""

    class _Plugin:
        @hookimpl
        def speculators_register_algorithms(self) -> list[Algorithm]:
            return [record]

    return PluginHost(
        PluginSettings(),
        entry_points=False,
        plugins=[(f"speculators.algorithms:{record.name}", _Plugin())],
    )


def _rewrite_tensors(folder: Path, **changes: torch.Tensor) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    tensors.update(changes)
    save_file(tensors, str(folder / "model.safetensors"))


def _set_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------------------------------------
# check
# ------------------------------------------------------------------------------------------------


def test_check_runs_the_algorithms_own_rule_and_no_eagle3_rule(
    fixture_draft: Path, fixture_host: PluginHost
):
    report = check_checkpoint(fixture_draft, host=fixture_host)
    # No transformer_layer_config, no aux ids, no d2t: EAGLE-3 rules would report all three.
    assert report.findings == [], [str(f) for f in report.findings]
    assert report.algorithm == "fixture-mlp" and report.notes == []

    hidden = json.loads((fixture_draft / "config.json").read_text())["hidden_size"]
    _rewrite_tensors(fixture_draft, **{"fc.weight": torch.zeros(hidden, hidden)})
    report = check_checkpoint(fixture_draft, host=fixture_host)
    assert report.codes == ["fixture-fc-shape"]
    assert str(report.findings[0]).startswith(f"{fixture_draft}/model.safetensors: fc.weight is")


def test_generic_checks_still_run_before_the_algorithms_rule(
    fixture_draft: Path, fixture_host: PluginHost
):
    tensors = load_file(str(fixture_draft / "model.safetensors"))
    hidden = tensors["fc.weight"].shape[0]
    tensors = {"module." + name: t for name, t in tensors.items()}
    tensors["module.fc.weight"] = torch.zeros(hidden, 3)
    save_file(tensors, str(fixture_draft / "model.safetensors"))
    _set_config(fixture_draft, model_type="llama")
    report = check_checkpoint(fixture_draft, host=fixture_host)
    # Prefixes are stripped before the rule runs, so it still finds fc.weight.
    assert report.codes == ["model-type-top-level", "tensor-prefixed", "fixture-fc-shape"]


def test_a_type_no_plugin_provides_is_one_finding_naming_what_to_install(
    fixture_draft: Path, fixture_host: PluginHost
):
    _set_config(fixture_draft, speculators_model_type="eagle3")
    report = check_checkpoint(fixture_draft, host=fixture_host)
    assert report.codes == ["speculators-model-type"]
    line = str(report.findings[0])
    assert "'eagle3'" in line and "installed: fixture-mlp" in line
    assert line.endswith("; install speculators-eagle3")
    assert "transformer_layer_config" not in line


def test_an_algorithm_without_lint_or_vllm_gets_the_generic_checks_and_notes(
    fixture_draft: Path, fixture_host: PluginHost
):
    bare = replace(fixture_host.algorithm("fixture-mlp"), lint=None, vllm=None)
    host = _host_with(bare)
    hidden = json.loads((fixture_draft / "config.json").read_text())["hidden_size"]
    _rewrite_tensors(fixture_draft, **{"fc.weight": torch.zeros(hidden, hidden)})
    report = check_checkpoint(fixture_draft, host=host)
    assert report.findings == []  # the fixture's own rule is gone with its lint
    assert len(report.notes) == 2
    assert "vLLM cannot serve algorithm 'fixture-mlp'" in report.notes[0]
    assert "has no lint rules of its own" in report.notes[1]

    (fixture_draft / "model.safetensors").unlink()
    assert check_checkpoint(fixture_draft, host=host).codes == ["weights-missing"]


def test_a_failing_lint_rule_is_one_finding_after_the_generic_ones(
    fixture_draft: Path, fixture_host: PluginHost
):
    def broken(context: Any) -> list[Any]:
        raise RuntimeError("rule bug")

    host = _host_with(replace(fixture_host.algorithm("fixture-mlp"), lint=broken))
    report = check_checkpoint(fixture_draft, host=host)
    assert report.codes == ["lint-failed"]
    assert "RuntimeError('rule bug')" in str(report.findings[0])


def test_check_cli_prints_the_notes_on_stderr(fixture_draft: Path, fixture_host: PluginHost):
    from speculators_core.cli.check import check_command

    bare = _host_with(replace(fixture_host.algorithm("fixture-mlp"), lint=None))
    result = CliRunner().invoke(check_command, [str(fixture_draft)], obj=bare)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{fixture_draft}: OK (fixture-mlp, 3 tensors checked")
    assert "note: algorithm 'fixture-mlp'" in result.stderr


# ------------------------------------------------------------------------------------------------
# serve, eval --engine vllm, the quickstart's serve line
# ------------------------------------------------------------------------------------------------


def _speculative_config_of(line: str) -> dict[str, Any]:
    words = shlex.split(line)
    return dict(json.loads(words[words.index("--speculative-config") + 1]))


def test_serve_print_only_uses_the_records_method_and_options(
    fixture_draft: Path, fixture_host: PluginHost
):
    result = CliRunner().invoke(
        serve_command, [str(fixture_draft), "--print-only", "--device", "gpu"], obj=fixture_host
    )
    assert result.exit_code == 0, result.output
    assert _speculative_config_of(result.stdout) == {
        "method": "fixture-mlp-vllm",
        "model": str(fixture_draft.resolve()),
        "num_speculative_tokens": 3,
        "fixture_option": 7,
    }


def test_serve_refuses_an_algorithm_vllm_cannot_serve_in_one_line(
    fixture_draft: Path,
    fixture_host: PluginHost,
    capsys: pytest.CaptureFixture[str],
):
    from speculators_core.cli.main import main

    unserved = _host_with(replace(fixture_host.algorithm("fixture-mlp"), vllm=None))
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(fixture_draft), "--print-only", "--device", "gpu"], host=unserved)
    assert exit_info.value.code == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith("error: vLLM cannot serve algorithm 'fixture-mlp'")
    assert out.err.count("\n") == 1 and "Traceback" not in out.err

    with pytest.raises(VllmError, match="vLLM cannot serve algorithm 'fixture-mlp'"):
        build_serve_command(fixture_draft, plugin_host=unserved, device="gpu")


def test_eval_with_vllm_refuses_before_vllm_starts(
    fixture_draft: Path, tiny_verifier: Path, fixture_host: PluginHost
):
    from speculators_core.evaluate.evaluation import evaluate_vllm

    unserved = _host_with(replace(fixture_host.algorithm("fixture-mlp"), vllm=None))
    with pytest.raises(VllmError, match="vLLM cannot serve algorithm 'fixture-mlp'"):
        evaluate_vllm(
            fixture_draft,
            tiny_verifier,
            [[1, 2, 3]],
            k=2,
            temperature=0.0,
            max_new_tokens=4,
            seed=0,
            baseline=False,
            host=unserved,
        )
    # The runner builds vLLM's speculative_config from the record.
    assert speculative_config(fixture_draft, 2, host=fixture_host)["fixture_option"] == 7


def test_an_export_only_algorithm_is_refused_with_its_export_hint(
    fixture_draft: Path, fixture_host: PluginHost
):
    from speculators_core import VllmServing

    serving = VllmServing(method="eagle", export="export it with 'fixture export' first")
    host = _host_with(replace(fixture_host.algorithm("fixture-mlp"), vllm=serving))
    with pytest.raises(VllmError, match="does not read algorithm 'fixture-mlp' folders") as info:
        vllm_serving(fixture_draft, host)
    assert str(info.value).endswith("; export it with 'fixture export' first")
    report = check_checkpoint(fixture_draft, host=host)
    assert report.codes == ["speculators-model-type"]
    assert str(report.findings[0]).endswith("; export it with 'fixture export' first")


def test_the_quickstart_serve_line_uses_the_records_method(
    fixture_draft: Path, fixture_host: PluginHost
):
    from speculators_core.quickstart.report import serve_command as quickstart_serve_line

    line = quickstart_serve_line(fixture_draft, fixture_host)
    assert _speculative_config_of(line)["method"] == "fixture-mlp-vllm"
    unserved = _host_with(replace(fixture_host.algorithm("fixture-mlp"), vllm=None))
    assert "vLLM cannot serve algorithm 'fixture-mlp'" in quickstart_serve_line(
        fixture_draft, unserved
    )


def test_eval_cli_with_vllm_stops_before_decoding(
    fixture_draft: Path,
    tiny_verifier: Path,
    fixture_host: PluginHost,
    monkeypatch: pytest.MonkeyPatch,
):
    from speculators_core.cli.eval_cmd import eval_command

    unserved = _host_with(replace(fixture_host.algorithm("fixture-mlp"), vllm=None))
    monkeypatch.setattr(
        "speculators_core.evaluate.evaluation.evaluate_reference",
        lambda *a, **k: pytest.fail("the reference engine must not run first"),
    )
    args = [str(fixture_draft), "--verifier", str(tiny_verifier), "--engine", "both"]
    result = CliRunner().invoke(
        eval_command, [*args, "--output", str(fixture_draft / "eval")], obj=unserved
    )
    assert result.exit_code == 1
    assert "vLLM cannot serve algorithm 'fixture-mlp'" in str(result.exception)
    assert not (fixture_draft / "eval").exists()
