"""Packaging: every code folder installs under hylas.*, recipes and corpus ship as package
data, and a non-editable install works from anywhere."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
NOT_PACKAGED = ("tests", "benchmarks", "scripts", "docs", ".venv", "build", ".ci")


def test_every_code_folder_is_a_listed_package():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {Path(d) for d in tool["package-dir"].values()}
    # the code folders themselves are namespace packages (no __init__.py; see
    # test_no_shadowing.py), so look for any module, not for package inits
    code = set(ROOT.glob("*/**/*.py")) | set(ROOT.glob("configs/*.yaml"))
    folders = {p.parent.relative_to(ROOT) for p in code}
    folders = {
        f for f in folders if f.parts[0] not in NOT_PACKAGED and "__pycache__" not in f.parts
    }
    assert folders <= mapped, (
        f"folders missing from pyproject's package-dir: {sorted(folders - mapped)}"
    )
    assert set(tool["packages"]) == set(tool["package-dir"]), "packages and package-dir disagree"
    assert all(name.startswith("hylas.") for name in tool["packages"])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("hylas-*.whl")
    return path


def test_wheel_holds_one_namespace_with_recipes_and_corpus(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"hylas"}
    assert "hylas/configs/tiny.yaml" in names
    assert "hylas/data/corpus/shakespeare.jsonl.xz" in names
    assert "hylas/kernels/gla/__init__.py" in names


def test_non_editable_install_loads_recipe_and_corpus(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--quiet",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    code = (
        "import hylas.train.config as c, hylas.data.corpus as d;"
        "assert 'hylas/train/config.py' in c.__file__.replace('\\\\', '/') and 'site' in c.__file__;"
        "print(c.load_config('tiny').model.pattern, len(d.load_corpus()))"
    )
    # run from an empty directory with only the installed copy on the path
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["LLLF", "42"]
