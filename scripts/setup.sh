#!/usr/bin/env bash
# Make (or reuse) the virtual environment .venv in this checkout, for a CPU machine:
# a CPU build of torch first, Triton for the interpreter tests, then Hylas (editable)
# with its test tools. Re-running it is cheap: a complete .venv is reused as it is.
#
#   bash scripts/setup.sh            # CPU set-up (torch 2.13.0 CPU, triton 3.7.1)
#   HYLAS_TORCH=skip bash scripts/setup.sh   # keep the torch already in .venv (e.g. CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${HYLAS_TORCH:-torch==2.13.0}
TRITON_SPEC=${HYLAS_TRITON:-triton==3.7.1}
VENV=.venv
STAMP=$VENV/.hylas-setup

# The venv is complete when the stamp names this exact set-up (pyproject and this script).
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/hylas" ]; then
    echo "hylas setup: reusing the complete environment in $VENV"
    exit 0
fi

"$PYTHON" - <<'PY' || { echo "hylas setup: Python 3.10 or newer is needed (set PYTHON=...)" >&2; exit 1; }
import sys
sys.exit(sys.version_info < (3, 10))
PY

if [ ! -x "$VENV/bin/python" ]; then
    echo "hylas setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
rm -f "$STAMP"

# torch before anything that depends on it, or pip would pull a multi-GB CUDA build.
if [ "$TORCH_SPEC" != "skip" ]; then
    echo "hylas setup: installing $TORCH_SPEC and $TRITON_SPEC"
    "${pip[@]}" "$TORCH_SPEC" "$TRITON_SPEC"
fi
echo "hylas setup: installing Hylas and its test tools"
"${pip[@]}" -e ".[dev]"
"$VENV/bin/python" -c "import torch, hylas.train; print('hylas setup: ready, torch', torch.__version__)"
echo "$want" > "$STAMP"
