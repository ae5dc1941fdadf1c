#!/usr/bin/env bash
# Fetch, on a machine that reaches the package registries, the wheels benchmarks/gpu/check.sh
# installs on a GPU machine that reaches nothing: this project's core and EAGLE-3 plugin (built
# here), upstream speculators 0.9.0, and what either needs that the GPU image (PyTorch,
# transformers, safetensors, click, pluggy, numpy, ...) does not hold. Python 3.12, x86-64.
#
#   bash benchmarks/gpu/prepare.sh [WHEEL_DIR]      # default .whl (ignored by git; carry it)
set -euo pipefail
cd "$(dirname "$0")/../.."
dest="${1:-.whl}"
mkdir -p "$dest"
py="${PYTHON:-.venv/bin/python}"
# Ours, pure Python: built from this checkout.
"$py" -m pip wheel --quiet --no-deps --no-build-isolation -w "$dest" . plugins/eagle3
# Theirs and the missing dependencies, for the GPU image's Python, at the versions the venvs
# here run (pydantic and pydantic-core must match each other; upstream caps datasets).
upstream="${UPSTREAM_PYTHON:-.cache/upstream-venv/bin/python}"
pins=()
for name in $(sed -n 's/^WHEELS_NEEDED=//p' benchmarks/gpu/check.sh | tr -d '"'); do
    if [[ "$name" == *==* ]]; then pins+=("$name"); continue; fi
    version=""
    for interpreter in "$upstream" "$py"; do
        [ -x "$interpreter" ] || continue
        version="$("$interpreter" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name" 2>/dev/null)" && break
        version=""
    done
    pins+=("$name${version:+==$version}")
done
platforms=()
for n in 17 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d "$dest" \
    "${pins[@]}"
ls "$dest"
du -sh "$dest"
