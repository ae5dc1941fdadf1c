"""Benchmark: peak memory of ``speculators data prepare`` against the number of records read.

A user takes a few thousand samples out of a large chat dataset; memory should not grow with
the dataset. This writes JSON-lines files of ShareGPT training records (the built-in data,
repeated with fresh ids) at ``--rows`` sizes (by default 2,000, then 10x and 100x), and runs
``speculators data prepare --max-samples N`` on each in a fresh process, one at a time, reading
each child's peak resident memory from the kernel (``wait4``). For comparison the same files go
through the old path, ``load_conversations`` (every conversation in a list, then shuffled), in
a child of its own.

    .venv/bin/python benchmarks/bench_data_memory.py [--rows 2000,20000,200000] [--max-samples 500]
        [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LOAD_ALL = r"""
import resource, sys
from speculators_core.data.conversations import load_conversations
conversations = load_conversations([sys.argv[1]], seed=0)
print(len(conversations))
"""


def write_rows(path: Path, rows: int) -> int:
    """``rows`` ShareGPT training records, cycled, each with its own id; returns bytes."""
    from speculators_core.assets import sharegpt_records

    base = list(sharegpt_records("train"))
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            record = dict(base[i % len(base)])
            record["id"] = f"{record.get('id', '')}-{i}"
            handle.write(json.dumps(record) + "\n")
    return path.stat().st_size


def run_measured(command: list[str]) -> tuple[int, float, float, str]:
    """Run ``command``; return its exit code, peak RSS in MB, seconds and stderr's last line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECULATORS_")}
    env["TQDM_DISABLE"] = "1"
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
    seconds = time.perf_counter() - started
    return proc.returncode, usage.ru_maxrss / 1024, seconds, lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="2000,20000,200000")
    parser.add_argument("--max-samples", type=int, default=500)
    parser.add_argument("--work", default=None, help="keep the data files here")
    parser.add_argument("--no-old", action="store_true", help="skip the load_conversations rows")
    parser.add_argument("--write", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.write:
        write_rows(Path(opts.write), int(opts.rows))
        return

    work = Path(opts.work) if opts.work else Path(tempfile.mkdtemp(prefix="bench-data-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    speculators = str(Path(sys.executable).with_name("speculators"))
    table = []
    for rows in (int(r) for r in opts.rows.split(",")):
        data = work / f"chats-{rows}.jsonl"
        if not data.exists():
            # In a child: the parent stays small, and a child's peak RSS starts from its
            # parent's at fork, so a parent holding ShareGPT would inflate every figure.
            subprocess.run(
                [sys.executable, __file__, "--write", str(data), "--rows", str(rows)], check=True
            )
        size = data.stat().st_size
        print(f"{rows:,} records ({size / 2**20:,.0f} MB) ...", file=sys.stderr, flush=True)
        out = work / f"prepared-{rows}"
        code, peak, seconds, last = run_measured(
            [speculators, "data", "prepare", "--verifier", "smollm2", "--data", str(data),
             "--output", str(out), "--max-samples", str(opts.max_samples), "--seq-length",
             "1024", "--overwrite"]
        )  # fmt: skip
        if code != 0:
            raise SystemExit(f"data prepare failed on {rows} records: {last}")
        row = {"rows": rows, "mb": size / 2**20, "peak": peak, "seconds": seconds}
        if not opts.no_old:
            code, old_peak, old_seconds, last = run_measured(
                [sys.executable, "-c", LOAD_ALL, str(data)]
            )
            row |= {"old_peak": old_peak if code == 0 else float("nan"), "old_seconds": old_seconds}
        table.append(row)

    print()
    print(
        f"speculators data prepare --max-samples {opts.max_samples} (SmolLM2 template, "
        f"--seq-length 1024) on JSON lines of ShareGPT records; load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    header = f"{'records':>10}{'file MB':>9}{'peak RSS MB':>13}{'seconds':>9}"
    if not opts.no_old:
        header += f"{'old path: all conversations in a list, MB':>44}"
    print(header)
    for r in table:
        line = f"{r['rows']:>10,}{r['mb']:>9,.0f}{r['peak']:>13,.0f}{r['seconds']:>9.1f}"
        if "old_peak" in r:
            line += f"{r['old_peak']:>44,.0f}"
        print(line)
    first, last_row = table[0], table[-1]
    print(
        f"peak memory at {last_row['rows'] / first['rows']:.0f}x the records: "
        f"{last_row['peak'] / first['peak']:.2f}x (goal: flat)"
    )


if __name__ == "__main__":
    main()
