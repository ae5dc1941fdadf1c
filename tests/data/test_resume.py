"""A hidden-state run killed with SIGKILL and restarted yields the same store as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from datatest_support import CHATS, many_chats, write_jsonl

from speculators_core.data.errors import StoreError
from speculators_core.data.prepared import prepare_data
from speculators_core.data.store import ShardStore, capture_to_store, partial_path
from speculators_core.features import HiddenStateSpec

SPEC = HiddenStateSpec((0, 2, 4))

# Runs the capture in a child process whose 3rd shard write stalls after the temporary file is
# complete but before it is renamed: the kill lands in the middle of writing a shard.
CHILD = textwrap.dedent(
    """
    import os, sys, time
    import speculators_core.data.store as store
    from speculators_core.features import HiddenStateSpec

    real_save = store.save_file
    written = 0

    def stalling_save(tensors, path, metadata=None):
        global written
        real_save(tensors, path, metadata=metadata)
        written += 1
        if written == 3:
            open(os.environ["STALLED_MARK"], "w").close()
            time.sleep(600)

    store.save_file = stalling_save
    verifier, prepared, output = sys.argv[1:4]
    store.capture_to_store(verifier=verifier, prepared=prepared, output=output,
                           spec=HiddenStateSpec((0, 2, 4)), shard_size=2, batch_size=2)
    """
)


@pytest.fixture()
def prepared(tiny_verifier: Path, tmp_path: Path) -> Path:
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS + many_chats(7))
    out = tmp_path / "prep"
    prepare_data(verifier=tiny_verifier, sources=[data], output=out, seed=5)
    return out


def run_until_stalled(tiny_verifier: Path, prepared: Path, output: Path, tmp_path: Path) -> None:
    mark = tmp_path / "stalled"
    env = {**os.environ, "STALLED_MARK": str(mark)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tiny_verifier), str(prepared), str(output)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert child.stderr is not None
    try:
        deadline = time.monotonic() + 120
        while not mark.exists():
            if child.poll() is not None:
                raise AssertionError(f"child exited early: {child.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("child never reached the third shard")
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()


def test_sigkill_mid_shard_then_resume_equals_uninterrupted(
    tiny_verifier: Path, prepared: Path, tmp_path: Path
):
    """Kill during the 3rd shard write; rerun; compare with a run that was never interrupted."""
    killed = tmp_path / "killed"
    run_until_stalled(tiny_verifier, prepared, killed, tmp_path)

    # What the kill left: no store under its name, two finished shards, one temporary file.
    assert not killed.exists()
    with pytest.raises(StoreError, match="is incomplete"):
        ShardStore.open(killed)
    work = partial_path(killed)
    names = sorted(p.name for p in work.iterdir())
    assert [n for n in names if n.startswith("shard-")] == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    assert any(n.startswith(".shard-00002.safetensors.tmp-") for n in names)

    summary = capture_to_store(
        verifier=tiny_verifier,
        prepared=prepared,
        output=killed,
        spec=SPEC,
        shard_size=2,
        batch_size=2,
    )
    assert "resumed with 2 of 6 shards done" in summary.notes
    assert not work.exists()

    clean = tmp_path / "clean"
    capture_to_store(
        verifier=tiny_verifier,
        prepared=prepared,
        output=clean,
        spec=SPEC,
        shard_size=2,
        batch_size=2,
    )

    a, b = ShardStore.open(killed), ShardStore.open(clean)
    assert json.loads((killed / "manifest.json").read_text()) == json.loads(
        (clean / "manifest.json").read_text()
    )
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in clean.iterdir())
    assert len(a) == len(b) == 11
    for i in range(len(a)):
        for key in ("input_ids", "loss_mask", "hidden_states"):
            assert torch.equal(a[i][key], b[i][key]), (i, key)


def test_resume_with_other_settings_is_refused(tiny_verifier: Path, prepared: Path, tmp_path: Path):
    """An interrupted run is resumed only by the same command."""
    out = tmp_path / "hs"
    run_until_stalled(tiny_verifier, prepared, out, tmp_path)
    with pytest.raises(StoreError, match=r"used other settings \(batch_size: 2 then, 4 now\)"):
        capture_to_store(
            verifier=tiny_verifier,
            prepared=prepared,
            output=out,
            spec=SPEC,
            shard_size=2,
            batch_size=4,
        )
