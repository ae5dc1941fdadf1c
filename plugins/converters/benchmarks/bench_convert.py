"""Benchmark: converting a ~1 GB EAGLE-3 checkpoint, peak memory and time, vs upstream speculators.

1. A synthetic SafeAILab EAGLE-3 source of about 1 GB (float32; hidden 1536, verifier vocab
   110,592 with ``embed_tokens``, draft vocab 32,768) is written sharded (``embed_tokens`` alone
   in one shard, the rest in the other) and as one ``model.safetensors``; the verifier is a
   folder holding only its ``config.json`` (neither converter needs its weights without
   validation).
2. ``speculators convert`` runs on the sharded source in its own process; its peak RSS must be
   below ``1.5 x largest tensor + fixed overhead``, the fixed overhead being the peak RSS of the
   same command converting a tiny source (imports, interpreter, plugin discovery).
3. Side by side on the single-file source (upstream does not read sharded sources): this
   project's ``speculators convert`` and upstream ``speculators==0.9.0 convert --algorithm
   eagle3`` (its own venv), each in its own process, wall time and peak RSS (``wait4``).
   The two outputs are compared tensor by tensor (names, shapes, values of the shared ones).

Peak RSS is the child's own high-water mark from ``wait4``. Linux starts a child's
``ru_maxrss`` at its parent's RSS at fork time, so the sources are written by a separate
process and this parent never imports torch before the measurements.

    .venv/bin/python plugins/converters/benchmarks/bench_convert.py [--workdir DIR] [--keep]
        [--upstream-venv .cache/upstream-venv]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
DEFAULT_UPSTREAM_VENV = REPO / ".cache" / "upstream-venv"

BIG = {
    "hidden": 1536,
    "vocab": 110592,
    "draft_vocab": 32768,
    "intermediate": 4096,
    "heads": 12,
    "kv_heads": 4,
}
TINY = {
    "hidden": 64,
    "vocab": 256,
    "draft_vocab": 128,
    "intermediate": 128,
    "heads": 2,
    "kv_heads": 1,
}
VERIFIER_LAYERS = 8


def _verifier(folder: Path, sizes: dict[str, int]) -> Path:
    """A verifier folder with only ``config.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": sizes["hidden"],
        "intermediate_size": sizes["intermediate"],
        "num_attention_heads": sizes["heads"],
        "num_key_value_heads": sizes["kv_heads"],
        "head_dim": sizes["hidden"] // sizes["heads"],
        "num_hidden_layers": VERIFIER_LAYERS,
        "vocab_size": sizes["vocab"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _source_tensors(sizes: dict[str, int]) -> dict[str, Any]:
    """SafeAILab EAGLE-3 tensors (FORMAT.md 4.3), generated lazily one by one: name -> thunk."""
    import torch

    h, v, vd, i = sizes["hidden"], sizes["vocab"], sizes["draft_vocab"], sizes["intermediate"]
    hd = h // sizes["heads"]
    q, kv = sizes["heads"] * hd, sizes["kv_heads"] * hd

    def rand(*shape: int) -> Any:
        return lambda: torch.randn(*shape) * 0.02

    def ones(n: int) -> Any:
        return lambda: torch.ones(n)

    def d2t() -> Any:
        ids = torch.randperm(v, generator=torch.Generator().manual_seed(0))[:vd].sort().values
        return ids - torch.arange(vd)

    def t2d() -> Any:
        mapping = torch.zeros(v, dtype=torch.bool)
        mapping[torch.arange(vd) + d2t()] = True
        return mapping

    return {
        "embed_tokens.weight": rand(v, h),
        "fc.weight": rand(h, 3 * h),
        "midlayer.input_layernorm.weight": ones(h),
        "midlayer.hidden_norm.weight": ones(h),
        "midlayer.self_attn.q_proj.weight": rand(q, 2 * h),
        "midlayer.self_attn.k_proj.weight": rand(kv, 2 * h),
        "midlayer.self_attn.v_proj.weight": rand(kv, 2 * h),
        "midlayer.self_attn.o_proj.weight": rand(h, q),
        "midlayer.post_attention_layernorm.weight": ones(h),
        "midlayer.mlp.gate_proj.weight": rand(i, h),
        "midlayer.mlp.up_proj.weight": rand(i, h),
        "midlayer.mlp.down_proj.weight": rand(h, i),
        "norm.weight": ones(h),
        "lm_head.weight": rand(vd, h),
        "d2t": d2t,
        "t2d": t2d,
    }


def _write_file(path: Path, thunks: dict[str, Any]) -> int:
    """Write tensors from ``thunks`` into one safetensors file, one tensor in memory at a time."""
    import torch

    from speculators_core.safetensors_io import StreamingSafetensorsWriter, TensorLayout

    metas = {}
    for name, make in thunks.items():
        t = make()
        metas[name] = TensorLayout(name, t.dtype, tuple(t.shape))
        del t
    total = 0
    torch.manual_seed(0)
    with StreamingSafetensorsWriter(path, list(metas.values())) as writer:
        for name, make in thunks.items():
            t = make()
            writer.write(name, [t.reshape(-1)])
            total += t.numel() * t.element_size()
            del t
    return total


def _source(folder: Path, sizes: dict[str, int], *, sharded: bool) -> tuple[int, int]:
    """Write a SafeAILab EAGLE-3 source; return (total bytes, largest tensor bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    thunks = _source_tensors(sizes)
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": sizes["hidden"],
        "intermediate_size": sizes["intermediate"],
        "num_attention_heads": sizes["heads"],
        "num_key_value_heads": sizes["kv_heads"],
        "num_hidden_layers": 1,
        "vocab_size": sizes["vocab"],
        "draft_vocab_size": sizes["draft_vocab"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    largest = sizes["vocab"] * sizes["hidden"] * 4  # embed_tokens, float32
    if not sharded:
        return _write_file(folder / "model.safetensors", thunks), largest
    first = {"embed_tokens.weight": thunks.pop("embed_tokens.weight")}
    files = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": thunks}
    total = 0
    weight_map = {}
    for name, part in files.items():
        total += _write_file(folder / name, part)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total, largest


def _measure(cmd: list[str], *, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; its wall time and peak RSS (``wait4``, this child only)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{output[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def _ours(source: Path, verifier: Path, output: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "speculators_core",
        "convert",
        str(source),
        "--verifier",
        str(verifier),
        "--output",
        str(output),
        "--from",
        "safeailab-eagle3",
    ]
    return _measure(cmd)


def _upstream(venv: Path, source: Path, verifier: Path, output: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECULATORS_")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    cmd = [
        str(venv / "bin" / "speculators"),
        "convert",
        str(source),
        "--algorithm",
        "eagle3",
        "--verifier",
        str(verifier),
        "--output-path",
        str(output),
    ]
    return _measure(cmd, env=env)


def _compare_outputs(ours: Path, theirs: Path) -> str:
    """Names/shapes of both outputs, and equality of the tensors both hold."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Any]:
        files = sorted(folder.glob("*.safetensors"))
        out = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118
                    out[name] = (file, tuple(handle.get_slice(name).get_shape()))
        return out

    a, b = tensors(ours), tensors(theirs)
    shared = sorted(set(a) & set(b))
    different = []
    for name in shared:
        if a[name][1] != b[name][1]:
            different.append(name)
            continue
        with (
            safe_open(str(a[name][0]), framework="pt") as fa,
            safe_open(str(b[name][0]), framework="pt") as fb,
        ):
            if not fa.get_tensor(name).equal(fb.get_tensor(name)):
                different.append(name)
    only = sorted(set(a) ^ set(b))
    return (
        f"{len(shared)} tensors in both outputs, {len(different)} differ"
        + (f" ({', '.join(different)})" if different else "")
        + (f"; only in one: {', '.join(only)}" if only else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the generated folders")
    parser.add_argument("--upstream-venv", type=Path, default=DEFAULT_UPSTREAM_VENV)
    parser.add_argument("--build", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build is not None:  # the child process that writes the sources
        _verifier(args.build / "verifier", BIG)
        _verifier(args.build / "tiny-verifier", TINY)
        total, largest = _source(args.build / "src-sharded", BIG, sharded=True)
        _source(args.build / "src-single", BIG, sharded=False)
        _source(args.build / "src-tiny", TINY, sharded=False)
        (args.build / "sizes.json").write_text(json.dumps({"total": total, "largest": largest}))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print("writing sources ...", flush=True)
        subprocess.run([sys.executable, __file__, "--build", str(work)], check=True)
        sizes = json.loads((work / "sizes.json").read_text())
        total, largest = sizes["total"], sizes["largest"]
        verifier, tiny_verifier = work / "verifier", work / "tiny-verifier"
        mb = 1 << 20
        print(f"source: {total / mb:.0f} MB in 2 shards, largest tensor {largest / mb:.0f} MB")

        fixed = _ours(work / "src-tiny", tiny_verifier, work / "out-tiny")
        sharded = _ours(work / "src-sharded", verifier, work / "out-sharded")
        bound = 1.5 * largest / mb + fixed["peak_rss_mb"]
        ok = sharded["peak_rss_mb"] < bound
        print(
            f"fixed overhead (tiny conversion): peak RSS {fixed['peak_rss_mb']:.0f} MB, {fixed['wall_s']:.1f} s"
        )
        print(
            f"ours, sharded 1 GB source: peak RSS {sharded['peak_rss_mb']:.0f} MB, "
            f"{sharded['wall_s']:.1f} s; bound 1.5 x {largest / mb:.0f} MB + "
            f"{fixed['peak_rss_mb']:.0f} MB = {bound:.0f} MB -> {'OK' if ok else 'EXCEEDED'}"
        )

        single = _ours(work / "src-single", verifier, work / "out-single")
        print(
            f"ours, single-file source: peak RSS {single['peak_rss_mb']:.0f} MB, {single['wall_s']:.1f} s"
        )
        if (args.upstream_venv / "bin" / "speculators").exists():
            upstream = _upstream(
                args.upstream_venv, work / "src-single", verifier, work / "out-upstream"
            )
            print(
                f"upstream speculators 0.9.0, single-file source: peak RSS "
                f"{upstream['peak_rss_mb']:.0f} MB, {upstream['wall_s']:.1f} s"
            )
            print(
                f"ratio upstream/ours: time {upstream['wall_s'] / single['wall_s']:.2f}x, "
                f"peak RSS {upstream['peak_rss_mb'] / single['peak_rss_mb']:.2f}x"
            )
            print("outputs:", _compare_outputs(work / "out-single", work / "out-upstream"))
        else:
            print(f"upstream venv not found at {args.upstream_venv}; side-by-side skipped")
        if not ok:
            raise SystemExit(1)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
