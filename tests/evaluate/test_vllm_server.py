"""Speed measured through ``vllm serve``: the client, the counters, the servers' lifecycle, end to end."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from speculators_core import PluginHost
from speculators_core.evaluate.vllm_env import vllm_available
from speculators_core.evaluate.vllm_runner import VllmError
from speculators_core.evaluate.vllm_server import (
    RequestResult,
    SpecCounters,
    VllmServer,
    drive,
    free_port,
    ngram_argv,
    parse_spec_counters,
    verifier_argv,
)

# ------------------------------------------------------------------------------------------------
# Units (no server)
# ------------------------------------------------------------------------------------------------

METRICS_PAGE = """\
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 40.0
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 120.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 50.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 14.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 30.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="2"} 6.0
vllm:generation_tokens_total{engine="0",model_name="m"} 999.0
"""


def test_counters_are_read_from_a_metrics_page_and_differenced():
    counters = parse_spec_counters(METRICS_PAGE)
    assert counters == SpecCounters(40.0, 120.0, 50.0, (30.0, 14.0, 6.0))
    before = SpecCounters(10.0, 30.0, 10.0, (8.0, 2.0))
    delta = counters - before
    assert delta == SpecCounters(30.0, 90.0, 40.0, (22.0, 12.0, 6.0))
    # tau = 1 + accepted / rounds; per position = accepted at i / rounds (independent sums).
    assert delta.mean_acceptance_length == pytest.approx(1 + 40 / 30)
    assert delta.acceptance_per_position == pytest.approx([22 / 30, 12 / 30, 6 / 30])
    assert sum(delta.accepted_per_position) == delta.accepted
    assert SpecCounters().mean_acceptance_length is None


def test_request_timings():
    result = RequestResult(text="abc", output_tokens=5, ttft_s=0.2, latency_s=1.0)
    assert result.itl_s == pytest.approx(0.8 / 4)
    assert result.tokens_per_s == pytest.approx(5.0)
    assert RequestResult("a", 1, 0.1, 0.1).itl_s == 0.0


def _sse_server(events: list[dict]) -> tuple[object, int]:
    """A local HTTP server that streams ``events`` as server-sent events to any POST."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for event in events:
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.01)
            self.wfile.write(b"data: [DONE]\n\n")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def test_the_client_counts_tokens_that_stream_with_no_text_yet():
    """A token whose bytes do not yet form a character streams with empty text: still a token,
    still timed; the ids are what losslessness is judged on."""
    from speculators_core.evaluate.vllm_server import complete

    events = [
        {"choices": [{"text": "", "token_ids": [7]}]},
        {"choices": [{"text": "é", "token_ids": [8]}]},
        {"choices": [{"text": "ab", "token_ids": [9, 10]}]},
        {"choices": [], "usage": {"completion_tokens": 4}},
    ]
    server, port = _sse_server(events)
    try:
        result = complete(f"127.0.0.1:{port}", "m", [1, 2], max_tokens=4)
    finally:
        server.shutdown()
    assert result.token_ids == (7, 8, 9, 10)
    assert result.text == "éab"
    assert result.output_tokens == 4
    assert 0 < result.ttft_s < result.latency_s  # timed from the first chunk, empty text or not
    assert result.itl_s == pytest.approx((result.latency_s - result.ttft_s) / 3)


def test_the_baselines_are_the_same_command_without_the_draft():
    argv = ["vllm", "serve", "/v", "--speculative-config", '{"method": "eagle3"}', "--dtype", "x"]
    assert verifier_argv(argv) == ["vllm", "serve", "/v", "--dtype", "x"]
    ngram = ngram_argv(argv, 3)
    assert ngram[:5] == ["vllm", "serve", "/v", "--dtype", "x"]
    config = json.loads(ngram[ngram.index("--speculative-config") + 1])
    assert config["method"] == "ngram" and config["num_speculative_tokens"] == 3
    assert ngram.count("--speculative-config") == 1


def test_a_port_in_use_is_one_line(tmp_path: Path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(VllmError, match=rf"port {port} on 127.0.0.1 is in use"):
            VllmServer(["true"], {}, port=port, log_dir=tmp_path, name="x")


def test_a_server_that_exits_at_start_is_one_line_with_its_log(tmp_path: Path):
    argv = ["python", "-c", "import sys; print('no such model'); sys.exit(3)"]
    server = VllmServer(argv, dict(os.environ), port=free_port(), log_dir=tmp_path, name="bad")
    with pytest.raises(VllmError) as info, server:
        pass
    message = str(info.value)
    assert "exited with code 3" in message and "no such model" in message
    assert "\n" not in message


def _level(rate: float) -> dict:
    return {
        "tokens_per_s_median": rate,
        "ttft_median_s": 0.05,
        "itl_median_s": 1 / rate,
        "requests": 2,
        "output_tokens": 8,
    }


def _report(draft_rates: dict[str, float], verifier_rate: float, tau: float) -> dict:
    alone = {"levels": {"1": _level(verifier_rate)}, "mean_acceptance_length": None}
    ngram = {"levels": {"1": _level(verifier_rate)}, "mean_acceptance_length": 1.1, "k": 1}
    ngram["speedup"] = {"1": 1.0}
    draft = {
        k: {
            "levels": {"1": _level(r)},
            "mean_acceptance_length": tau,
            "speedup": {"1": r / verifier_rate},
            "speedup_vs_ngram": {"1": r / verifier_rate},
            "identical_to_verifier": True,
        }
        for k, r in draft_rates.items()
    }
    chosen = max(draft_rates, key=draft_rates.__getitem__)
    best = draft_rates[chosen] / verifier_rate
    return {
        "verifier_alone": alone,
        "ngram": ngram,
        "draft": draft,
        "chosen_k": int(chosen),
        "pays": best > 1,
    }


def test_the_printed_table_names_the_fastest_k_or_says_the_draft_does_not_pay():
    from speculators_core.evaluate.tables import served_table

    pays = served_table(_report({"1": 30.0, "2": 36.0}, 25.0, 1.6))
    assert [line.split()[0] for line in pays[1:5]] == ["verifier", "draft", "draft", "n-gram"]
    assert pays[-1].startswith("fastest k at concurrency 1: 2 (1.44x the verifier alone")
    loses = served_table(_report({"1": 20.0, "3": 22.0}, 25.0, 1.3))
    assert loses[-1].startswith("the draft does not pay at any k measured here: best 0.88x at k=3")


def test_the_speed_plots_are_written_atomically(tmp_path: Path):
    from speculators_core.evaluate.plots import plot_served_speedups

    report = {**_report({"1": 30.0, "2": 36.0, "3": 33.0}, 25.0, 1.6), "concurrencies": [1]}
    written = plot_served_speedups(report, tmp_path)
    assert [p.name for p in written] == ["speedup_vs_k.png", "speedup_vs_concurrency.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)


def test_server_options_are_checked_before_anything_starts(tmp_path: Path, tiny_verifier: Path):
    from click.testing import CliRunner

    from speculators_core.cli.eval_cmd import eval_command

    eagle3 = pytest.importorskip("speculators_eagle3")
    eagle3.Eagle3DraftModel.from_verifier(tiny_verifier, aux_layer_ids=[1, 2, 3]).save_pretrained(
        tmp_path / "d"
    )
    runner = CliRunner()
    base = [str(tmp_path / "d"), "--verifier", str(tiny_verifier), "--engine", "vllm-server"]
    bad_k = runner.invoke(eval_command, [*base, "--k-values", "2,x"], obj=PluginHost())
    assert "--k-values takes positive integers separated by commas, got '2,x'" in str(
        bad_k.exception
    )
    sampled = runner.invoke(eval_command, [*base, "--temperature", "0.5"], obj=PluginHost())
    assert "measures greedy decoding" in str(sampled.exception)
    offline = [str(tmp_path / "d"), "--verifier", str(tiny_verifier), "--write-k"]
    refused = runner.invoke(eval_command, offline, obj=PluginHost())
    assert "--write-k goes with --engine vllm-server" in str(refused.exception)
    assert not (tmp_path / "d" / "eval").exists()


def test_the_chosen_k_is_written_only_when_the_draft_pays(tmp_path: Path, tiny_verifier: Path):
    """speculative_tokens becomes the chosen k, nothing else changes, the folder stays valid."""
    from speculators_core import load_speculator
    from speculators_core.check import check_checkpoint
    from speculators_core.evaluate.vllm_server import write_chosen_k

    eagle3 = pytest.importorskip("speculators_eagle3")
    eagle3.Eagle3DraftModel.from_verifier(
        tiny_verifier, aux_layer_ids=[1, 2, 3], speculative_tokens=3
    ).save_pretrained(tmp_path / "d")
    config_file = tmp_path / "d" / "config.json"
    before = config_file.read_bytes()
    host = PluginHost()

    loses = write_chosen_k(
        tmp_path / "d", _report({"1": 20.0, "2": 22.0}, 25.0, 1.3), plugin_host=host
    )
    assert loses.startswith("k left as recorded: the draft does not pay")
    assert config_file.read_bytes() == before

    line = write_chosen_k(
        tmp_path / "d", _report({"1": 30.0, "2": 36.0}, 25.0, 1.6), plugin_host=host
    )
    assert line.startswith(f"wrote k=2 into {config_file} (was 3)")
    written = config_file.read_bytes()
    again = write_chosen_k(
        tmp_path / "d", _report({"1": 30.0, "2": 36.0}, 25.0, 1.6), plugin_host=host
    )
    assert again.startswith(f"k=2 is already recorded in {config_file}")
    assert config_file.read_bytes() == written
    old, new = json.loads(before), json.loads(config_file.read_text())
    assert new["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 2
    new["speculators_config"]["proposal_methods"][0]["speculative_tokens"] = 3
    assert new == old  # nothing else changed
    assert "model_type" not in json.loads(config_file.read_text())
    model = load_speculator(tmp_path / "d", host=host, verifier=tiny_verifier)
    assert model.config.speculators_config.default_proposal().speculative_tokens == 2
    assert check_checkpoint(tmp_path / "d", host=host, verifier=tiny_verifier).codes == []
    assert not list((tmp_path / "d").glob(".config.json.tmp-*"))


# ------------------------------------------------------------------------------------------------
# Real vllm serve on a tiny verifier
# ------------------------------------------------------------------------------------------------

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")
NEW_TOKENS = 24
QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "How do I sort a list in Python?",
]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny verifier and an EAGLE-3 draft fitted to its greedy continuations of the prompts."""
    from _support import fit_tiny_draft

    root = tmp_path_factory.mktemp("vllm-server")
    fitted = fit_tiny_draft(root, QUESTIONS, NEW_TOKENS, speculative_tokens=2)
    return {**fitted, "root": root}


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_the_server_route_end_to_end(fitted: dict, tmp_path: Path):
    """eval --engine vllm-server: four servers, one at a time; every number re-derived here."""
    from _support import check_served_report
    from click.testing import CliRunner

    from speculators_core.cli.eval_cmd import eval_command

    (tmp_path / "prompts.txt").write_text("\n".join(QUESTIONS) + "\n")
    args = [
        str(fitted["draft"]), "--verifier", str(fitted["verifier"]), "--engine", "vllm-server",
        "--k-values", "1,2", "--concurrency", "2", "--prompts", str(tmp_path / "prompts.txt"),
        "--num-prompts", str(len(QUESTIONS)), "--max-new-tokens", str(NEW_TOKENS),
        "--output", str(tmp_path / "out"), "--write-k",
    ]  # fmt: skip
    recorded = json.loads((fitted["draft"] / "config.json").read_text())
    result = CliRunner().invoke(eval_command, args, obj=PluginHost(), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "server.json").read_text())
    assert not list(Path(report["logs"]).glob("*.tmp*"))
    chosen = check_served_report(
        report, ks=[1, 2], levels=[2], prompts=len(QUESTIONS), new_tokens=NEW_TOKENS
    )
    assert all(report["draft"][k]["accepted_tokens"] > 0 for k in ("1", "2"))  # fitted draft
    assert "concurrency 2" in result.stderr  # progress, per server and level
    table = result.stdout.splitlines()
    assert table[0].split()[:3] == ["config", "k", "conc."]
    assert sum(line.startswith("draft ") for line in table) == 4  # 2 k x 2 levels
    assert f"k at concurrency 1: {chosen}" in result.stdout or ("does not pay" in result.stdout)
    # --write-k: the chosen k is recorded only when the draft pays; the fixture draft is restored.
    written = json.loads((fitted["draft"] / "config.json").read_text())
    k_now = written["speculators_config"]["proposal_methods"][0]["speculative_tokens"]
    assert k_now == (chosen if report["pays"] else 2)
    (fitted["draft"] / "config.json").write_text(json.dumps(recorded, indent=2))


@pytest.mark.vllm
@pytest.mark.slow
@needs_vllm
def test_a_server_killed_mid_run_is_one_line_and_leaves_no_process(fitted: dict, tmp_path):
    from speculators_core.cli.serve import build_serve_command

    command = build_serve_command(
        fitted["draft"],
        plugin_host=PluginHost(),
        verifier=str(fitted["verifier"]),
        k=2,
        device="cpu",
    )
    model = command.argv[command.argv.index("serve") + 1]
    server = VllmServer(command.argv, command.env, port=free_port(), log_dir=tmp_path, name="f")
    with server:
        assert server.pid in _live_members(server.pid)  # the check below can see the group
        # Kill the whole server (its process group) while requests are in flight.
        threading.Timer(1.0, lambda: os.killpg(server.pid, signal.SIGKILL)).start()
        with pytest.raises(VllmError) as info:
            for _ in range(200):
                drive(
                    server.base,
                    model,
                    fitted["prompts"],
                    max_tokens=64,
                    concurrency=1,
                    alive=server,
                )
        assert "\n" not in str(info.value)
    time.sleep(0.5)
    assert server.process.poll() is not None
    assert _live_members(server.pid) == []  # no process of the server's group is left running


def _live_members(group: int) -> list[int]:
    """Pids of processes in process group ``group`` that are not zombies (from /proc)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        state, pgrp = fields[0], int(fields[2])
        if pgrp == group and state != "Z":
            live.append(int(stat.parent.name))
    return live
