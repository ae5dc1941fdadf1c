"""What each proposal method asks of vLLM: the speculative_config keys a job sends, and the
refusals (before any engine starts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from speculators_core import PluginHost, get_host
from speculators_core.evaluate.vllm_runner import VllmError, VllmJob, _job_request, proposal_config


@pytest.fixture(scope="module")
def draft(tiny_verifier: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    eagle3 = pytest.importorskip("speculators_eagle3")
    folder = tmp_path_factory.mktemp("draft") / "eagle3"
    eagle3.Eagle3DraftModel.from_verifier(tiny_verifier, aux_layer_ids=[1, 2, 3]).save_pretrained(
        folder
    )
    return folder


@pytest.mark.parametrize(
    "name, device, keys",
    [
        ("greedy", "cpu", {}),
        ("sampled", "cpu", {"draft_sample_method": "probabilistic"}),
        ("sampled", "gpu", {"draft_sample_method": "probabilistic"}),
        (
            "block",
            "gpu",
            {"draft_sample_method": "probabilistic", "rejection_sample_method": "block"},
        ),
    ],
)
def test_a_job_sends_the_methods_keys(
    name: str, device: str, keys: dict, draft: Path, tiny_verifier: Path
) -> None:
    method = get_host().proposal_method(name)
    job = VllmJob(
        verifier=tiny_verifier, draft=draft, prompts=[[1, 2]], k=2, max_new_tokens=4,
        host=PluginHost(), proposal=method,
    )  # fmt: skip
    config = _job_request(job, device)["engine"]["speculative_config"]
    assert config["method"] == "eagle3" and config["num_speculative_tokens"] == 2
    assert {k: config[k] for k in keys} == keys
    assert not {"draft_sample_method", "rejection_sample_method"} - set(keys) & set(config)


def test_block_is_refused_on_a_cpu_and_a_method_without_vllm_everywhere() -> None:
    block = get_host().proposal_method("block")
    with pytest.raises(VllmError, match=r"not served by vLLM for CPU: .*rejection_sampler\.py"):
        proposal_config(block, "cpu")
    from dataclasses import replace

    nowhere = replace(block, name="tree-like", vllm=None)
    for device in ("cpu", "gpu"):
        with pytest.raises(VllmError, match="'tree-like' has no vLLM equivalent"):
            proposal_config(nowhere, device)


def test_serve_adds_the_methods_keys_and_refuses_block_on_a_cpu(
    draft: Path, proposals_host: PluginHost
) -> None:
    import json
    import shlex

    from click.testing import CliRunner

    from speculators_core.cli.serve import serve_command

    host = proposals_host
    runner = CliRunner()
    args = [str(draft), "--print-only", "--no-check", "--k", "2"]
    sampled = runner.invoke(
        serve_command, [*args, "--device", "cpu", "--proposal", "sampled"], obj=host
    )
    assert sampled.exit_code == 0, sampled.output
    argv = shlex.split(sampled.stdout.strip().splitlines()[-1])
    config = json.loads(argv[argv.index("--speculative-config") + 1])
    assert (
        config["draft_sample_method"] == "probabilistic" and config["num_speculative_tokens"] == 2
    )
    block = runner.invoke(
        serve_command, [*args, "--device", "cpu", "--proposal", "block"], obj=host
    )
    assert block.exit_code == 1 and "not served by vLLM for CPU" in str(block.exception)
    on_gpu = runner.invoke(
        serve_command, [*args, "--device", "gpu", "--proposal", "block"], obj=host
    )
    assert on_gpu.exit_code == 0, on_gpu.output
    argv = shlex.split(on_gpu.stdout.strip().splitlines()[-1])
    config = json.loads(argv[argv.index("--speculative-config") + 1])
    assert config["rejection_sample_method"] == "block"


def test_a_draft_recording_a_method_is_served_and_evaluated_with_it(
    tiny_verifier: Path, proposals_host: PluginHost, tmp_path: Path
) -> None:
    """``proposal_methods: [sampled]`` round-trips (extra fields too), passes check, and is what
    ``serve`` and ``eval`` use when no --proposal is given."""
    import json
    import shlex

    from click.testing import CliRunner
    from speculators_eagle3 import Eagle3DraftModel
    from speculators_proposals import SampledTokenProposalConfig

    from speculators_core import SpeculatorsConfig, load_speculator
    from speculators_core.check import check_checkpoint
    from speculators_core.cli.eval_cmd import eval_command
    from speculators_core.cli.serve import serve_command

    model = Eagle3DraftModel.from_verifier(tiny_verifier, aux_layer_ids=[1, 2, 3])
    recorded = model.config.speculators_config
    model.config.speculators_config = SpeculatorsConfig(
        algorithm=recorded.algorithm,
        proposal_methods=[SampledTokenProposalConfig(speculative_tokens=2, note="kept")],
        default_proposal_method="sampled",
        verifier=recorded.verifier,
    )
    folder = tmp_path / "draft"
    model.save_pretrained(folder)
    stored = json.loads((folder / "config.json").read_text())["speculators_config"]
    assert stored["proposal_methods"] == [
        {"proposal_type": "sampled", "speculative_tokens": 2, "note": "kept"}
    ]
    loaded = load_speculator(folder, host=proposals_host, verifier=tiny_verifier)
    assert loaded.config.speculators_config.proposal_methods[0].note == "kept"
    assert check_checkpoint(folder, host=proposals_host).findings == []

    served = CliRunner().invoke(
        serve_command, [str(folder), "--print-only", "--no-check", "--device", "cpu"],
        obj=proposals_host,
    )  # fmt: skip
    assert served.exit_code == 0, served.output
    argv = shlex.split(served.stdout.strip().splitlines()[-1])
    config = json.loads(argv[argv.index("--speculative-config") + 1])
    assert (
        config["draft_sample_method"] == "probabilistic" and config["num_speculative_tokens"] == 2
    )

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Name a colour."}) + "\n")
    evaluated = CliRunner().invoke(
        eval_command,
        [str(folder), "--prompts", str(prompts), "--num-prompts", "1", "-k", "2",
         "--max-new-tokens", "4", "--temperature", "1", "--output", str(tmp_path / "eval")],
        obj=proposals_host,
    )  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["proposal"] == "sampled" and report["results"][0]["proposal"] == "sampled"
