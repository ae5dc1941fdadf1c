"""glibc's mmap threshold: freed activations go back to the system (a child process each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, sys
import torch
from speculators_core.train.host_memory import return_freed_memory_to_os

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

applied = return_freed_memory_to_os() if sys.argv[1] == "fixed" else None
# A 30 MiB block freed: glibc's dynamic threshold rises to 30 MiB (when not fixed).
block = torch.ones(30 * 2**18)
del block
before = rss_mb()
held, kept = [], []
for _ in range(8):  # 8 x 16 MiB, each followed by a small tensor that stays (as weights do)
    held.append(torch.ones(16 * 2**18))
    kept.append(torch.ones(2**14))
during = rss_mb()
del held
after = rss_mb()
print(json.dumps({"applied": applied, "grew": during - before, "kept": after - before}))
"""


def _probe(mode: str) -> dict[str, float]:
    # glibc's allocator, untouched: earlier tests of the suite (vLLM's) change this process's
    # environment (LD_PRELOAD, OpenMP settings), which its children would inherit.
    env = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR") if k in os.environ}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_fixed_threshold_returns_freed_tensors_to_the_system() -> None:
    """With the threshold fixed, 128 MiB of freed 16 MiB tensors leave the process; with
    glibc's moving threshold they stay resident, held in place by the small tensors that
    were allocated after them (what the setting is for)."""
    fixed, default = _probe("fixed"), _probe("default")
    assert fixed["applied"] is True
    assert fixed["grew"] > 120 and default["grew"] > 120  # the tensors were resident
    assert fixed["kept"] < 16
    if default["kept"] <= 100:  # seen once inside the whole suite, not reproduced alone
        pytest.skip(f"glibc returned the blocks without the setting too ({default}): no contrast")
    assert default["kept"] > 100
