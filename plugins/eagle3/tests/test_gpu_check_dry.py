"""The prepared GPU check (benchmarks/gpu/check.sh) in its dry mode, on this CPU.

``--dry`` runs every step of the GPU script at toy shapes on the CPU: the wheel check, the
environment report, one EAGLE-3 training step of ours and of upstream 0.9.0 on the same batch
and one of our P-EAGLE and DFlash drafts (benchmarks/bench_scale.py), and the two-process FSDP2 run of our trainer (gloo). What it
checks here: each step ran and wrote its figures, both sides started from the same weights on
the same batch (equal first losses: the configuration is the same), FSDP2 ran on two processes,
and the wheel check names exactly the wheels the folder lacks.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from test_eagle3_upstream import upstream_python

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "benchmarks" / "gpu" / "check.sh"


def _needed() -> list[str]:
    line = next(
        line for line in SCRIPT.read_text().splitlines() if line.startswith("WHEELS_NEEDED=")
    )
    return line.split("=", 1)[1].strip('"').split()


def test_gpu_check_dry_runs_every_step(tmp_path: Path) -> None:
    needed = _needed()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    present = needed[::2]  # every other wheel is there; the check must name the rest
    for name in present:
        stem = name.split("==")[0].replace("-", "_")
        (wheels / f"{stem}-1.0-py3-none-any.whl").write_bytes(b"")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECULATORS_")}
    env.update(
        PYTHON=sys.executable,
        UPSTREAM_PYTHON=str(upstream_python()),
        WHEELS=str(wheels),
        OUT=str(out),
        TQDM_DISABLE="1",
    )
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry"], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "gpu-check.log").read_text()

    missing = re.search(r"missing:(.*)", log)
    assert missing is not None, log
    assert missing.group(1).split() == [n for n in needed if n not in present]

    scale = json.loads((out / "scale.json").read_text())
    results = scale["results"]
    sides = {(r["side"], r["seq_len"]) for r in results}
    algorithms = ("", "/peagle", "/dflash")
    everyone = [f"{side}{a}" for a in algorithms for side in ("ours", "upstream")]
    assert sides == {(s, n) for s in everyone for n in (64, 128)}, sides
    for seq_len in (64, 128):
        for algorithm in algorithms:
            ours, up = (
                next(r for r in results if r["side"] == side and r["seq_len"] == seq_len)
                for side in (f"ours{algorithm}", f"upstream{algorithm}")
            )
            # Same initial weights, batch, objective (and elements): the same first loss.
            assert math.isclose(ours["first_loss"], up["first_loss"], rel_tol=1e-4), (ours, up)
            for r in (ours, up):
                assert r["times"] and all(t > 0 for t in r["times"])
                assert r["peak_rss_mb"] >= r["loaded_rss_mb"] > 0
                assert r["trainable_params"] > 0
    assert "ours / upstream peak memory" in log
    assert "ours/dflash / upstream/dflash peak memory" in log

    fsdp = json.loads((out / "fsdp.json").read_text())["results"]
    assert [r["world_size"] for r in fsdp] == [2, 2], fsdp
    assert all(r["times"] and all(t > 0 for t in r["times"]) for r in fsdp)
    assert "done in" in log
