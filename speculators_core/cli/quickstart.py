"""``speculators quickstart``: the whole pipeline on the embedded default (or your own model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from speculators_core.quickstart.settings import (
    DEFAULT_MAX_NEW_TOKENS,
    GENERATION_BACKENDS,
    SAMPLES_PER_BUDGET_MINUTE,
)

__all__ = ["quickstart_command"]


@click.command("quickstart")
@click.option(
    "--verifier",
    default="smollm2",
    show_default=True,
    help="Verifier model folder, or 'smollm2' (SmolLM2-135M-Instruct, embedded).",
)
@click.option(
    "--algorithm",
    default="eagle3",
    show_default=True,
    help="Algorithm to train (an installed plugin's name; see 'speculators plugins').",
)
@click.option(
    "--data",
    "data",
    multiple=True,
    default=("sharegpt",),
    show_default=True,
    help="Chat data: 'sharegpt' (built in, training split), .json/.jsonl/.parquet/.arrow/.csv files or folders, or a datasets name (hf:NAME, or owner/name; streamed). Repeatable.",
)
@click.option(
    "--data-split",
    default=None,
    help="Split (default: train) of each datasets source among --data.",
)
@click.option(
    "--data-config",
    default=None,
    help="Configuration of each datasets source among --data.",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default=Path("quickstart-output"),
    show_default=True,
    help="Run folder: data/, train/, speculator/ (the draft), report.json and the plots.",
)
@click.option(
    "--budget-minutes",
    type=float,
    default=30.0,
    show_default=True,
    help="Wall-clock budget of the whole run; training gets what data and evaluation leave.",
)
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=None,
    help=f"Training conversations (default: {SAMPLES_PER_BUDGET_MINUTE} per budget minute).",
)
@click.option(
    "--regenerate/--no-regenerate",
    default=True,
    show_default=True,
    help="Answer each conversation's first user turn again with the verifier (greedy).",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_NEW_TOKENS,
    show_default=True,
    help="Tokens per regenerated answer.",
)
@click.option("--draft-vocab-size", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option(
    "-k",
    "--num-speculative-tokens",
    "k",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Draft tokens per round (served and evaluated).",
)
@click.option(
    "--ttt-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Training-time-test steps: shorthand for --algo-opt ttt_steps=N, for algorithms that "
    "declare that option (eagle3; default: the algorithm's, 3 for eagle3).",
)
@click.option(
    "--algo-opt",
    "algo_opt",
    multiple=True,
    metavar="KEY=VALUE",
    help="An option of the algorithm, as for 'speculators train --algo-opt' (its help lists "
    "them); checked and converted to the declared type before anything runs. Repeatable.",
)
@click.option(
    "--loss",
    default=None,
    metavar="SPEC",
    help="The training objective, as for 'speculators train --loss' (a name or a weighted mix "
    "such as kl=0.5,lk=0.5; 'speculators objectives' lists them). Default: the algorithm's.",
)
@click.option("--learning-rate", type=float, default=1e-3, show_default=True)
@click.option(
    "--optimizer",
    default="adamw",
    show_default=True,
    help="adamw, or muon (Muon on the hidden weight matrices, AdamW on the rest), or any "
    "torch.optim class by name, as for 'speculators train --optimizer'.",
)
@click.option(
    "--train-seq-len",
    type=click.IntRange(min=16),
    default=2048,
    show_default=True,
    help="Tokens per packed training row.",
)
@click.option(
    "--generation-backend",
    type=click.Choice(list(GENERATION_BACKENDS)),
    default="auto",
    show_default=True,
    help="Engine that regenerates answers: one-pass (transformers, records the hidden states "
    "while it writes the answers), or vllm/transformers followed by a capture pass (auto: "
    "one-pass).",
)
@click.option(
    "--prompts",
    "prompt_source",
    default="sharegpt-heldout",
    show_default=True,
    help="Evaluation prompts: 'sharegpt-heldout' (first user turn of held-out ShareGPT "
    "records) or a .txt/.jsonl/.json file.",
)
@click.option(
    "--eval-prompts",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Prompts evaluated.",
)
@click.option(
    "--eval-max-new-tokens",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Tokens generated per evaluation prompt.",
)
@click.option(
    "--eval-reserve-minutes",
    type=float,
    default=5.0,
    show_default=True,
    help="Minutes of the budget kept for evaluation and the report.",
)
@click.option(
    "--reference-eval/--no-reference-eval",
    default=True,
    show_default=True,
    help="Also measure acceptance with the reference decoder (transformers).",
)
@click.option(
    "--reference-prompts",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="The reference decoder measures the first N evaluation prompts (it decodes one at a "
    "time; vLLM measures all of them).",
)
@click.option(
    "--vllm-eval/--no-vllm-eval",
    default=True,
    show_default=True,
    help="Measure acceptance with vLLM (when installed).",
)
@click.option(
    "--server-eval/--no-server-eval",
    default=True,
    show_default=True,
    help="After the draft is made, measure its speed through 'vllm serve' (verifier alone, the "
    "draft at each --server-k-values, n-gram lookup; one server at a time) and choose k by it. "
    "Not part of --budget-minutes: about 1.5 min per server on a 2-core CPU.",
)
@click.option(
    "--server-k-values",
    default="1,2,3",
    show_default=True,
    help="The k measured by the serve stage; the fastest at concurrency 1 is chosen.",
)
@click.option(
    "--server-concurrency",
    default="1,4",
    show_default=True,
    help="Requests in flight for the serve stage (1 is always measured).",
)
@click.option(
    "--server-prompts",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="The serve stage sends the first N evaluation prompts at each concurrency level.",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --output.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output.")
def quickstart_command(
    verifier: str,
    algorithm: str,
    data: tuple[str, ...],
    data_split: str | None,
    data_config: str | None,
    output: Path,
    budget_minutes: float,
    samples: int | None,
    regenerate: bool,
    max_new_tokens: int,
    draft_vocab_size: int,
    k: int,
    ttt_steps: int | None,
    algo_opt: tuple[str, ...],
    loss: str | None,
    learning_rate: float,
    optimizer: str,
    train_seq_len: int,
    generation_backend: str,
    prompt_source: str,
    eval_prompts: int,
    eval_max_new_tokens: int,
    eval_reserve_minutes: float,
    reference_eval: bool,
    reference_prompts: int,
    vllm_eval: bool,
    server_eval: bool,
    server_k_values: str,
    server_concurrency: str,
    server_prompts: int,
    seed: int,
    resume: bool,
    overwrite: bool,
) -> None:
    """Train a draft (EAGLE-3 by default) for a verifier end to end and measure it.

    On the embedded default (SmolLM2-135M-Instruct and ShareGPT): regenerate answers with the
    verifier, capture hidden states, build the draft vocabulary, train for what is left of
    --budget-minutes, evaluate on held-out prompts with vLLM (when installed) and the reference
    decoder, and write OUTPUT/speculator (the draft), OUTPUT/report.json, OUTPUT/acceptance.png
    and OUTPUT/training.png. Interrupted runs continue with --resume.
    """
    from speculators_core.cli.plugin_host import command_host
    from speculators_core.cli.train import parse_algo_options, with_flag_option
    from speculators_core.data.conversations import resolve_sources
    from speculators_core.options import positive_ints
    from speculators_core.quickstart.pipeline import run_quickstart
    from speculators_core.quickstart.settings import QuickstartSettings

    algo_options: dict[str, Any] = dict(parse_algo_options(algo_opt))
    algo_options = with_flag_option(algo_options, "objective", "--loss", loss)
    # Refused by QuickstartSettings.with_algorithm, listing the algorithm's options, when the
    # algorithm has no ttt_steps.
    algo_options = with_flag_option(algo_options, "ttt_steps", "--ttt-steps", ttt_steps)

    settings = QuickstartSettings(
        verifier=verifier,
        algorithm=algorithm,
        data=resolve_sources(data, data_split=data_split, data_config=data_config),
        budget_minutes=budget_minutes,
        samples=samples,
        regenerate=regenerate,
        max_new_tokens=max_new_tokens,
        draft_vocab_size=draft_vocab_size,
        k=k,
        algo_options=algo_options,
        learning_rate=learning_rate,
        optimizer=optimizer,
        train_seq_len=train_seq_len,
        generation_backend=generation_backend,
        eval_prompt_source=prompt_source,
        eval_prompts=eval_prompts,
        eval_max_new_tokens=eval_max_new_tokens,
        eval_reserve_minutes=eval_reserve_minutes,
        reference_eval=reference_eval,
        reference_prompts=reference_prompts,
        vllm_eval=vllm_eval,
        server_eval=server_eval,
        server_k_values=positive_ints(server_k_values, "--server-k-values"),
        server_concurrency=positive_ints(server_concurrency, "--server-concurrency"),
        server_prompts=server_prompts,
        seed=seed,
    )
    result = run_quickstart(
        settings,
        output,
        resume=resume,
        overwrite=overwrite,
        echo=click.echo,
        host=command_host(),
    )
    report = result.report
    click.echo("")
    tau = report.get("mean_acceptance_length")
    if tau is not None:
        click.echo(
            f"mean acceptance length {tau:.3f} at k={k} (greedy, {report['measured_by']}, "
            f"{eval_prompts} prompts); the whole run took {report['total_seconds'] / 60:.1f} min"
        )
    tau_sampled = report.get("mean_acceptance_length_temperature_1")
    if tau_sampled is not None:
        click.echo(f"mean acceptance length {tau_sampled:.3f} at temperature 1 (reference decoder)")
    speedup = report.get("speedup")
    if speedup is not None:
        serving = report["serving"]
        click.echo(
            f"speed-up {speedup:.2f}x the verifier alone through vllm serve, one request at a "
            f"time, at the fastest k={report['chosen_k']} ({serving['tokens_per_s']:.1f} against "
            f"{serving['verifier_tokens_per_s']:.1f} tokens/s, tau {serving['mean_acceptance_length']:.2f}; "
            f"n-gram lookup {serving['ngram_speedup']:.2f}x)"
            + ("" if serving["pays"] else ": the draft does not pay on this machine")
        )
    click.echo(f"draft: {result.speculator}")
    plots = ["acceptance.png", "training.png"]
    if speedup is not None:
        plots += report["serving"]["plots"]
    click.echo(f"report: {result.output / 'report.json'} (plots: {', '.join(plots)})")
    click.echo("serve it with:")
    click.echo(f"  {result.serve_command}")
