"""Package discovery: every folder under the code folders that holds Python becomes a
``hylas.*`` package, mapped onto its folder (``kernels/gla`` -> ``hylas.kernels.gla``).
Nothing is listed by hand, so a new op family's folder ships by being there. Everything
else about the package is in pyproject.toml."""

from pathlib import Path

# The repository's code folders, installed under one namespace (docs/architecture.md,
# "Packaging: one namespace, no shadowing").
CODE_FOLDERS = ("configs", "data", "kernels", "model", "parallel", "train")
ROOT = Path(__file__).resolve().parent


def packages(root: Path = ROOT) -> dict[str, str]:
    """``hylas.<dotted folder>`` -> the folder, relative to ``root``: each code folder, and
    each folder below it holding a ``.py`` file."""
    found = {}
    for top in CODE_FOLDERS:
        for folder in [root / top, *sorted((root / top).rglob("*"))]:
            if not folder.is_dir() or "__pycache__" in folder.parts:
                continue
            if folder == root / top or any(folder.glob("*.py")):
                relative = folder.relative_to(root)
                found["hylas." + ".".join(relative.parts)] = relative.as_posix()
    return found


if __name__ == "__main__":  # as the build backend runs it; tests read packages() alone
    from setuptools import setup

    found = packages()
    setup(packages=list(found), package_dir=found)
