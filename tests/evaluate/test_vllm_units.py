"""The vLLM runner's parts that need no vLLM: environment, request, counters, results, errors."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from speculators_core.evaluate import vllm_env, vllm_runner
from speculators_core.evaluate.vllm_runner import (
    VllmError,
    VllmJob,
    draft_method,
    run_vllm_jobs,
    speculative_config,
)
from speculators_core.evaluate.vllm_worker import _difference, read_spec_decode_counters
from speculators_core.plugins.records import VllmServing


def ranges(ids: list[int]) -> str:
    """'0-2,5' written out by walking the sorted ids (independent of cpu_id_list)."""
    ids = sorted(set(ids))
    out, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


@pytest.mark.parametrize("ids", [[0], [0, 1], [0, 1, 2, 5], [3, 1, 2, 7, 8, 10], [4, 4, 5]])
def test_cpu_id_list(ids):
    assert vllm_env.cpu_id_list(ids) == ranges(ids)


def test_cpu_env_is_added_and_user_settings_win(tmp_path, monkeypatch):
    lib = tmp_path / "lib" / "libiomp5.so"
    lib.parent.mkdir()
    lib.write_bytes(b"")
    monkeypatch.setattr(vllm_env.sys, "prefix", str(tmp_path))
    env = vllm_env.vllm_env(
        "cpu", {"PATH": "/bin", "LD_PRELOAD": "/x/libtcmalloc.so"}, cpus=[0, 1, 3]
    )
    assert env["LD_PRELOAD"] == f"{lib}:/x/libtcmalloc.so"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1,3"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["PATH"] == "/bin"

    mine = {
        "VLLM_CPU_KVCACHE_SPACE": "8",
        "VLLM_CPU_OMP_THREADS_BIND": "2",
        "LD_PRELOAD": "/y/libiomp5.so",
    }
    env = vllm_env.vllm_env("cpu", mine, cpus=[0, 1])
    assert {k: env[k] for k in mine} == mine  # nothing the user set is replaced

    assert vllm_env.vllm_env("gpu", {"A": "b"}) == {"A": "b"}
    assert vllm_env.default_dtype("cpu") == "float32" and vllm_env.default_dtype("gpu") == "auto"


def test_cpu_env_binds_this_process_cpus(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    env = vllm_env.vllm_env("cpu", {})
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == ranges(sorted(os.sched_getaffinity(0)))


def test_detect_device(monkeypatch):
    monkeypatch.setenv("SPECULATORS_VLLM_DEVICE", "gpu")
    assert vllm_env.detect_device() == "gpu"
    assert vllm_env.detect_device("cpu") == "cpu"
    monkeypatch.delenv("SPECULATORS_VLLM_DEVICE")
    monkeypatch.setattr(vllm_env, "_installed", lambda name: name == "vllm-cpu")
    assert vllm_env.detect_device() == "cpu"  # the CPU build, whatever torch sees
    with pytest.raises(vllm_env.SpeculatorsError, match="unknown vLLM device 'tpu'"):
        vllm_env.detect_device("tpu")


def _metric(name, value=None, values=None, engine="0"):
    return SimpleNamespace(name=name, labels={"engine": engine}, value=value, values=values)


def test_spec_decode_counters_are_summed_over_engines():
    metrics = [
        _metric("vllm:num_requests_running", 3),
        _metric("vllm:spec_decode_num_drafts", 10),
        _metric("vllm:spec_decode_num_drafts", 5, engine="1"),
        _metric("vllm:spec_decode_num_draft_tokens", 45),
        _metric("vllm:spec_decode_num_accepted_tokens", 17),
        _metric("vllm:spec_decode_num_accepted_tokens_per_pos", values=[9, 5, 2]),
        _metric("vllm:spec_decode_num_accepted_tokens_per_pos", values=[1, 0, 0], engine="1"),
    ]
    counters = read_spec_decode_counters(metrics)
    assert counters == {
        "num_drafts": 15,
        "num_draft_tokens": 45,
        "num_accepted_tokens": 17,
        "accepted_per_position": [10, 5, 2],
    }
    assert read_spec_decode_counters([]) == {
        "num_drafts": 0,
        "num_draft_tokens": 0,
        "num_accepted_tokens": 0,
        "accepted_per_position": [],
    }
    before = {
        "num_drafts": 4,
        "num_draft_tokens": 12,
        "num_accepted_tokens": 3,
        "accepted_per_position": [2, 1, 0],
    }
    assert _difference(counters, before) == {
        "num_drafts": 11,
        "num_draft_tokens": 33,
        "num_accepted_tokens": 14,
        "accepted_per_position": [8, 4, 2],
    }


def _speculator(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _host_serving(name: str, serving: VllmServing | None) -> SimpleNamespace:
    """A stand-in plugin host whose only algorithm ``name`` is served by vLLM as ``serving``."""
    record = SimpleNamespace(name=name, vllm=serving, provided_by="test-plugin 0.1")
    return SimpleNamespace(algorithm=lambda kind: record)


EAGLE3_HOST = _host_serving("eagle3", VllmServing(method="eagle3"))


def test_draft_method_and_speculative_config(tmp_path):
    spec = _speculator(
        tmp_path / "s", {"speculators_model_type": "eagle3", "speculators_config": {}}
    )
    native3 = _speculator(
        tmp_path / "n3", {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama"}
    )
    native1 = _speculator(
        tmp_path / "n1", {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    )
    methods = [draft_method(p, EAGLE3_HOST) for p in (spec, native3, native1)]  # type: ignore[arg-type]
    assert methods == ["eagle3", "eagle3", "eagle"]
    assert speculative_config(spec, 4, host=EAGLE3_HOST) == {  # type: ignore[arg-type]
        "method": "eagle3",
        "model": str(spec.resolve()),
        "num_speculative_tokens": 4,
    }
    assert speculative_config(native1, 2, method="eagle3")["method"] == "eagle3"
    with pytest.raises(VllmError, match="at least 1"):
        speculative_config(spec, 0, host=EAGLE3_HOST)  # type: ignore[arg-type]
    with pytest.raises(VllmError, match="pass the plugin host"):
        draft_method(spec)  # a speculators folder: the method comes from its algorithm's record
    with pytest.raises(VllmError, match=r"has no config\.json"):
        draft_method(tmp_path / "missing")


def test_job_request_cpu_and_gpu(tmp_path):
    draft = _speculator(tmp_path / "d", {"speculators_model_type": "eagle3"})
    job = VllmJob(
        verifier=tmp_path,
        draft=draft,
        prompts=[[1, 2, 3]],
        k=3,
        max_new_tokens=8,
        seed=7,
        batch_size=1,
        max_model_len=256,
        host=EAGLE3_HOST,  # type: ignore[arg-type]
    )
    cpu = vllm_runner._job_request(job, "cpu")
    assert cpu["engine"] == {
        "model": str(tmp_path.resolve()),
        "dtype": "float32",
        "seed": 7,
        "generation_config": "vllm",
        "enforce_eager": True,
        "distributed_executor_backend": "uni",
        "max_model_len": 256,
        "speculative_config": {
            "method": "eagle3",
            "model": str(draft.resolve()),
            "num_speculative_tokens": 3,
        },
    }
    assert cpu["sampling"] == {"max_tokens": 8, "temperature": 0.0, "seed": 7, "ignore_eos": False}
    assert cpu["prompts"] == [[1, 2, 3]] and cpu["batch_size"] == 1 and cpu["warmup"] is True

    gpu = vllm_runner._job_request(
        VllmJob(
            verifier="org/model",
            draft=None,
            prompts=[[5]],
            k=3,
            max_new_tokens=2,
            engine_args={"dtype": "bfloat16"},
        ),
        "gpu",
    )
    assert gpu["engine"] == {
        "model": "org/model",
        "dtype": "bfloat16",
        "seed": 0,
        "generation_config": "vllm",
    }


@pytest.mark.parametrize(
    ("prompts", "tokens", "message"),
    [([], 4, "no prompts"), ([[1], []], 4, "prompt 1 is empty"), ([[1]], 0, "max_new_tokens")],
)
def test_bad_jobs_are_refused_before_starting(tmp_path, monkeypatch, prompts, tokens, message):
    monkeypatch.setattr(vllm_runner, "vllm_available", lambda: True)
    monkeypatch.setattr(vllm_runner.subprocess, "Popen", lambda *a, **k: pytest.fail("started"))
    with pytest.raises(VllmError, match=message):
        run_vllm_jobs(
            [VllmJob(verifier=tmp_path, draft=None, prompts=prompts, k=3, max_new_tokens=tokens)]
        )


def test_missing_vllm_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_runner, "vllm_available", lambda: False)
    with pytest.raises(VllmError, match="vLLM is not installed; install it") as info:
        vllm_runner.run_vllm(tmp_path, None, [[1]], k=3, max_new_tokens=2)
    assert "\n" not in str(info.value)


def test_result_fields_are_derived_from_the_counters():
    job = VllmJob(verifier="v", draft="d", prompts=[[1], [2]], k=3, max_new_tokens=4)
    run = {
        "outputs": [[1, 2, 3, 4], [5, 6]],
        "generate_s": 0.5,
        "engine_start_s": 3.0,
        "num_drafts": 4,
        "num_draft_tokens": 12,
        "num_accepted_tokens": 3,
        "accepted_per_position": [2, 1, 0],
    }
    result = vllm_runner._to_result(run, job, "0.32.0")
    assert result.mean_acceptance_length == 1 + 3 / 4
    assert result.tokens_per_second == 6 / 0.5
    assert result.per_position_acceptance == [0.5, 0.25, 0.0]
    assert result.acceptance_rate == 3 / 12
    assert result.num_generated_tokens == 6
    data = result.to_json()
    assert data["mean_acceptance_length"] == 1.75 and data["k"] == 3 and data["draft"] == "d"
    json.dumps(data)  # JSON-ready

    alone = vllm_runner._to_result(
        {
            **run,
            "num_drafts": 0,
            "num_draft_tokens": 0,
            "num_accepted_tokens": 0,
            "accepted_per_position": [],
        },
        VllmJob(verifier="v", draft=None, prompts=[[1]], k=3, max_new_tokens=4),
        "",
    )
    assert (
        alone.mean_acceptance_length == 1.0 and alone.k == 0 and alone.per_position_acceptance == []
    )


def test_worker_failure_is_one_line_with_the_log(tmp_path, monkeypatch):
    """A worker that dies reports its last error line and keeps the log (no real vLLM needed)."""
    monkeypatch.setattr(vllm_runner, "vllm_available", lambda: True)
    fake = tmp_path / "fake_worker.py"
    fake.write_text(
        "import sys\n"
        "print('INFO loading')\n"
        "print('Traceback (most recent call last):')\n"
        "print('ValueError: Unsupported model_type mistral for Eagle3 speculator')\n"
        "sys.exit(3)\n"
    )
    real_popen = vllm_runner.subprocess.Popen

    def popen(command, **kwargs):
        assert command[1:3] == ["-m", "speculators_core.evaluate.vllm_worker"]
        return real_popen([sys.executable, str(fake)], **kwargs)

    monkeypatch.setattr(vllm_runner.subprocess, "Popen", popen)
    with pytest.raises(VllmError) as info:
        run_vllm_jobs(
            [VllmJob(verifier=tmp_path, draft=None, prompts=[[1]], k=3, max_new_tokens=2)],
            device="cpu",
        )
    message = str(info.value)
    assert "\n" not in message
    assert "exit code 3" in message
    assert "ValueError: Unsupported model_type mistral for Eagle3 speculator" in message
    log = Path(message.rsplit("full log: ", 1)[1].rstrip(")"))
    assert "Traceback" in log.read_text()
    log.unlink()


def test_a_worker_past_its_time_limit_is_stopped_with_its_children(tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_runner, "vllm_available", lambda: True)
    pid_file = tmp_path / "child.pid"
    fake = tmp_path / "slow_worker.py"
    # The worker starts a child of its own (as vLLM's engine does), then hangs.
    fake.write_text(
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    real_popen = vllm_runner.subprocess.Popen
    started = []

    def popen(command, **kwargs):
        process = real_popen([sys.executable, str(fake)], **kwargs)
        started.append(process)
        return process

    monkeypatch.setattr(vllm_runner.subprocess, "Popen", popen)
    with pytest.raises(VllmError, match="ran longer than 3 s") as info:
        run_vllm_jobs(
            [VllmJob(verifier=tmp_path, draft=None, prompts=[[1]], k=3, max_new_tokens=2)],
            timeout_s=3,
            device="cpu",
        )
    assert started[0].poll() is not None  # the worker is gone
    Path(str(info.value).rsplit("(log: ", 1)[1].rstrip(")")).unlink()  # the kept log
    child = int(pid_file.read_text())
    for _ in range(50):  # the child of the worker was killed with its process group
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"worker child {child} is still running")
