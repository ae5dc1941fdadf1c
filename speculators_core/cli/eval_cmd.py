"""``speculators eval DRAFT``: acceptance and speed of a speculator, by the reference decoder or vLLM."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from speculators_core.errors import SpeculatorsError

__all__ = ["eval_command", "resolve_verifier"]


def resolve_verifier(draft_dir: Path, verifier: str | None) -> Path:
    """The verifier folder: ``--verifier`` or the draft config's ``verifier.name_or_path``."""
    if verifier is None:
        from speculators_core.config import read_config_dict

        recorded = (read_config_dict(draft_dir).get("speculators_config") or {}).get("verifier", {})
        verifier = recorded.get("name_or_path") if isinstance(recorded, dict) else None
        if not verifier:
            raise SpeculatorsError(f"'{draft_dir}' records no verifier; pass --verifier DIR")
    from speculators_core.assets import resolve_verifier_path

    path = resolve_verifier_path(verifier)
    if not (path / "config.json").is_file():
        raise SpeculatorsError(
            f"verifier '{verifier}' is not a local model folder (hub downloads are not supported); pass --verifier DIR"
        )
    return path


def _print_table(reports: list[dict[str, Any]]) -> None:
    k = reports[0]["k"]
    header = [
        "engine",
        "mean acc. length",
        *[f"pos {i + 1}" for i in range(k)],
        "tok/s",
        "speed-up",
    ]
    rows = []
    for r in reports:
        rates = r["acceptance_rate_per_position"]
        speedup = r.get("speedup")
        rows.append(
            [
                r["engine"],
                f"{r['mean_acceptance_length']:.3f}",
                *[f"{x:.3f}" for x in rates],
                f"{r['tokens_per_second']:.1f}",
                f"{speedup:.2f}x" if speedup is not None else "-",
            ]
        )
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


@click.command("eval")
@click.argument("draft", type=click.Path(path_type=Path))
@click.option(
    "--verifier",
    default=None,
    help="Verifier model folder (default: the one recorded in the draft's config).",
)
@click.option(
    "--prompts",
    "prompt_source",
    default="sharegpt-heldout",
    show_default=True,
    help="'sharegpt-heldout' (first user turn of held-out ShareGPT records) or a .txt/.jsonl/.json file.",
)
@click.option("--num-prompts", default=32, show_default=True, help="How many prompts to evaluate.")
@click.option(
    "--engine",
    type=click.Choice(["reference", "vllm", "both"]),
    default="reference",
    show_default=True,
    help="The reference decoder (transformers), vLLM, or both side by side.",
)
@click.option(
    "-k",
    "--num-speculative-tokens",
    "k",
    default=3,
    show_default=True,
    help="Draft tokens per round.",
)
@click.option(
    "--temperature",
    default=0.0,
    show_default=True,
    help="0 = greedy; > 0 samples with rejection sampling.",
)
@click.option(
    "--max-new-tokens", default=128, show_default=True, help="Tokens to generate per prompt."
)
@click.option(
    "--max-prompt-tokens",
    default=1024,
    show_default=True,
    help="Longer prompts keep their last tokens.",
)
@click.option("--seed", default=0, show_default=True, help="Seed for sampling.")
@click.option(
    "--baseline/--no-baseline",
    default=True,
    show_default=True,
    help="Also decode with the verifier alone (speed-up and greedy identity).",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder for eval.json and acceptance.png (default: DRAFT/eval).",
)
def eval_command(
    draft: Path,
    verifier: str | None,
    prompt_source: str,
    num_prompts: int,
    engine: str,
    k: int,
    temperature: float,
    max_new_tokens: int,
    max_prompt_tokens: int,
    seed: int,
    baseline: bool,
    output: Path | None,
) -> None:
    """Measure a speculator's acceptance (mean acceptance length, per position) and speed.

    Prints a table and writes OUTPUT/eval.json and OUTPUT/acceptance.png.
    """
    from speculators_core.cli.plugin_host import command_host
    from speculators_core.evaluate.evaluation import evaluate_reference, evaluate_vllm
    from speculators_core.evaluate.plots import plot_acceptance
    from speculators_core.evaluate.prompts import load_prompt_texts, render_prompts
    from speculators_core.fsutil import atomic_file

    if not (draft / "config.json").is_file():
        raise SpeculatorsError(f"'{draft}' is not a speculator folder (no config.json)")
    if k < 1 or max_new_tokens < 1:
        raise SpeculatorsError("-k and --max-new-tokens must be at least 1")
    verifier_dir = resolve_verifier(draft, verifier)
    if engine in ("vllm", "both"):
        from speculators_core.evaluate.vllm_runner import vllm_serving

        # An algorithm vLLM cannot serve stops here, in one line, before any decoding.
        vllm_serving(draft, command_host())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(verifier_dir)
    prompts = render_prompts(
        load_prompt_texts(prompt_source, num_prompts),
        tokenizer,
        max_prompt_tokens=max_prompt_tokens,
    )
    eos = {int(t) for t in ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}
    started = time.time()
    reports = []
    if engine in ("reference", "both"):
        reports.append(
            evaluate_reference(
                draft,
                verifier_dir,
                prompts,
                k=k,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                seed=seed,
                eos=eos,
                baseline=baseline,
                host=command_host(),
            )
        )
    if engine in ("vllm", "both"):
        reports.append(
            evaluate_vllm(
                draft,
                verifier_dir,
                prompts,
                k=k,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                seed=seed,
                baseline=baseline,
                host=command_host(),
            )
        )
    _print_table(reports)
    out_dir = output or draft / "eval"
    summary = {
        "draft": str(draft),
        "verifier": str(verifier_dir),
        "prompts": prompt_source,
        "num_prompts": len(prompts),
        "k": k,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "wall_s": time.time() - started,
        "results": reports,
    }
    with atomic_file(out_dir / "eval.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    plot_acceptance(
        {r["engine"]: r["acceptance_rate_per_position"] for r in reports},
        out_dir / "acceptance.png",
        title=f"{draft.name}: per-position acceptance (k={k}, T={temperature})",
        mean_lengths={r["engine"]: r["mean_acceptance_length"] for r in reports},
    )
    click.echo(f"wrote {out_dir / 'eval.json'} and {out_dir / 'acceptance.png'}")
