"""torchrun + FSDP2 on CPU (gloo): two processes reach the losses of one with the same batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parent / "train_script.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"

#: Tolerance: the two runs differ only in the order of float32 reductions (gradients are
#: reduce-scattered across processes, metrics all-reduced), so per-step losses and final
#: weights agree to about 1e-6; 1e-5 absolute leaves room without hiding a wrong gradient
#: (a lost or double-counted micro-batch changes the loss in the third decimal).
TOLERANCE = 1e-5


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECULATORS_")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this python")
def test_two_process_fsdp2_matches_one_process_with_the_same_global_batch(small_verifier, tmp_path):
    """2 processes x 1 row (FSDP2, gloo) == 1 process x 2 rows, step by step, within 1e-5."""
    common = ["--verifier", str(small_verifier), "--epochs", "2"]
    single = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "single"), "--rows", "2", *common],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    dist = subprocess.Popen(
        [
            str(TORCHRUN),
            "--standalone",
            "--nproc_per_node",
            "2",
            str(SCRIPT),
            "--out",
            str(tmp_path / "dist"),
            "--rows",
            "1",
            *common,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    _, dist_err = dist.communicate(timeout=400)
    _, single_err = single.communicate(timeout=400)
    assert dist.returncode == 0, dist_err[-3000:]
    assert single.returncode == 0, single_err[-3000:]

    one = json.loads((tmp_path / "single" / "result.json").read_text())
    two = json.loads((tmp_path / "dist" / "result.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["sharded_parameters"] == 3 and one["sharded_parameters"] == 0
    assert one["global_step"] == two["global_step"] > 10
    assert len(one["log_history"]) == len(two["log_history"])
    for a, b in zip(one["log_history"], two["log_history"], strict=True):
        assert a["step"] == b["step"] and a.keys() == b.keys()
        for key in ("loss", "acc", "val_loss", "val_acc", "grad_norm", "lr"):
            if key in a:
                assert abs(a[key] - b[key]) <= TOLERANCE, (a["step"], key, a[key], b[key])

    # Rank 0 alone wrote the checkpoints and the final model; they hold the full tensors.
    want = load_file(tmp_path / "single" / "final" / "model.safetensors")
    got = load_file(tmp_path / "dist" / "final" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert want[name].shape == got[name].shape
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=TOLERANCE)
    rng_files = sorted(p.name for p in (tmp_path / "dist" / "checkpoints").glob("step-*/rng/*"))
    assert rng_files and all(n in {"rank-00000.pt", "rank-00001.pt"} for n in rng_files)
    shutil.rmtree(tmp_path / "dist", ignore_errors=True)
