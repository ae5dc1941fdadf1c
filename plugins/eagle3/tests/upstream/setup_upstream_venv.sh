#!/usr/bin/env bash
# Create (or refresh) the virtualenv that runs the real upstream `speculators==0.9.0` for the
# EAGLE-3 interop tests. Idempotent: an existing venv that already imports upstream's Eagle3
# model is left as it is.
#
# Usage: setup_upstream_venv.sh VENV_DIR [PYTHON]
#
# Why a separate venv: `speculators` installs its own `speculators` console script (which would
# shadow ours) and declares heavy dependencies (torchvision, torchaudio, vLLM connectors) that
# break next to the CPU torch. We install it with --no-deps and add only the light packages its
# model code imports, with torch pinned through the project's CPU constraints.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 VENV_DIR [PYTHON]" >&2
    exit 2
fi
VENV_DIR="$1"
PYTHON="${2:-python3.11}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../../../.." && pwd)"
CONSTRAINTS="$REPO_ROOT/constraints-cpu.txt"

check() {
    "$VENV_DIR/bin/python" -c "import importlib.metadata as m, speculators.models.eagle3, speculators.train.cli; assert m.version('speculators') == '0.9.0'" >/dev/null 2>&1
}

if [[ -x "$VENV_DIR/bin/python" ]] && check; then
    echo "upstream venv at $VENV_DIR is ready (speculators 0.9.0)"
    exit 0
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    PYTHON=python3
fi
"$PYTHON" -m venv "$VENV_DIR"
PIP=("$VENV_DIR/bin/python" -m pip install --disable-pip-version-check -q)
# What upstream's model, config, loss and data modules import (its METADATA, minus torchvision,
# torchaudio and the mooncake extras): torch and transformers pinned like the main environment,
# then the pure-Python packages its import chain needs (`speculators.models.eagle3` imports
# `speculators.train.data`, which imports openai, datasets and hs_connectors).
"${PIP[@]}" -c "$CONSTRAINTS" \
    "torch==2.13.0" "transformers==5.19.0" "pydantic>=2" "pydantic-settings>=2" safetensors \
    "numpy>=2,<=2.5.4" "tqdm>=4.66.3,<=4.70.1" "loguru>=0.7.2,<=0.7.3" huggingface-hub \
    click "typer>=0.12" rich protobuf psutil pyyaml httpx aiohttp "openai>=2" \
    "datasets>=4.0.0,<=5.1.0"
"${PIP[@]}" --no-deps "hs-connectors==0.9.0"
"${PIP[@]}" --no-deps "speculators==0.9.0"
# Never keep these next to the CPU torch (they break transformers' imports).
"$VENV_DIR/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true

if ! check; then
    echo "upstream venv at $VENV_DIR: 'import speculators.models.eagle3' fails:" >&2
    "$VENV_DIR/bin/python" -c "import speculators.models.eagle3" >&2 || true
    exit 1
fi
echo "upstream venv at $VENV_DIR is ready (speculators 0.9.0)"
