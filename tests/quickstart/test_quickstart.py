"""``speculators quickstart`` end to end on a tiny verifier: stages, budget, report, resume, errors.

The real run (SmolLM2, ShareGPT, vLLM) is the README's first command and is measured in
``benchmarks/README.md``; here every stage runs for real on a tiny random Llama with the
transformers backends, in about a minute.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from _support import run_cli
from safetensors.torch import load_file

from speculators_core.data.prepared import PreparedDataset
from speculators_core.data.store import ShardStore
from speculators_core.testing import make_tiny_verifier

pytest.importorskip("speculators_eagle3")

BUDGET_MINUTES = 0.6
RESERVE_MINUTES = 0.1
QUESTIONS = [
    "How do plants grow?",
    "Tell me about the sea.",
    "What is a good breakfast?",
    "Why is the sky blue?",
    "Name three colours.",
    "How do I bake bread?",
    "What do cats eat?",
    "Explain rain to a child.",
    "Where do birds sleep?",
    "Write a line about the moon.",
    "What is music?",
    "How far is the sun?",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("quickstart")
    make_tiny_verifier(root / "verifier", num_layers=8)
    with (root / "chats.jsonl").open("w") as handle:
        for q in QUESTIONS:
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": "ok."}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    (root / "prompts.txt").write_text("How do trees drink?\nWhat is snow?\nTell me a fact.\n")
    return root


def _args(root: Path, output: Path, *extra: str) -> list[str]:
    return [
        "quickstart",
        "--verifier",
        str(root / "verifier"),
        "--data",
        str(root / "chats.jsonl"),
        "--output",
        str(output),
        "--budget-minutes",
        str(BUDGET_MINUTES),
        "--eval-reserve-minutes",
        str(RESERVE_MINUTES),
        "--samples",
        "12",
        "--max-new-tokens",
        "24",
        "--draft-vocab-size",
        "64",
        "--train-seq-len",
        "256",
        "--no-vllm-eval",
        "--no-server-eval",
        "--prompts",
        str(root / "prompts.txt"),
        "--eval-prompts",
        "3",
        "--eval-max-new-tokens",
        "16",
        *extra,
    ]


@pytest.fixture(scope="module")
def finished_run(workdir: Path) -> tuple[Path, str]:
    out = workdir / "run"
    result = run_cli(_args(workdir, out), env={"SPECULATORS_STRICT_PLUGINS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_quickstart_writes_a_served_draft_and_a_consistent_report(finished_run):
    out, stdout = finished_run
    report = json.loads((out / "report.json").read_text())
    state = json.loads((out / "quickstart.json").read_text())

    # Every stage ran once and recorded itself.
    assert set(state["stages"]) == {
        "data",
        "hidden-states",
        "vocab",
        "train-plan",
        "train",
        "eval",
        "serve",
        "report",
    }
    # --no-server-eval: the speed stage is recorded as skipped, and the report has no speed.
    assert state["stages"]["serve"]["skipped"] == "switched off (--no-server-eval)"
    assert state["stages"]["data"]["regenerated"] is True
    assert state["stages"]["data"]["samples"] == 12
    # The default route answers and captures in one pass: the store holds every sample.
    assert state["stages"]["data"]["backend"] == "one-pass"
    assert state["stages"]["hidden-states"]["one_pass"] is True
    assert len(ShardStore.open(out / "data" / "store")) == 12

    # The budget decides the step count: what is left after data, reserve and calibration,
    # divided by the calibrated step time (recomputed here from the recorded facts).
    plan = state["stages"]["train-plan"]
    spent = sum(state["stages"][s]["seconds"] for s in ("data", "hidden-states", "vocab"))
    left = BUDGET_MINUTES * 60 - spent - RESERVE_MINUTES * 60 - plan["seconds"]
    assert plan["max_steps"] == max(10, int(left / plan["seconds_per_step"]))
    assert state["stages"]["train"]["steps"] == plan["max_steps"]

    # The served folder is the trained one, and it passes the vLLM contract linter.
    speculator = out / "speculator"
    got = load_file(speculator / "model.safetensors")
    want = load_file(out / "train" / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)
    lint = run_cli(["check", str(speculator)])
    assert lint.returncode == 0, lint.stdout + lint.stderr

    # The evaluation: the reference decoder measured it (vLLM was switched off); the mean
    # acceptance length is one verified token plus the per-position acceptance rates.
    result, sampled = report["evaluation"]
    assert report["measured_by"] == result["engine"] == "reference"
    assert result["temperature"] == 0.0
    rates = result["acceptance_rate_per_position"]
    assert len(rates) == 3
    assert report["mean_acceptance_length"] == pytest.approx(1 + sum(rates), abs=1e-9)
    assert all(
        a >= b for a, b in itertools.pairwise(rates)
    )  # a chain: later positions need earlier
    # ... and again at temperature 1 on the same prompts, reported beside the greedy figure.
    assert sampled["engine"] == "reference" and sampled["temperature"] == 1.0
    assert sampled["proposal"] == "greedy"
    tau_sampled = 1 + sum(sampled["accepted_per_position"]) / sampled["rounds"]
    assert report["mean_acceptance_length_temperature_1"] == pytest.approx(tau_sampled, abs=1e-9)
    assert "at temperature 1 (reference decoder)" in stdout

    # The training curve is the metrics log, step for step.
    records = [
        json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [(r["train_seconds"] / 60, r["loss"]) for r in records if "loss" in r]
    assert report["training_curves"]["loss"] == [list(p) for p in losses]
    assert "val_est_accept_len" in report["training_curves"]

    for png in ("acceptance.png", "training.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "serve it with:" in stdout and str(speculator) in stdout
    assert str(speculator) in report["serve_command"]
    assert report["speedup"] is None and report["chosen_k"] is None  # --no-server-eval


@pytest.mark.parametrize("flag", ["--resume", None])
def test_rerun_of_a_finished_run_redoes_nothing(finished_run, workdir, flag):
    """The same command again (with or without --resume) continues the run: nothing is left."""
    out, _ = finished_run
    store = out / "data" / "store"
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    weights = (out / "speculator" / "model.safetensors").read_bytes()
    result = run_cli(_args(workdir, out, *([flag] if flag else [])))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "continuing the run" in result.stdout
    assert "[data]" not in result.stdout and "[train]" not in result.stdout
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == before
    assert (out / "speculator" / "model.safetensors").read_bytes() == weights


def test_interrupted_training_resumes_to_the_same_weights(finished_run, workdir):
    """Forget every stage from training on: --resume trains again to the same final weights."""
    import shutil

    out, _ = finished_run
    want = load_file(out / "speculator" / "model.safetensors")
    state_file = out / "quickstart.json"
    state = json.loads(state_file.read_text())
    for stage in ("train", "eval", "serve", "report"):
        del state["stages"][stage]
    state_file.write_text(json.dumps(state))
    shutil.rmtree(out / "speculator")
    shutil.rmtree(out / "train" / "final")
    result = run_cli(_args(workdir, out, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[data]" not in result.stdout and "[train]" in result.stdout
    got = load_file(out / "speculator" / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--samples", "5"), "was started with samples=12, not 5"),
        (("--resume", "--overwrite"), "contradict each other"),
    ],
)
def test_bad_runs_are_refused_with_one_line(finished_run, workdir, extra, message):
    out, _ = finished_run
    args = _args(workdir, out)
    # Later flags win: replace --samples 12 by the case's value where given.
    if "--samples" in extra:
        i = args.index("--samples")
        del args[i : i + 2]
    before = sorted(os.listdir(out))
    result = run_cli([*args, *extra])
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert sorted(os.listdir(out)) == before


def test_a_folder_that_is_not_a_quickstart_run_is_refused(workdir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = run_cli(_args(workdir, out))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "is not a quickstart run" in lines[0], result.stderr
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_missing_verifier_is_refused_before_any_output(workdir, tmp_path):
    out = tmp_path / "never"
    args = _args(workdir, out)
    args[args.index("--verifier") + 1] = str(tmp_path / "no-such-model")
    result = run_cli(args)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no-such-model" in lines[0], result.stderr
    assert not out.exists()


def test_two_pass_route_regenerates_then_captures(workdir, tmp_path):
    """``--generation-backend transformers``: answers first, then a separate capture stage."""
    out = tmp_path / "two-pass"
    args = _args(workdir, out, "--generation-backend", "transformers")
    args[args.index("--samples") + 1] = "6"
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((out / "quickstart.json").read_text())
    assert "backend" not in state["stages"]["data"]
    assert "one_pass" not in state["stages"]["hidden-states"]
    store = ShardStore.open(out / "data" / "store")
    prepared = PreparedDataset.open(out / "data" / "prepared")
    assert len(store) == len(prepared) == 6
    assert [store[i]["input_ids"].tolist() for i in range(6)] == [
        prepared[i]["input_ids"].tolist() for i in range(6)
    ]


def test_the_quickstart_makes_a_peagle_draft(workdir, tmp_path):
    """``--algorithm peagle``: the same stages make a P-EAGLE draft (mask token recorded, k
    tokens drafted per forward) that the reference decoder measures."""
    out = tmp_path / "peagle"
    args = _args(workdir, out, "--algorithm", "peagle", "--algo-opt", "num_depths=3")
    args[args.index("--samples") + 1] = "6"
    result = run_cli(args, env={"SPECULATORS_STRICT_PLUGINS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "speculator" / "config.json").read_text())
    assert config["speculators_model_type"] == "peagle"
    assert isinstance(config["mask_token_id"], int)
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["algorithm"] == "peagle"
    assert report["settings"]["algo_options"]["num_depths"] == 3
    assert report["measured_by"] == "reference" and report["mean_acceptance_length"] >= 1.0


def test_the_quickstart_makes_a_dflash_draft(workdir, tmp_path):
    """``--algorithm dflash`` (another plugin distribution): the same stages, unshifted data."""
    pytest.importorskip("speculators_dflash")
    out = tmp_path / "dflash"
    args = _args(
        workdir, out, "--algorithm", "dflash", "--algo-opt", "block_size=4",
        "--algo-opt", "max_anchors=16",
    )  # fmt: skip
    args[args.index("--samples") + 1] = "6"
    result = run_cli(args, env={"SPECULATORS_STRICT_PLUGINS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "speculator" / "config.json").read_text())
    assert config["speculators_model_type"] == "dflash" and config["block_size"] == 4
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["algorithm"] == "dflash"
    assert report["measured_by"] == "reference" and report["mean_acceptance_length"] >= 1.0
