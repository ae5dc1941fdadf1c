"""The quickstart's report: ``report.json``, ``acceptance.png``, ``training.png``, the serve line.

The speed PNGs (``speedup_vs_k.png``, ``speedup_vs_concurrency.png``) are written by the serve
stage, next to them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speculators_core.errors import SpeculatorsError
from speculators_core.fsutil import atomic_file
from speculators_core.quickstart.settings import QuickstartSettings

if TYPE_CHECKING:
    from speculators_core.plugins.host import PluginHost

__all__ = ["plot_training", "serve_command", "training_curves", "write_report"]

REPORT_NAME = "report.json"


def serve_command(speculator: Path, host: PluginHost, *, k: int | None = None) -> str:
    """The shell line that serves ``speculator`` with vLLM (the CPU settings included on a CPU).

    The method comes from the algorithm's record in ``host``; ``k`` replaces the recorded
    number of draft tokens (the quickstart passes the k its serve stage chose). When vLLM
    cannot serve the algorithm, the line says so instead (the run itself is fine).
    """
    from speculators_core.cli.serve import build_serve_command

    try:
        return build_serve_command(speculator, plugin_host=host, k=k).shell()
    except SpeculatorsError as err:
        return f"(no vllm serve command: {err})"


def training_curves(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """``(training minutes, value)`` series of the run's training loss and validation metrics.

    Read from ``metrics.jsonl``; minutes are the sum of logged step times, so they measure
    training alone (validation and checkpoint writing excluded) and continue across a resume.
    """
    path = run_dir / "metrics.jsonl"
    curves: dict[str, list[tuple[float, float]]] = {}
    if not path.is_file():
        return curves
    minutes = 0.0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption
        if "loss" in record and "train_seconds" in record:
            minutes = float(record["train_seconds"]) / 60.0
            curves.setdefault("loss", []).append((minutes, float(record["loss"])))
        for key in ("val_loss", "val_est_accept_len"):
            if key in record:
                curves.setdefault(key, []).append((minutes, float(record[key])))
    return curves


def plot_training(curves: dict[str, list[tuple[float, float]]], path: Path, *, title: str) -> None:
    """Training loss and validation loss (left), validation acceptance estimate (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for key, label in (("loss", "training loss"), ("val_loss", "validation loss")):
        if curves.get(key):
            xs, ys = zip(*curves[key])
            left.plot(xs, ys, marker="." if key == "val_loss" else None, label=label)
    left.set_xlabel("training minutes")
    left.set_ylabel("loss (forward KL, summed over TTT steps)")
    left.legend(fontsize=8)
    if curves.get("val_est_accept_len"):
        xs, ys = zip(*curves["val_est_accept_len"])
        right.plot(xs, ys, marker="o")
    right.set_xlabel("training minutes")
    right.set_ylabel("estimated acceptance length (validation)")
    right.set_title("1 + sum of per-step full accuracies", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _speed(served: dict[str, Any] | None) -> dict[str, Any]:
    """The report's speed fields from the serve stage's measurement (None where not measured)."""
    if not served:
        return {"speedup": None, "chosen_k": None, "serving": None}
    chosen = str(served["chosen_k"])
    draft = served["draft"][chosen]
    return {
        # One request at a time through vllm serve: the latency speculative decoding is for.
        "speedup": draft["speedup"]["1"],
        "chosen_k": int(chosen),
        "serving": {
            "pays": served["pays"],
            "tokens_per_s": draft["levels"]["1"]["tokens_per_s_median"],
            "verifier_tokens_per_s": served["verifier_alone"]["levels"]["1"]["tokens_per_s_median"],
            "mean_acceptance_length": draft["mean_acceptance_length"],
            "identical_to_verifier": draft["identical_to_verifier"],
            "speedup_vs_ngram": draft["speedup_vs_ngram"]["1"],
            "ngram_speedup": served["ngram"]["speedup"]["1"],
            "speedup_by_k": {k: d["speedup"]["1"] for k, d in served["draft"].items()},
            "speedup_by_concurrency": draft["speedup"],
            "prompts": served["prompts"],
            "max_new_tokens": served["max_new_tokens"],
            "plots": ["speedup_vs_k.png", "speedup_vs_concurrency.png"],
            "measurement": "serve/server.json",
        },
    }


def write_report(
    out: Path,
    stages: dict[str, dict[str, Any]],
    settings: QuickstartSettings,
    speculator: Path,
    results: list[dict[str, Any]],
    *,
    run_dir: Path,
    host: PluginHost,
    served: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``report.json`` and the two plots into ``out``; return the report.

    ``host`` is the plugin host that says how vLLM serves the algorithm (the serve line).
    ``served`` is the serve stage's measurement (``compare_served``'s report) or None: when
    given, the report's speed figure (``speedup``) is its concurrency-1 speed-up at the chosen
    k, and the serve line uses that k.
    """
    from speculators_core.evaluate.plots import plot_acceptance

    curves = training_curves(run_dir)
    total = sum(float(s.get("seconds", 0.0)) for s in stages.values())
    greedy = [r for r in results if not r.get("temperature")]
    sampled = [r for r in results if r.get("temperature")]
    by_engine = {r["engine"]: r for r in greedy}
    headline = by_engine.get("vllm") or by_engine.get("reference")
    report: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "speculator": str(speculator),
        "settings": settings.to_json(),
        "stage_seconds": {
            name: round(float(s.get("seconds", 0.0)), 1) for name, s in stages.items()
        },
        "total_seconds": round(total, 1),
        "data": stages.get("data", {}),
        "hidden_states": stages.get("hidden-states", {}),
        "vocab": stages.get("vocab", {}),
        "train": {**stages.get("train-plan", {}), **stages.get("train", {})},
        "training_curves": {k: [list(p) for p in v] for k, v in curves.items()},
        "evaluation": results,
        "mean_acceptance_length": headline["mean_acceptance_length"] if headline else None,
        "measured_by": headline["engine"] if headline else None,
        # tau when sampling at temperature 1 (reference decoder, the same prompts as its greedy
        # measurement): None when not measured
        "mean_acceptance_length_temperature_1": (
            sampled[0]["mean_acceptance_length"] if sampled else None
        ),
        **_speed(served),
        "serve_command": serve_command(
            speculator, host, k=int(served["chosen_k"]) if served else None
        ),
    }
    with atomic_file(out / REPORT_NAME) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    if results:

        def label(r: dict[str, Any]) -> str:
            return r["engine"] + (f" (T={r['temperature']:g})" if r.get("temperature") else "")

        plot_acceptance(
            {label(r): r["acceptance_rate_per_position"] for r in results},
            out / "acceptance.png",
            title=f"held-out acceptance per draft position (k={settings.k})",
            mean_lengths={label(r): r["mean_acceptance_length"] for r in results},
        )
    plot_training(curves, out / "training.png", title=f"{settings.algorithm} training")
    return report
