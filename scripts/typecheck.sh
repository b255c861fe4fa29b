#!/usr/bin/env bash
# mypy over model/, train/, parallel/ and data/, as the hylas.* packages they install as
# (settings in pyproject.toml, [tool.mypy]). The code folders map onto hylas.* through
# setuptools' package-dir, which mypy cannot follow, so it reads them through a tree of
# links named as installed (.cache/mypy-tree, removed on exit: a fixed place, so mypy's
# cache stays valid); the paths it prints are given back as the repository's own. Only Python files and the
# folders that hold them are linked: data/corpus/ (the embedded text) would otherwise hide
# data/corpus.py from mypy.
set -euo pipefail
cd "$(dirname "$0")/.."
MYPY=${MYPY:-.venv/bin/mypy}
tree=$PWD/.cache/mypy-tree
rm -rf "$tree"
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree/hylas"
for folder in configs data kernels model parallel train; do
    mkdir "$tree/hylas/$folder"
    for entry in "$folder"/*; do
        if [[ $entry == *.py ]] || compgen -G "$entry/*.py" >/dev/null; then
            ln -s "$PWD/$entry" "$tree/hylas/$entry"
        fi
    done
done
MYPYPATH=$tree "$MYPY" -p hylas.model -p hylas.train -p hylas.parallel -p hylas.data \
    | sed "s#$tree/hylas/##"
