"""Speed as users feel it: ``vllm serve`` driven over HTTP, one request at a time and a sweep.

Each configuration (the draft, the verifier alone, vLLM's n-gram prompt lookup) is served by a
real ``vllm serve`` on 127.0.0.1 and a free port, one server at a time, with the settings of
``speculators serve``. The same prompts go to each at concurrency 1 and at each level of a sweep;
every request is streamed, so time to first token (TTFT), inter-token latency (ITL) and output
tokens/s are measured per request. The server's ``/metrics`` counters (read before and after the
concurrency-1 pass) give the mean acceptance length and per-position acceptance.

The load generator is this module's own small client over the OpenAI-compatible
``/v1/completions`` API (stdlib ``http.client``), not GuideLLM: ``guidellm`` 0.8.1 pins
``click~=8.4.0`` where this environment (vLLM for CPU) holds click 8.5.1, and brings about ten
more dependencies (sanic, culsans, uvloop, faker, ...) for what needs only streamed greedy
requests at a fixed concurrency.

Servers run in their own process group and are stopped (SIGTERM, then SIGKILL) on every exit
path, Ctrl-C included; a port in use, a server that does not come up, or one that dies mid-run is
one :class:`~speculators_core.evaluate.vllm_runner.VllmError` line.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from speculators_core.evaluate.vllm_runner import VllmError, last_error_line

__all__ = [
    "RequestResult",
    "ServerMeasurement",
    "SpecCounters",
    "VllmServer",
    "drive",
    "free_port",
    "measure_server",
    "ngram_argv",
    "parse_spec_counters",
    "save_served",
    "verifier_argv",
    "write_chosen_k",
]

#: How long a server may take to answer /health after its start (model load, warm-up).
START_TIMEOUT_S = 600.0
#: How long a stopped server may take to exit before it is killed.
STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _drop_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == option:
            skip = True
            continue
        if arg.startswith(option + "="):
            continue
        out.append(arg)
    return out


def verifier_argv(draft_argv: Sequence[str]) -> list[str]:
    """The same ``vllm serve`` command without the draft: the verifier alone."""
    return _drop_option(draft_argv, "--speculative-config")


def ngram_argv(draft_argv: Sequence[str], k: int) -> list[str]:
    """The same command with vLLM's n-gram prompt lookup (no trained draft) proposing ``k``."""
    config = {
        "method": "ngram",
        "num_speculative_tokens": k,
        "prompt_lookup_max": 4,
        "prompt_lookup_min": 2,
    }
    return [*verifier_argv(draft_argv), "--speculative-config", json.dumps(config)]


class VllmServer:
    """A running ``vllm serve`` (a context manager: always stopped on leaving, Ctrl-C included)."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        port: int,
        log_dir: Path,
        name: str,
    ) -> None:
        if _port_in_use(port):
            raise VllmError(
                f"port {port} on 127.0.0.1 is in use; stop what listens there or pick another"
            )
        self.port = port
        self.name = name
        self.base = f"127.0.0.1:{port}"
        self.log_path = log_dir / f"vllm-serve-{name}.log"
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [*argv, "--host", "127.0.0.1", "--port", str(port)],
            env=dict(env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches vLLM's workers too
        )
        self.pid = self.process.pid

    def __enter__(self) -> VllmServer:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self) -> str:
        """The most telling line of the server's log (for one-line errors)."""
        return last_error_line(self.log_path)

    def check_alive(self) -> None:
        """A :class:`VllmError` if the server process has exited."""
        code = self.process.poll()
        if code is not None:
            raise VllmError(
                f"the '{self.name}' vllm serve exited with code {code}; its log "
                f"{self.log_path} says: {self.log_tail()}"
            )

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Poll ``/health`` until it answers 200; a one-line error on exit or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                status, _ = _get(self.base, "/health", timeout=5.0)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(1.0)
        raise VllmError(
            f"the '{self.name}' vllm serve did not come up within {timeout:.0f} s; its log "
            f"{self.log_path} says: {self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL if it has not exited in time."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.process.wait()
        # Workers left in the group (vLLM's engine core) go with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._log.close()


def _get(base: str, path: str, *, timeout: float) -> tuple[int, str]:
    host, port = base.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", errors="replace")
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------
# One streamed request
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestResult:
    """One streamed completion: what came back and when."""

    text: str
    output_tokens: int
    ttft_s: float  # request sent -> first token received
    latency_s: float  # request sent -> last token received
    #: The output's token ids (losslessness is checked on these: text can hide a difference,
    #: and a token whose bytes do not yet form a character streams with empty text).
    token_ids: tuple[int, ...] = ()

    @property
    def itl_s(self) -> float:
        """Mean time between output tokens after the first (0 for one token)."""
        if self.output_tokens < 2:
            return 0.0
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def tokens_per_s(self) -> float:
        """Output tokens per second of this request, end to end."""
        return self.output_tokens / self.latency_s if self.latency_s > 0 else 0.0


def complete(
    base: str,
    model: str,
    prompt: Sequence[int],
    *,
    max_tokens: int,
    timeout: float = 600.0,
) -> RequestResult:
    """Stream one greedy completion of ``prompt`` (token ids); every output token is counted."""
    body = {
        "model": model,
        "prompt": list(prompt),
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,  # every configuration writes the same number of tokens
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,  # each chunk names its tokens, also those with no text yet
    }
    host, port = base.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    started = time.perf_counter()
    first: float | None = None
    last = started
    pieces: list[str] = []
    ids: list[int] = []
    tokens: int | None = None
    try:
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        if response.status != 200:
            raise VllmError(
                f"vllm serve answered {response.status} to a completion: "
                f"{response.read()[:200].decode('utf-8', errors='replace')}"
            )
        for raw in response:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
            for choice in event.get("choices") or []:
                chunk_ids = choice.get("token_ids") or []
                if chunk_ids or choice.get("text"):
                    now = time.perf_counter()
                    first = now if first is None else first
                    last = now
                    pieces.append(choice.get("text") or "")
                    ids.extend(int(t) for t in chunk_ids)
    except (OSError, http.client.HTTPException) as err:
        raise VllmError(f"the request to vllm serve at {base} failed: {err!r}") from err
    finally:
        conn.close()
    if first is None:
        raise VllmError(f"vllm serve at {base} streamed no tokens for a completion")
    return RequestResult(
        text="".join(pieces),
        output_tokens=tokens if tokens is not None else len(ids) or len(pieces),
        ttft_s=first - started,
        latency_s=last - started,
        token_ids=tuple(ids),
    )


def drive(
    base: str,
    model: str,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int,
    concurrency: int,
    alive: VllmServer | None = None,
) -> list[RequestResult]:
    """Every prompt once, ``concurrency`` requests in flight; results in prompt order."""

    def one(prompt: Sequence[int]) -> RequestResult:
        try:
            return complete(base, model, prompt, max_tokens=max_tokens)
        except VllmError:
            if alive is not None:
                alive.check_alive()  # a dead server says so, with its log
            raise

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, prompts))


# ------------------------------------------------------------------------------------------------
# /metrics
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecCounters:
    """vLLM's speculative-decoding counters (``/metrics``), cumulative since the server started."""

    drafts: float = 0.0
    draft_tokens: float = 0.0
    accepted: float = 0.0
    accepted_per_position: tuple[float, ...] = ()

    def __sub__(self, other: SpecCounters) -> SpecCounters:
        width = max(len(self.accepted_per_position), len(other.accepted_per_position))
        mine = [*self.accepted_per_position, *[0.0] * width][:width]
        theirs = [*other.accepted_per_position, *[0.0] * width][:width]
        return SpecCounters(
            self.drafts - other.drafts,
            self.draft_tokens - other.draft_tokens,
            self.accepted - other.accepted,
            tuple(a - b for a, b in zip(mine, theirs, strict=True)),
        )

    @property
    def mean_acceptance_length(self) -> float | None:
        """Tokens per verifier forward: 1 + accepted drafts per drafting round."""
        return 1.0 + self.accepted / self.drafts if self.drafts else None

    @property
    def acceptance_per_position(self) -> list[float]:
        """Fraction of rounds whose i-th drafted token was accepted."""
        return [a / self.drafts for a in self.accepted_per_position] if self.drafts else []


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")


def parse_spec_counters(text: str) -> SpecCounters:
    """The speculative-decoding counters of a Prometheus ``/metrics`` page (summed over labels)."""
    totals = {"drafts": 0.0, "draft_tokens": 0.0, "accepted": 0.0}
    names = {
        "vllm:spec_decode_num_drafts_total": "drafts",
        "vllm:spec_decode_num_draft_tokens_total": "draft_tokens",
        "vllm:spec_decode_num_accepted_tokens_total": "accepted",
    }
    per_position: dict[int, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match["name"], match["labels"] or "", float(match["value"])
        if name in names:
            totals[names[name]] += value
        elif name == "vllm:spec_decode_num_accepted_tokens_per_pos_total":
            position = re.search(r'position="(\d+)"', labels)
            if position:
                index = int(position.group(1))
                per_position[index] = per_position.get(index, 0.0) + value
    ordered = tuple(per_position[i] for i in sorted(per_position))
    return SpecCounters(totals["drafts"], totals["draft_tokens"], totals["accepted"], ordered)


def read_spec_counters(base: str) -> SpecCounters:
    status, text = _get(base, "/metrics", timeout=30.0)
    if status != 200:
        raise VllmError(f"vllm serve at {base} answered {status} on /metrics")
    return parse_spec_counters(text)


# ------------------------------------------------------------------------------------------------
# One configuration, measured
# ------------------------------------------------------------------------------------------------


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class LevelStats:
    """The requests of one concurrency level, summarised (per-request medians and p90s)."""

    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    tokens_per_s_median: float
    ttft_median_s: float
    ttft_p90_s: float
    itl_median_s: float
    itl_p90_s: float

    @classmethod
    def of(cls, concurrency: int, results: Sequence[RequestResult], wall_s: float) -> LevelStats:
        return cls(
            concurrency=concurrency,
            requests=len(results),
            output_tokens=sum(r.output_tokens for r in results),
            wall_s=wall_s,
            tokens_per_s_median=statistics.median(r.tokens_per_s for r in results),
            ttft_median_s=statistics.median(r.ttft_s for r in results),
            ttft_p90_s=_quantile([r.ttft_s for r in results], 0.9),
            itl_median_s=statistics.median(r.itl_s for r in results),
            itl_p90_s=_quantile([r.itl_s for r in results], 0.9),
        )


@dataclass
class ServerMeasurement:
    """One served configuration at each concurrency level, and its acceptance at concurrency 1."""

    name: str
    argv: list[str]
    levels: dict[int, LevelStats] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)  # concurrency-1 outputs, prompt order
    outputs: list[tuple[int, ...]] = field(default_factory=list)  # their token ids
    counters: SpecCounters = field(default_factory=SpecCounters)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "command": self.argv,
            "levels": {str(c): vars(s) for c, s in sorted(self.levels.items())},
            "mean_acceptance_length": self.counters.mean_acceptance_length,
            "acceptance_per_position": self.counters.acceptance_per_position,
            "drafts": self.counters.drafts,
            "draft_tokens": self.counters.draft_tokens,
            "accepted_tokens": self.counters.accepted,
        }


def measure_server(
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    model: str,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int,
    concurrencies: Sequence[int] = (1,),
    log_dir: Path | None = None,
    echo: Any = None,
) -> ServerMeasurement:
    """Start the server, warm it up, measure each concurrency level, stop it (always)."""
    logs = log_dir if log_dir is not None else Path(tempfile.mkdtemp(prefix="vllm-serve-logs-"))
    measurement = ServerMeasurement(name=name, argv=list(argv))
    port = free_port()
    say = echo if echo is not None else (lambda _message: None)
    say(f"[{name}] starting vllm serve on 127.0.0.1:{port}")
    with VllmServer(argv, env, port=port, log_dir=logs, name=name) as server:
        # One warm-up request: the first one pays for lazy initialisation, not for decoding.
        drive(server.base, model, prompts[:1], max_tokens=8, concurrency=1, alive=server)
        for concurrency in sorted(set(concurrencies) | {1}):
            before = read_spec_counters(server.base) if concurrency == 1 else None
            started = time.perf_counter()
            results = drive(
                server.base,
                model,
                prompts,
                max_tokens=max_tokens,
                concurrency=concurrency,
                alive=server,
            )
            wall = time.perf_counter() - started
            measurement.levels[concurrency] = LevelStats.of(concurrency, results, wall)
            if before is not None:
                measurement.counters = read_spec_counters(server.base) - before
                measurement.texts = [r.text for r in results]
                measurement.outputs = [r.token_ids for r in results]
            stats = measurement.levels[concurrency]
            say(
                f"[{name}] concurrency {concurrency}: {stats.tokens_per_s_median:.1f} tokens/s "
                f"per request (median), TTFT {stats.ttft_median_s * 1000:.0f} ms, ITL "
                f"{stats.itl_median_s * 1000:.1f} ms"
            )
    return measurement


# ------------------------------------------------------------------------------------------------
# The draft against the verifier alone and n-gram lookup, and the choice of k
# ------------------------------------------------------------------------------------------------


def _same_outputs(a: ServerMeasurement, b: ServerMeasurement) -> bool:
    """Token for token where the server returned ids (vLLM does), else text for text."""
    if a.outputs and b.outputs and all(a.outputs) and all(b.outputs):
        return a.outputs == b.outputs
    return a.texts == b.texts


def compare_served(
    draft: str | os.PathLike[str],
    prompts: Sequence[Sequence[int]],
    *,
    plugin_host: Any,
    k_values: Sequence[int],
    concurrencies: Sequence[int] = (1,),
    max_new_tokens: int,
    verifier: str | None = None,
    device: str | None = None,
    log_dir: Path | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Serve and measure the verifier alone, the draft at each k and n-gram lookup; one at a time.

    n-gram lookup proposes ``max(k_values)`` tokens per round.

    Returns the report ``eval --engine vllm-server`` writes: each configuration's measurement,
    the speed-up of each k at each concurrency against the verifier alone and against n-gram
    (ratios of per-request median output tokens/s), whether its outputs equal the verifier's,
    and the fastest k at concurrency 1 (``chosen_k``; ``pays`` False when no k beats the
    verifier alone).
    """
    from speculators_core.cli.serve import build_serve_command

    if not k_values:
        raise VllmError("give at least one k to measure")
    commands = {
        k: build_serve_command(
            draft, plugin_host=plugin_host, verifier=verifier, k=k, device=device
        )
        for k in k_values
    }
    first = commands[k_values[0]]
    model = first.argv[first.argv.index("serve") + 1]
    logs = log_dir if log_dir is not None else Path(tempfile.mkdtemp(prefix="vllm-serve-logs-"))
    common: dict[str, Any] = {
        "max_tokens": max_new_tokens,
        "concurrencies": concurrencies,
        "log_dir": logs,
        "echo": echo,
    }
    verifier_alone = measure_server(
        "verifier", verifier_argv(first.argv), first.env, model, prompts, **common
    )
    drafts = {
        k: measure_server(f"draft-k{k}", command.argv, command.env, model, prompts, **common)
        for k, command in commands.items()
    }
    # n-gram lookup proposes as many tokens as the longest draft measured: its rounds are cheap
    # (no model), so a longer proposal is its most favourable setting among those compared.
    ngram_k = max(k_values)
    ngram = measure_server(
        f"ngram-k{ngram_k}", ngram_argv(first.argv, ngram_k), first.env, model, prompts, **common
    )

    def rate(m: ServerMeasurement, concurrency: int) -> float:
        return m.levels[concurrency].tokens_per_s_median

    levels = sorted(set(concurrencies) | {1})
    per_k = {}
    for k, measured in drafts.items():
        per_k[str(k)] = {
            **measured.to_json(),
            "identical_to_verifier": _same_outputs(measured, verifier_alone),
            "speedup": {str(c): rate(measured, c) / rate(verifier_alone, c) for c in levels},
            "speedup_vs_ngram": {str(c): rate(measured, c) / rate(ngram, c) for c in levels},
        }
    chosen = max(k_values, key=lambda k: rate(drafts[k], 1))
    best = per_k[str(chosen)]["speedup"]["1"]
    return {
        "engine": "vllm-server",
        "model": model,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "concurrencies": levels,
        "verifier_alone": verifier_alone.to_json(),
        "ngram": {
            **ngram.to_json(),
            "k": ngram_k,
            "identical_to_verifier": _same_outputs(ngram, verifier_alone),
            "speedup": {str(c): rate(ngram, c) / rate(verifier_alone, c) for c in levels},
        },
        "draft": per_k,
        "chosen_k": chosen,
        "pays": best > 1.0,
        "logs": str(logs),
    }


def save_served(report: Mapping[str, Any], json_path: Path, plot_dir: Path) -> list[Path]:
    """Write :func:`compare_served`'s report to ``json_path`` (atomically) and its two speed-up
    PNGs into ``plot_dir``; return the PNGs' paths."""
    from speculators_core.evaluate.plots import plot_served_speedups
    from speculators_core.fsutil import atomic_file

    with atomic_file(json_path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    return plot_served_speedups(report, plot_dir)


def write_chosen_k(
    draft: str | os.PathLike[str], report: Mapping[str, Any], *, plugin_host: Any
) -> str:
    """Record the measured fastest k in the draft's default proposal method, if the draft pays.

    Only ``speculative_tokens`` of the default proposal changes (what vLLM reads as
    ``num_speculative_tokens``); the new ``config.json`` is validated through the plugin host
    before it atomically replaces the old one, so the folder stays valid for vLLM and upstream.
    Returns the one line to print: what was written, or why nothing was.
    """
    from speculators_core.config import read_config_dict
    from speculators_core.fsutil import atomic_file
    from speculators_core.loading import load_config

    chosen = int(report["chosen_k"])
    best = report["draft"][str(chosen)]
    if not report["pays"]:
        return (
            f"k left as recorded: the draft does not pay at any k measured here (best "
            f"{best['speedup']['1']:.2f}x at k={chosen})"
        )
    folder = Path(draft)
    data = read_config_dict(folder)
    spec = data["speculators_config"]
    default = spec["default_proposal_method"]
    methods = [dict(m) for m in spec["proposal_methods"]]
    previous = None
    for method in methods:
        if method.get("proposal_type") == default:
            previous = method.get("speculative_tokens")
            method["speculative_tokens"] = chosen
    data = {**data, "speculators_config": {**spec, "proposal_methods": methods}}
    if previous == chosen:
        return (
            f"k={chosen} is already recorded in {folder / 'config.json'}: "
            f"{best['speedup']['1']:.2f}x the verifier alone at concurrency 1"
        )
    load_config(data, host=plugin_host)  # the new config must load before it replaces the old
    with atomic_file(folder / "config.json") as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return (
        f"wrote k={chosen} into {folder / 'config.json'} (was {previous}): "
        f"{best['speedup']['1']:.2f}x the verifier alone at concurrency 1"
    )
