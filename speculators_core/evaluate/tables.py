"""Plain-text tables of evaluation results (what ``speculators eval`` and the quickstart print)."""

from __future__ import annotations

from typing import Any

__all__ = ["columns", "served_table"]


def columns(header: list[str], rows: list[list[str]]) -> list[str]:
    """The header and rows as left-aligned columns two spaces apart."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [header, *rows]]


def served_table(report: dict[str, Any]) -> list[str]:
    """The lines ``eval --engine vllm-server`` prints: one row per configuration and level."""
    header = ["config", "k", "conc.", "tok/s", "TTFT ms", "ITL ms", "speed-up", "vs n-gram", "tau"]
    rows: list[list[str]] = []

    def add(name: str, k: str, measured: dict[str, Any], up: Any, vs: Any) -> None:
        tau = measured.get("mean_acceptance_length")
        for c, level in measured["levels"].items():
            rows.append(
                [
                    name,
                    k,
                    c,
                    f"{level['tokens_per_s_median']:.1f}",
                    f"{level['ttft_median_s'] * 1000:.0f}",
                    f"{level['itl_median_s'] * 1000:.1f}",
                    f"{up[c]:.2f}x" if up else "-",
                    f"{vs[c]:.2f}x" if vs else "-",
                    f"{tau:.3f}" if tau is not None else "-",
                ]
            )

    add("verifier", "-", report["verifier_alone"], None, None)
    for k, measured in report["draft"].items():
        add("draft", k, measured, measured["speedup"], measured["speedup_vs_ngram"])
    ngram = report["ngram"]
    add("n-gram", str(ngram["k"]), ngram, ngram["speedup"], None)
    lines = columns(header, rows)
    chosen = str(report["chosen_k"])
    best = report["draft"][chosen]
    if report["pays"]:
        lines.append(
            f"fastest k at concurrency 1: {chosen} ({best['speedup']['1']:.2f}x the verifier "
            f"alone, {best['speedup_vs_ngram']['1']:.2f}x n-gram lookup)"
        )
    else:
        tau = best["mean_acceptance_length"]
        lines.append(
            f"the draft does not pay at any k measured here: best {best['speedup']['1']:.2f}x "
            f"at k={chosen} (tau {tau:.2f}); a drafting round costs more than the "
            f"{tau - 1:.2f} extra tokens it gains per verifier step"
            if tau is not None
            else f"the draft does not pay at any k measured here (best k={chosen})"
        )
    if not all(d["identical_to_verifier"] for d in report["draft"].values()):
        lines.append("warning: a draft's outputs differ from the verifier's (should be lossless)")
    return lines
