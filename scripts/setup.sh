#!/usr/bin/env bash
# Make (or reuse) the virtual environment .venv in this checkout, for a CPU machine: the
# CPU build of torch first, Triton for the interpreter tests, then Hylas (editable) with
# its test tools. Re-running it is cheap: a complete .venv is reused as it is.
#
#   bash scripts/setup.sh                      # the exact versions of requirements.lock
#   HYLAS_DEPS=latest bash scripts/setup.sh    # the newest releases within pyproject's
#                                              # ranges (finds drift on purpose)
#   HYLAS_TORCH=skip bash scripts/setup.sh     # keep the torch already in .venv (e.g. CUDA)
#   bash scripts/lock.sh                       # refresh requirements.lock
#
# torch and triton come from requirements.lock in both modes: they are this set-up's CPU
# build and the Triton its interpreter tests need, not the package's requirements.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEPS=${HYLAS_DEPS:-lock}
VENV=${HYLAS_VENV:-.venv}
LOCK=requirements.lock
STAMP=$VENV/.hylas-setup

case "$DEPS" in
    lock | latest) ;;
    *) echo "hylas setup: HYLAS_DEPS must be 'lock' or 'latest', got '$DEPS'" >&2; exit 2 ;;
esac
pinned() { grep -E "^$1==" "$LOCK" || { echo "hylas setup: $LOCK pins no $1" >&2; exit 1; }; }
TORCH_SPEC=${HYLAS_TORCH:-$(pinned torch)}
TRITON_SPEC=${HYLAS_TRITON:-$(pinned triton)}

# The venv is complete when the stamp names this exact set-up.
want=$( (cat pyproject.toml setup.py scripts/setup.sh "$LOCK"; echo "$DEPS $TORCH_SPEC $TRITON_SPEC") \
    | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/hylas" ]; then
    echo "hylas setup: reusing the complete environment in $VENV ($DEPS)"
    exit 0
fi

"$PYTHON" - <<'PY' || { echo "hylas setup: Python 3.10 or newer is needed (set PYTHON=...)" >&2; exit 1; }
import sys
sys.exit(sys.version_info < (3, 10))
PY

# Another set-up's venv is made anew, so nothing of it lingers; one whose torch is to be
# kept (HYLAS_TORCH=skip) is installed over.
if [ -d "$VENV" ] && [ "$TORCH_SPEC" != "skip" ]; then
    echo "hylas setup: $VENV was made by another set-up; making it anew"
    rm -rf "$VENV"
fi
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
torch_now=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('torch').split('+')[0])")

if [ "$DEPS" = lock ]; then
    echo "hylas setup: installing the exact versions of $LOCK"
    # Everything but torch and triton, with no resolution: the lock is the whole set.
    grep -vE '^(torch|triton)==' "$LOCK" >"$VENV/.hylas-lock-rest.txt"
    "${pip[@]}" --no-deps -r "$VENV/.hylas-lock-rest.txt"
    "${pip[@]}" --no-deps --no-build-isolation -e .
    "$VENV/bin/python" -m pip check --disable-pip-version-check >/dev/null \
        || { "$VENV/bin/python" -m pip check; echo "hylas setup: $LOCK is incomplete; refresh it (bash scripts/lock.sh)" >&2; exit 1; }
else
    echo "hylas setup: installing the newest releases within pyproject's ranges (torch $torch_now kept)"
    echo "torch==$torch_now" >"$VENV/.hylas-keep-torch.txt"
    "${pip[@]}" --upgrade --upgrade-strategy eager -c "$VENV/.hylas-keep-torch.txt" -e ".[dev]"
fi
"$VENV/bin/python" -c "import torch, transformers, hylas.train.cli; print('hylas setup: ready, torch', torch.__version__, 'transformers', transformers.__version__)"
echo "$DEPS" >"$VENV/.hylas-deps"  # which set-up made it (tests/test_package.py reads it)
echo "$want" >"$STAMP"
