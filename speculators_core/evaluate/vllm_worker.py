"""The subprocess that runs vLLM for :mod:`speculators_core.evaluate.vllm_runner`.

Run as ``python -m speculators_core.evaluate.vllm_worker REQUEST.json RESULT.json`` in an
environment prepared by :func:`~speculators_core.evaluate.vllm_env.vllm_env` (settings such as
``LD_PRELOAD`` only work when a process starts). The request lists one or more engine runs;
they run one after another in this process, so vLLM is imported once for all of them. Each run
starts an offline ``vllm.LLM`` (with or without a ``speculative_config``), optionally warms it
up, generates from token-id prompts, reads the speculative-decoding counters from
``LLM.get_metrics()`` as the difference between a snapshot before and after the timed part,
and shuts the engine down before the next run starts.

Request (JSON)::

    {"runs": [{"engine": {<vllm.LLM keyword arguments>},
               "prompts": [[token ids], ...],
               "sampling": {<vllm.SamplingParams keyword arguments>},
               "batch_size": int | null,   # prompts per generate call; null = all at once
               "warmup": bool}, ...]}

Result (JSON)::

    {"vllm_version": str,
     "runs": [{"outputs": [[generated ids], ...], "generate_s": float, "engine_start_s": float,
               "num_drafts": int, "num_draft_tokens": int, "num_accepted_tokens": int,
               "accepted_per_position": [int, ...]}, ...]}

stdout/stderr carry vLLM's own logs; the result goes only to the result file, written whole.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["read_spec_decode_counters", "run_request"]

_DRAFTS = "vllm:spec_decode_num_drafts"
_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
_ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
_PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"


def read_spec_decode_counters(metrics: list[Any]) -> dict[str, Any]:
    """Sum the speculative-decoding counters of a ``LLM.get_metrics()`` snapshot.

    vLLM 0.32 exposes ``Counter`` objects (``.name``, ``.value``) for the drafts, drafted and
    accepted tokens, and one ``Vector`` (``.values``, one count per draft position) for the
    accepted tokens per position; with several engines (data parallel) each appears once per
    engine label, so values are summed. Counters that do not exist (no speculative config) read
    as zero.
    """
    totals = {_DRAFTS: 0, _DRAFT_TOKENS: 0, _ACCEPTED: 0}
    per_position: list[int] = []
    for metric in metrics:
        name = getattr(metric, "name", "")
        if name in totals:
            totals[name] += int(metric.value)
        elif name == _PER_POSITION:
            values = [int(v) for v in metric.values]
            if len(values) > len(per_position):
                per_position += [0] * (len(values) - len(per_position))
            for i, value in enumerate(values):
                per_position[i] += value
    return {
        "num_drafts": totals[_DRAFTS],
        "num_draft_tokens": totals[_DRAFT_TOKENS],
        "num_accepted_tokens": totals[_ACCEPTED],
        "accepted_per_position": per_position,
    }


def _difference(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    per_after, per_before = after["accepted_per_position"], before["accepted_per_position"]
    per_before = per_before + [0] * (len(per_after) - len(per_before))
    return {
        "num_drafts": after["num_drafts"] - before["num_drafts"],
        "num_draft_tokens": after["num_draft_tokens"] - before["num_draft_tokens"],
        "num_accepted_tokens": after["num_accepted_tokens"] - before["num_accepted_tokens"],
        "accepted_per_position": [a - b for a, b in zip(per_after, per_before)],
    }


def _shutdown(llm: Any) -> None:
    """Stop the engine-core process now (instead of at garbage collection)."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    shutdown = getattr(core, "shutdown", None)
    if callable(shutdown):
        shutdown()


def _run_one(run: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    # Stats must be on for get_metrics(); LLM() turns them off unless told otherwise.
    llm = LLM(**{"disable_log_stats": False, **run["engine"]})
    engine_start_s = time.perf_counter() - started
    try:
        params = SamplingParams(**run["sampling"])
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in run["prompts"]]
        if run.get("warmup") and prompts:
            # One short request first: the first steps of a fresh engine are slower.
            warm = SamplingParams(**{**run["sampling"], "max_tokens": 4})
            llm.generate(prompts[:1], warm, use_tqdm=False)
        before = read_spec_decode_counters(llm.get_metrics())
        batch = run.get("batch_size") or max(len(prompts), 1)
        outputs: list[list[int]] = []
        t0 = time.perf_counter()
        for start in range(0, len(prompts), batch):
            results = llm.generate(prompts[start : start + batch], params, use_tqdm=False)
            outputs += [list(r.outputs[0].token_ids) for r in results]
        generate_s = time.perf_counter() - t0
        counters = _difference(read_spec_decode_counters(llm.get_metrics()), before)
    finally:
        _shutdown(llm)
        del llm
        gc.collect()
    return {
        "outputs": outputs,
        "generate_s": generate_s,
        "engine_start_s": engine_start_s,
        **counters,
    }


def run_request(request: dict[str, Any]) -> dict[str, Any]:
    """Run every engine run of ``request`` in order; return the result dict (see module doc)."""
    import vllm

    return {
        "vllm_version": str(getattr(vllm, "__version__", "unknown")),
        "runs": [_run_one(run) for run in request["runs"]],
    }


def main(argv: list[str]) -> int:
    """Entry point: ``vllm_worker REQUEST.json RESULT.json``."""
    if len(argv) != 2:
        print("usage: python -m speculators_core.evaluate.vllm_worker REQUEST.json RESULT.json")
        return 2
    request = json.loads(Path(argv[0]).read_text())
    result = run_request(request)
    out = Path(argv[1])
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(json.dumps(result))
    tmp.replace(out)  # the parent never reads a half-written result
    return 0


# vLLM spawns its engine core with multiprocessing "spawn", which re-imports this module in the
# child: the guard keeps the child from starting engines of its own.
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
