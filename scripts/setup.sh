#!/usr/bin/env bash
# Create .venv with the pinned dependencies (requirements.lock) and lors-bench installed editable.
# Needs only Python >= 3.11 and network access to PyPI. Re-running it is cheap (uv caches wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v uv >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --user "uv==0.13.8" 2>/dev/null || "$PY" -m pip install --quiet "uv==0.13.8"
  export PATH="$HOME/.local/bin:$PATH"
fi
[ -x .venv/bin/python ] || uv venv --quiet --python "$PY" .venv
# --compile-bytecode: write every .pyc now. Where PYTHONDONTWRITEBYTECODE is set (as on the CI
# machines) Python never caches bytecode itself, and each of a `dvc repro`'s ~20 stage processes would
# compile torch, timm and torch._dynamo from source again: 7-9 s of every stage's start instead of 2-3.
VIRTUAL_ENV=.venv uv pip sync --quiet --compile-bytecode requirements.lock
VIRTUAL_ENV=.venv uv pip install --quiet --no-deps -e .
.venv/bin/python -m compileall -q lors baselines >/dev/null
echo "ready: .venv (activate with 'source .venv/bin/activate')"
