"""The quickstart's serve stage on a tiny verifier: real ``vllm serve`` servers, one at a time.

The run ends with the speed measurement a user feels (one request at a time over HTTP): every
figure of the report's speed section is re-derived here from ``serve/server.json``, the chosen k
is the fastest measured, the printed serve line uses it, and the two PNGs are written.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from _support import check_served_report, run_cli

from speculators_core.evaluate.vllm_env import vllm_available
from speculators_core.testing import make_tiny_verifier

pytest.importorskip("speculators_eagle3")
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed"),
]

QUESTIONS = [
    "How do plants grow?",
    "Tell me about the sea.",
    "What is a good breakfast?",
    "Why is the sky blue?",
    "Name three colours.",
    "How do I bake bread?",
    "What do cats eat?",
    "Explain rain to a child.",
]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def served_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("quickstart-serve")
    # Two heads sharing one KV head: a shape vLLM's CPU attention serves.
    make_tiny_verifier(root / "verifier", num_layers=8, num_heads=2, num_kv_heads=1)
    with (root / "chats.jsonl").open("w") as handle:
        for q in QUESTIONS:
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": "ok."}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    (root / "prompts.txt").write_text("How do trees drink?\nWhat is snow?\nTell me a fact.\n")
    out = root / "run"
    args = [
        "quickstart", "--verifier", str(root / "verifier"), "--data", str(root / "chats.jsonl"),
        "--output", str(out), "--budget-minutes", "0.4", "--eval-reserve-minutes", "0.1",
        "--samples", "8", "--max-new-tokens", "16", "--draft-vocab-size", "64",
        "--train-seq-len", "128", "--no-vllm-eval", "--no-reference-eval",
        "--prompts", str(root / "prompts.txt"), "--eval-prompts", "3",
        "--eval-max-new-tokens", "16", "-k", "2",
        "--server-k-values", "1,2", "--server-concurrency", "2", "--server-prompts", "2",
    ]  # fmt: skip
    result = run_cli(args, env={"SPECULATORS_STRICT_PLUGINS": "1"}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_the_report_speed_is_the_served_concurrency_one_speedup_at_the_fastest_k(served_run):
    out, stdout = served_run
    report = json.loads((out / "report.json").read_text())
    served = json.loads((out / "serve" / "server.json").read_text())
    state = json.loads((out / "quickstart.json").read_text())
    assert "serve" in state["stages"] and "skipped" not in state["stages"]["serve"]

    # Every server answered every prompt at each level, losslessly; every figure re-derived.
    chosen = check_served_report(served, ks=[1, 2], levels=[2], prompts=2, new_tokens=16)
    assert report["chosen_k"] == chosen
    alone_rate = served["verifier_alone"]["levels"]["1"]["tokens_per_s_median"]
    rates = {k: served["draft"][str(k)]["levels"]["1"]["tokens_per_s_median"] for k in (1, 2)}
    assert report["speedup"] == pytest.approx(rates[chosen] / alone_rate)
    assert report["serving"]["pays"] == (report["speedup"] > 1)
    assert report["serving"]["speedup_by_k"] == {
        k: pytest.approx(served["draft"][k]["speedup"]["1"]) for k in ("1", "2")
    }
    assert (
        report["serving"]["mean_acceptance_length"]
        == served["draft"][str(chosen)]["mean_acceptance_length"]
    )

    # The serve line uses the chosen k; the draft records it only when it pays.
    argv = shlex.split(report["serve_command"])
    config = json.loads(argv[argv.index("--speculative-config") + 1])
    assert config["num_speculative_tokens"] == chosen
    assert report["serve_command"] in stdout
    recorded = json.loads((out / "speculator" / "config.json").read_text())
    k_now = recorded["speculators_config"]["proposal_methods"][0]["speculative_tokens"]
    assert k_now == (chosen if report["serving"]["pays"] else 2)

    for png in ("speedup_vs_k.png", "speedup_vs_concurrency.png"):
        assert (out / png).read_bytes()[:8] == PNG
    assert f"at the fastest k={chosen}" in stdout
    assert "speedup_vs_k.png" in stdout


def test_a_rerun_keeps_the_measurement_and_starts_no_server(served_run):
    out, _ = served_run
    before = (out / "serve" / "server.json").read_bytes()
    logs = sorted((out / "serve" / "logs").iterdir())
    result = run_cli(
        ["quickstart", "--output", str(out), "--resume", "--verifier", str(out.parent / "verifier"),
         "--data", str(out.parent / "chats.jsonl"), "--samples", "8", "--max-new-tokens", "16",
         "--draft-vocab-size", "64", "--train-seq-len", "128", "-k", "2", "--budget-minutes", "0.4"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[serve]" not in result.stdout
    assert (out / "serve" / "server.json").read_bytes() == before
    assert sorted((out / "serve" / "logs").iterdir()) == logs
    assert "at the fastest k=" in result.stdout
