"""PNG plots of evaluation results (matplotlib, headless)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from speculators_core.fsutil import atomic_file

__all__ = ["plot_acceptance", "plot_served_speedups"]


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Lay out, write atomically as PNG, close; return the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def plot_acceptance(
    rates: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    *,
    title: str = "Per-position acceptance",
    mean_lengths: Mapping[str, float] | None = None,
) -> None:
    """Bar chart of acceptance rate per draft position, one bar group per engine.

    ``rates[name][i]`` is the fraction of drafting rounds whose drafted token ``i`` was accepted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rates)
    k = max(len(r) for r in rates.values())
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for j, name in enumerate(names):
        values = list(rates[name])
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(values))]
        label = name
        if mean_lengths and name in mean_lengths:
            label = f"{name} (mean acceptance length {mean_lengths[name]:.2f})"
        bars = ax.bar(xs, values, width=width, label=label)
        for bar, value in zip(bars, values):
            ax.annotate(
                f"{value:.2f}",
                (bar.get_x() + bar.get_width() / 2, value),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_xticks(range(k), [f"token {i + 1}" for i in range(k)])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accepted fraction of drafting rounds")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    _save(fig, path)


def plot_served_speedups(report: Mapping[str, Any], folder: str | os.PathLike[str]) -> list[Path]:
    """The two PNGs of a served measurement (``compare_served``'s report), written into ``folder``.

    ``speedup_vs_k.png``: the draft's concurrency-1 speed-up over the verifier alone at each k
    measured, the chosen k marked, n-gram lookup and 1.0 (no gain) as reference lines.
    ``speedup_vs_concurrency.png``: the speed-up at each concurrency level, one line per k and
    one for n-gram lookup. Speed-ups are ratios of per-request median output tokens/s.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(folder)
    drafts = report["draft"]
    ks = sorted(int(k) for k in drafts)
    chosen = int(report["chosen_k"])
    ngram = report["ngram"]
    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ups = [drafts[str(k)]["speedup"]["1"] for k in ks]
    ax.plot(ks, ups, marker="o", label="trained draft")
    for k, up in zip(ks, ups):
        tau = drafts[str(k)].get("mean_acceptance_length")
        note = f"{up:.2f}x" + (f" (tau {tau:.2f})" if tau is not None else "")
        ax.annotate(
            note, (k, up), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8
        )
    ax.scatter(
        [chosen],
        [drafts[str(chosen)]["speedup"]["1"]],
        s=160,
        facecolors="none",
        edgecolors="red",
        label=f"chosen k = {chosen}",
    )
    ax.axhline(1.0, color="grey", linestyle=":", label="verifier alone")
    ax.axhline(
        ngram["speedup"]["1"],
        color="black",
        linestyle="--",
        label=f"n-gram lookup (k = {ngram['k']})",
    )
    ax.set_xticks(ks)
    ax.set_xlim(ks[0] - 0.5, ks[-1] + 0.5)  # room for the labels at both ends
    ax.margins(y=0.2)
    ax.set_xlabel("draft tokens per round (k)")
    ax.set_ylabel("speed-up over the verifier alone")
    ax.set_title("vllm serve, one request at a time (output tokens/s per request)", fontsize=9)
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "speedup_vs_k.png"))

    levels = [int(c) for c in report["concurrencies"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for k in ks:
        ax.plot(
            levels,
            [drafts[str(k)]["speedup"][str(c)] for c in levels],
            marker="o",
            linewidth=2.5 if k == chosen else 1.2,
            alpha=1.0 if k == chosen else 0.6,
            label=f"draft k = {k}" + (" (chosen)" if k == chosen else ""),
        )
    ax.plot(
        levels,
        [ngram["speedup"][str(c)] for c in levels],
        marker="s",
        linestyle="--",
        color="black",
        label=f"n-gram lookup (k = {ngram['k']})",
    )
    ax.axhline(1.0, color="grey", linestyle=":", label="verifier alone")
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("requests in flight (concurrency)")
    ax.set_ylabel("speed-up over the verifier alone")
    ax.set_title(
        "vllm serve: per-request output tokens/s (median), against concurrency", fontsize=9
    )
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "speedup_vs_concurrency.png"))
    return written
