"""``speculators serve``: the ``vllm serve`` command it builds, prints and runs (no live server)."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from speculators_core import PluginHost, PluginSettings
from speculators_core.cli import serve as serve_module
from speculators_core.cli.serve import ServeCommand, serve_command
from speculators_core.cli.serve import build_serve_command as _build_serve_command
from speculators_core.errors import SpeculatorsError

# The eagle3 plugin's record says how vLLM serves these folders (method 'eagle3').
eagle3_plugin = pytest.importorskip("speculators_eagle3.plugin")
HOST = PluginHost(
    PluginSettings(), entry_points=False, plugins=[("speculators.algorithms:eagle3", eagle3_plugin)]
)


def build_serve_command(folder: Path, **options: Any) -> ServeCommand:
    return _build_serve_command(folder, plugin_host=HOST, **options)


H, HEADS, KV, HD, INTER, V = 64, 4, 2, 16, 128, 259


def write_speculator(
    folder: Path, verifier: str, *, k: int | None = 3, tensors: bool = True
) -> Path:
    """A full-vocabulary EAGLE-3 folder for the session's tiny verifier (FORMAT.md 1.4)."""
    folder.mkdir(parents=True, exist_ok=True)
    methods = [{"proposal_type": "greedy", **({"speculative_tokens": k} if k is not None else {})}]
    config = {
        "speculators_model_type": "eagle3",
        "draft_vocab_size": V,
        "norm_before_residual": True,
        "eagle_aux_hidden_state_layer_ids": [1, 2, 3],
        "target_hidden_size": None,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": methods,
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": ["LlamaForCausalLM"]},
        },
        "transformer_layer_config": {
            "model_type": "llama",
            "hidden_size": H,
            "intermediate_size": INTER,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV,
            "head_dim": HD,
            "num_hidden_layers": 1,
            "vocab_size": V,
            "max_position_embeddings": 512,
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    if tensors:
        shapes = {
            "fc.weight": (H, 3 * H),
            "layers.0.self_attn.q_proj.weight": (HEADS * HD, 2 * H),
            "layers.0.self_attn.k_proj.weight": (KV * HD, 2 * H),
            "layers.0.self_attn.v_proj.weight": (KV * HD, 2 * H),
            "layers.0.self_attn.o_proj.weight": (H, HEADS * HD),
            "layers.0.mlp.gate_proj.weight": (INTER, H),
            "layers.0.mlp.up_proj.weight": (INTER, H),
            "layers.0.mlp.down_proj.weight": (H, INTER),
            "layers.0.input_layernorm.weight": (H,),
            "layers.0.hidden_norm.weight": (H,),
            "layers.0.post_attention_layernorm.weight": (H,),
            "norm.weight": (H,),
            "lm_head.weight": (V, H),
        }
        save_file({n: torch.zeros(s) for n, s in shapes.items()}, str(folder / "model.safetensors"))
    return folder


def speculative_config_of(argv: list[str]) -> dict:
    return json.loads(argv[argv.index("--speculative-config") + 1])


@pytest.fixture
def speculator(tmp_path: Path, tiny_verifier: Path) -> Path:
    return write_speculator(tmp_path / "draft", str(tiny_verifier))


def test_cpu_command(speculator: Path, tiny_verifier: Path):
    command = build_serve_command(
        speculator,
        port=8123,
        host="0.0.0.0",
        extra_args=["--max-model-len", "2048"],
        device="cpu",
        base_env={},
    )
    argv = command.argv
    serve = argv.index("serve")
    assert argv[serve + 1] == str(tiny_verifier.resolve())  # the verifier is the served model
    assert speculative_config_of(argv) == {
        "method": "eagle3",
        "model": str(speculator.resolve()),
        "num_speculative_tokens": 3,
    }
    assert argv[argv.index("--port") + 1] == "8123" and argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--dtype") + 1] == "float32" and "--enforce-eager" in argv
    assert argv[-2:] == ["--max-model-len", "2048"]  # passed through last, unchanged
    changes = command.env_changes
    assert changes["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert changes["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    groups: list[list[int]] = []  # this process's CPUs as runs of consecutive ids
    for cpu in sorted(os.sched_getaffinity(0)):
        if groups and cpu == groups[-1][-1] + 1:
            groups[-1].append(cpu)
        else:
            groups.append([cpu])
    expected = ",".join(str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups)
    assert changes["VLLM_CPU_OMP_THREADS_BIND"] == expected
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    assert ("LD_PRELOAD" in changes) == iomp.is_file()
    assert command.env == changes  # started from an empty environment


def test_gpu_command_adds_nothing(speculator: Path):
    command = build_serve_command(speculator, device="gpu", base_env={"HOME": "/root"})
    assert "--dtype" not in command.argv and "--enforce-eager" not in command.argv
    assert command.env_changes == {} and command.env == {"HOME": "/root"}


def test_user_arguments_and_environment_win(speculator: Path):
    command = build_serve_command(
        speculator,
        extra_args=["--dtype=bfloat16", "--no-enforce-eager"],
        device="cpu",
        base_env={"VLLM_CPU_KVCACHE_SPACE": "8"},
    )
    assert "float32" not in command.argv and "--enforce-eager" not in command.argv
    assert command.env["VLLM_CPU_KVCACHE_SPACE"] == "8"
    assert "VLLM_CPU_KVCACHE_SPACE" not in command.env_changes


def test_verifier_and_k_overrides(tmp_path: Path):
    # The recorded verifier is a training-machine path that does not exist here.
    folder = write_speculator(tmp_path / "draft", "/train-box/models/verifier")
    with pytest.raises(SpeculatorsError, match="does not exist here; pass --verifier") as info:
        build_serve_command(folder, device="gpu")
    assert "\n" not in str(info.value)
    command = build_serve_command(
        folder, verifier="HuggingFaceTB/SmolLM2-135M-Instruct", k=5, device="gpu"
    )
    assert command.argv[command.argv.index("serve") + 1] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert speculative_config_of(command.argv)["num_speculative_tokens"] == 5
    with pytest.raises(SpeculatorsError, match="--k must be at least 1"):
        build_serve_command(folder, verifier="x/y", k=0, device="gpu")


def test_missing_pieces_are_one_line_errors(tmp_path: Path, tiny_verifier: Path):
    with pytest.raises(SpeculatorsError, match=r"has no config\.json"):
        build_serve_command(tmp_path, device="gpu")
    folder = write_speculator(tmp_path / "nok", str(tiny_verifier), k=None, tensors=False)
    with pytest.raises(SpeculatorsError, match="records no speculative_tokens; pass --k"):
        build_serve_command(folder, device="gpu")


def test_executable_for_each_vllm_installation(monkeypatch):
    import importlib.metadata

    def only(installed: set[str]):
        def version(name: str) -> str:
            if name in installed:
                return "0.32.0"
            raise importlib.metadata.PackageNotFoundError(name)

        return version

    monkeypatch.setattr(importlib.metadata, "version", only({"vllm-cpu"}))
    monkeypatch.setattr("speculators_core.evaluate.vllm_env.vllm_available", lambda: True)
    # The CPU build's console script is broken (it asks for the 'vllm' distribution's version).
    assert serve_module._vllm_executable() == [
        sys.executable,
        "-m",
        "speculators_core.evaluate.vllm_cli",
    ]
    monkeypatch.setattr("speculators_core.evaluate.vllm_env.vllm_available", lambda: False)
    monkeypatch.setattr(importlib.metadata, "version", only(set()))
    assert serve_module._vllm_executable() == ["vllm"]  # printed for use elsewhere
    monkeypatch.setattr(importlib.metadata, "version", only({"vllm"}))
    assert Path(serve_module._vllm_executable()[0]).name == "vllm"


def _printed(runner: CliRunner, args: list[str]) -> tuple[dict[str, str], list[str]]:
    result = runner.invoke(serve_command, args)
    assert result.exit_code == 0, result.output
    words = shlex.split(result.stdout.strip())
    env = {}
    while "=" in words[0] and not words[0].startswith("/"):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def test_printed_command_is_what_runs(speculator: Path, monkeypatch):
    runner = CliRunner()
    args = [str(speculator), "--port", "8123", "--device", "cpu", "--", "--max-model-len", "1024"]
    printed_env, printed_argv = _printed(runner, [*args[:-3], "--print-only", *args[-3:]])

    ran: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr(
        serve_module.os, "execvpe", lambda file, argv, env: ran.append((file, argv, env))
    )
    monkeypatch.setattr("speculators_core.evaluate.vllm_env.vllm_available", lambda: True)
    result = runner.invoke(serve_command, args)
    assert result.exit_code == 0, result.output
    ((file, argv, env),) = ran
    assert argv == printed_argv and file == argv[0]
    assert {k: env[k] for k in printed_env} == printed_env
    assert all(os.environ.get(k) == v for k, v in env.items() if k not in printed_env)


def test_without_vllm_the_command_is_printed(speculator: Path, monkeypatch):
    monkeypatch.setattr("speculators_core.evaluate.vllm_env.vllm_available", lambda: False)
    monkeypatch.setattr(serve_module.os, "execvpe", lambda *a: pytest.fail("must not run"))
    result = CliRunner().invoke(serve_command, [str(speculator), "--device", "gpu"])
    assert result.exit_code == 0
    assert "vLLM is not installed here" in result.stderr
    assert " serve " in result.stdout and "--speculative-config" in result.stdout


def test_a_folder_with_findings_is_not_served(tmp_path: Path, tiny_verifier: Path, monkeypatch):
    monkeypatch.setattr(serve_module.os, "execvpe", lambda *a: pytest.fail("must not run"))
    folder = write_speculator(tmp_path / "draft", str(tiny_verifier), tensors=False)
    result = CliRunner().invoke(serve_command, [str(folder), "--print-only"])
    assert result.exit_code == 1
    assert "has 1 problem(s) for vLLM" in str(result.exception) and "model.safetensors" in str(
        result.exception
    )
    result = CliRunner().invoke(serve_command, [str(folder), "--print-only", "--no-check"])
    assert result.exit_code == 0 and "--speculative-config" in result.stdout


def test_vllm_options_must_follow_the_separator(speculator: Path):
    result = CliRunner().invoke(
        serve_command, [str(speculator), "--print-only", "--max-model-len", "5"]
    )
    assert result.exit_code == 2 and "No such option" in result.output
