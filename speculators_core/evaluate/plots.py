"""PNG plots of evaluation results (matplotlib, headless)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from speculators_core.fsutil import atomic_file

__all__ = ["plot_acceptance"]


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
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
