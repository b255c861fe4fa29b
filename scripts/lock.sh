#!/usr/bin/env bash
# Refresh requirements.lock: the newest releases within pyproject's ranges, installed into a
# fresh temporary venv by scripts/setup.sh (HYLAS_DEPS=latest), then frozen. torch and
# triton keep the lock's pins (the CPU set-up's choice: edit those two lines to move them).
# The lock names versions only, never a package index.
#
#   bash scripts/lock.sh && git diff requirements.lock
set -euo pipefail
cd "$(dirname "$0")/.."

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
HYLAS_VENV="$tmp/venv" HYLAS_DEPS=latest bash scripts/setup.sh

{
    echo "# The exact versions scripts/setup.sh installs on a CPU machine (Python $("$tmp/venv/bin/python" -c 'import sys; print(*sys.version_info[:2], sep=".")')),"
    echo "# every package but Hylas itself. Refresh: bash scripts/lock.sh (scripts/setup.sh says how)."
    # --all keeps setuptools (Hylas's editable build runs without build isolation);
    # local version labels (+cpu) are left out: the set-up picks the build.
    "$tmp/venv/bin/python" -m pip freeze --all --exclude-editable --disable-pip-version-check \
        | grep -vE '^(pip|hylas)==' | sed -E 's/\+[A-Za-z0-9.]+$//' | LC_ALL=C sort -f
} >requirements.lock.partial
mv requirements.lock.partial requirements.lock  # whole or not at all
echo "hylas lock: wrote requirements.lock ($(grep -vc '^#' requirements.lock) packages)"
