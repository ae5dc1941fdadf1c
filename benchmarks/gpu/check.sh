#!/usr/bin/env bash
# The prepared one-GPU check of issue #19: under 8 minutes on one H100/H200.
#
# Runs benchmarks/bench_scale.py on the GPU: one EAGLE-3 training step at Llama-3.1-8B draft
# shapes (hidden 4096, verifier vocab 128256, draft vocab 32000, 3 aux states) in bf16 autocast,
# ours and upstream speculators 0.9.0's on the same batch, and our P-EAGLE and DFlash steps, rows
# of 2048 and 8192 tokens; then a
# two-process FSDP2 run of our trainer when there are two or more GPUs (else it says it skips).
# Prints tokens/s, MFU and peak GPU memory; everything it prints is also in $OUT/gpu-check.log.
#
# On the GPU machine (which reaches nothing), with the wheels of prepare.sh carried in .whl:
#   bash benchmarks/gpu/check.sh
# Here, on a CPU, every step at toy shapes (a test runs this):
#   bash benchmarks/gpu/check.sh --dry
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$(pwd)"

# What the GPU image lacks (prepare.sh downloads these; ours are built there from this checkout).
WHEELS_NEEDED="pydantic pydantic-core annotated-types typing-inspection pydantic-settings python-dotenv stevedore loguru datasets dill multiprocess openai distro jiter sniffio speculators==0.9.0 hs-connectors==0.9.0"

dry=0
if [ "${1:-}" = "--dry" ]; then dry=1; fi
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
log="$out/gpu-check.log"
: > "$log"
say() { echo "[gpu-check] $*" | tee -a "$log"; }
started=$(date +%s)

# 1. Install ---------------------------------------------------------------------------------
wheels="${WHEELS:-$repo/.whl}"
if [ "$dry" = 1 ]; then
    py="${PYTHON:-$repo/.venv/bin/python}"
    upstream_py="${UPSTREAM_PYTHON:-$repo/.cache/upstream-venv/bin/python}"
    if [ -d "$wheels" ]; then
        missing=""
        for name in $WHEELS_NEEDED; do
            stem="$(echo "${name%%==*}" | tr '-' '_')"
            ls "$wheels" | tr '-' '_' | grep -qi "^${stem}_" || missing="$missing $name"
        done
        say "dry: $(ls "$wheels" | grep -c '\.whl$') wheels in $wheels; missing:${missing:- none}"
    else
        say "dry: no wheel folder $wheels (prepare.sh makes it); install step skipped"
    fi
else
    py="${PYTHON:-python3}"
    if [ ! -d "$wheels" ]; then
        say "no wheel folder $wheels: run benchmarks/gpu/prepare.sh where the registries are reachable, and carry .whl"
        exit 2
    fi
    site=/tmp/gpu-check-site
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    upstream_py="$py"
    say "installed $(ls "$wheels" | grep -c '\.whl$') wheels into $site in $(( $(date +%s) - started )) s"
fi

# 2. Environment ------------------------------------------------------------------------------
gpus=$("$py" - <<'PY'
import torch
print(torch.cuda.device_count() if torch.cuda.is_available() else 0)
PY
)
"$py" -c "import torch, transformers, speculators_core; print('[gpu-check] torch', torch.__version__, '| transformers', transformers.__version__, '| GPUs', torch.cuda.device_count(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee -a "$log"
if [ "$dry" = 0 ] && [ "$gpus" -lt 1 ]; then
    say "no GPU visible to torch: nothing to measure (use --dry on a CPU)"
    exit 2
fi
if [ ! -x "$upstream_py" ] && ! command -v "$upstream_py" >/dev/null; then
    say "no upstream Python ($upstream_py): upstream's side is skipped"
    sides=ours
else
    sides=ours,upstream
fi

# 3. One training step at 8B shapes, ours and upstream's ---------------------------------------
if [ "$dry" = 1 ]; then
    scale=(--tiny --device cpu --steps 1)
else
    scale=(--device cuda --seq-lens 2048,8192 --draft-vocabs 32000 --steps 3)
fi
"$py" benchmarks/bench_scale.py "${scale[@]}" --sides "$sides" --upstream-python "$upstream_py" \
    --algorithms eagle3,peagle,dflash --json "$out/scale.json" 2>&1 | tee -a "$log"

# 4. Two-process FSDP2 -------------------------------------------------------------------------
if [ "$dry" = 1 ] || [ "$gpus" -ge 2 ]; then
    if [ "$dry" = 1 ]; then
        fsdp=(--tiny --device cpu --steps 1)
    else
        fsdp=(--device cuda --seq-lens 8192 --draft-vocabs 32000 --steps 3)
    fi
    "$py" benchmarks/bench_scale.py "${fsdp[@]}" --sides "" --fsdp-procs 2 \
        --json "$out/fsdp.json" 2>&1 | tee -a "$log"
else
    say "skip FSDP2: $gpus GPU here, it needs 2"
fi
say "done in $(( $(date +%s) - started )) s; figures in $out"
