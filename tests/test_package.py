"""Packaging: every code folder installs under hylas.*, recipes and corpus ship as package
data, and a non-editable install works from anywhere."""

import os
import runpy
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
NOT_PACKAGED = ("tests", "benchmarks", "scripts", "docs", ".venv", "build", ".ci")


def discovered() -> dict[str, str]:
    """setup.py's packages, read without running setup()."""
    return runpy.run_path(str(ROOT / "setup.py"), run_name="discovery")["packages"]()


def test_every_code_folder_is_discovered_as_a_hylas_package():
    # the code folders themselves are namespace packages (no __init__.py; see
    # test_no_shadowing.py), so look for any module, not for package inits
    code = set(ROOT.glob("*/**/*.py")) | set(ROOT.glob("configs/*.yaml"))
    folders = {p.parent.relative_to(ROOT).as_posix() for p in code}
    folders = {
        f
        for f in folders
        if f.split("/")[0] not in NOT_PACKAGED and "__pycache__" not in f and f[0] != "."
    }
    found = discovered()
    assert set(found.values()) == folders
    assert all(name == "hylas." + path.replace("/", ".") for name, path in found.items())
    assert "hylas.kernels.gated_deltaproduct" in found  # a family ships by being there


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


@pytest.mark.integration
def test_wheel_holds_one_namespace_with_recipes_and_corpus(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"hylas"}
    assert "hylas/configs/tiny.yaml" in names
    assert "hylas/data/corpus/shakespeare.jsonl.xz" in names
    assert "hylas/kernels/gla/__init__.py" in names
    for package in discovered():  # every discovered package, with its files
        assert any(n.startswith(package.replace(".", "/") + "/") for n in names), package


@pytest.mark.integration
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


def lock_pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not an exact name==version pin"
            pins[canonicalize_name(name)] = version
    return pins


def test_the_lock_pins_every_requirement_within_its_range_and_names_no_index():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    text = (ROOT / "requirements.lock").read_text()
    urls = [line for line in text.splitlines() if line.startswith("-") or "://" in line]
    assert not urls, "the lock holds options or URLs; it names versions only"
    pins = lock_pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    for spec in map(Requirement, needed):
        name = canonicalize_name(spec.name)
        assert name in pins, f"requirements.lock has no pin for {spec.name}"
        assert spec.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {spec.name}=={pins[name]}, outside pyproject's {spec}"
        )
    assert "hylas" not in pins and "pip" not in pins


def test_the_set_up_installs_what_the_lock_says():
    """The running environment is the lock's (CI's set-up); a mismatch means the lock or
    the set-up drifted. Skipped in an environment made with HYLAS_DEPS=latest."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    made_by = Path(sys.prefix) / ".hylas-deps"
    if not made_by.exists() or made_by.read_text().strip() != "lock":
        pytest.skip("not an environment made by scripts/setup.sh from the lock")
    installed = {
        canonicalize_name(d.metadata["Name"]): d.version.split("+")[0]
        for d in metadata.distributions()
    }
    wrong = {n: (v, installed.get(n)) for n, v in lock_pins().items() if installed.get(n) != v}
    assert not wrong, f"locked and installed versions differ: {wrong}"
