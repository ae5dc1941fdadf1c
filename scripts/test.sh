#!/usr/bin/env bash
# Run the whole test suite (core, plugins, integration, real SmolLM2 and vLLM tests).
# Sets the machine up first (scripts/setup.sh is idempotent). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export SPECULATORS_STRICT_PLUGINS=1
exec "${VENV:-.venv}/bin/python" -m pytest "$@"
