"""The modeling code a Hugging Face export carries: Hylas's own modules, copied.

An export must load with nothing but torch and transformers, and give Hylas's numbers.
So it does not carry a second implementation of the model: it carries copies of the
modules that define it (the decoder, the mixers, the torch chunkwise kernels, and the
Hugging Face wrapper in ``hf_model``), one file per module, flattened into the export
directory (``hylas.kernels.gla`` -> ``hylas_kernels_gla.py``), with their Hylas imports
rewritten to relative ones. Nothing else changes, so the exported model cannot drift from
the model that trained it (docs/architecture.md, "Hugging Face export").

The rewriting, statement by statement:
    ``from hylas.a.b import x``   -> ``from .hylas_a_b import x``   (a bundled module)
    ``from hylas.a import b``     -> ``from . import hylas_a_b as b`` (a bundled module)
    ``import hylas.a.b``          -> ``from . import hylas_a_b``
    an import of anything else but the standard library, torch and transformers (the
    Triton kernels, Triton itself), which only a function body may hold, becomes a
    ``raise ImportError`` that says so: the bundle runs the torch path.
Imports inside ``try`` blocks are left as they are: that is where ``hf_model`` looks for
an installed Hylas, and where transformers' import check does not look.

transformers copies the remote-code files that ``from .name import ...`` lines name;
``from . import name`` is not followed, so each root (the wrapper and its configuration)
gets one line per module it needs (``MANIFEST_LINE``) that names every file.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

from hylas.configs.base import BundleError

# Where the closure starts: the Hugging Face wrapper and its configuration.
ROOTS = ("hylas.train.hf.modeling", "hylas.train.hf.configuration")
# What a bundled file may import at module level besides the standard library.
ALLOWED_TOP_LEVEL = {"torch", "transformers", "safetensors", "__future__"}
# The wrapper and its configuration keep the names transformers users expect.
EXPORT_NAMES = {
    "hylas.train.hf.modeling": "modeling_hylas",
    "hylas.train.hf.configuration": "configuration_hylas",
}


def file_name(module: str) -> str:
    """``hylas.kernels.gla`` -> ``hylas_kernels_gla`` (no suffix)."""
    return EXPORT_NAMES.get(module) or module.replace(".", "_")


def _source(module: str) -> tuple[str, Path]:
    file = importlib.import_module(module).__file__
    if file is None:  # a namespace package: no source of its own
        raise BundleError(f"{module} has no source file to bundle")
    path = Path(file)
    return path.read_text(), path


def _is_module(name: str) -> bool:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    return spec is not None


def _imports(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement and whether it sits inside a ``try`` block."""

    def walk(node: ast.AST, in_try: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            inside = in_try or isinstance(child, ast.Try)
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_try
            else:
                yield from walk(child, inside)

    yield from walk(tree, False)


def _hylas_targets(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The Hylas modules an import statement loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("hylas.")]
    module = node.module or ""
    if node.level or not module.startswith("hylas"):
        return []
    out = []
    for alias in node.names:
        sub = f"{module}.{alias.name}"
        out.append(sub if _is_module(sub) else module)
    return out


def _runs_on_triton(tree: ast.Module) -> bool:
    """Whether a module imports Triton at module level: a GPU kernel module, never bundled
    (the imports of it become an ImportError; the bundle runs the torch path)."""
    for node in tree.body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        if any(n.split(".")[0] == "triton" for n in names):
            return True
    return False


def closure(roots: tuple[str, ...] = ROOTS) -> list[str]:
    """The Hylas modules the roots import, transitively, sorted, but for the Triton ones."""
    seen, triton, todo = set(), set(), list(roots)
    while todo:
        module = todo.pop()
        if module in seen or module in triton:
            continue
        tree = ast.parse(_source(module)[0])
        if _runs_on_triton(tree):
            triton.add(module)
            continue
        seen.add(module)
        for node, in_try in _imports(tree):
            if not in_try:
                todo.extend(_hylas_targets(node))
    return sorted(seen)


def _rewrite_import(
    node: ast.Import | ast.ImportFrom, bundled: set[str], where: str, top_level: bool
) -> str | None:
    """The replacement text of one import statement, or None to keep it."""
    if isinstance(node, ast.ImportFrom) and node.level:
        return None
    names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
    top = {n.split(".")[0] for n in names if n}
    if top <= (ALLOWED_TOP_LEVEL | set(sys.stdlib_module_names)):
        return None
    if (
        isinstance(node, ast.ImportFrom)
        and node.module in bundled
        and all(f"{node.module}.{a.name}" not in bundled for a in node.names)
    ):
        items = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
        return f"from .{file_name(node.module)} import {items}"
    if isinstance(node, ast.ImportFrom) and all(
        f"{node.module}.{a.name}" in bundled for a in node.names
    ):
        items = ", ".join(
            f"{file_name(f'{node.module}.{a.name}')} as {a.asname or a.name}" for a in node.names
        )
        return f"from . import {items}"
    if isinstance(node, ast.Import) and all(a.name in bundled and not a.asname for a in node.names):
        return "from . import " + ", ".join(file_name(a.name) for a in node.names)
    if top_level:
        raise BundleError(
            f"{where} imports {', '.join(sorted(top))} at module level, which an export cannot "
            "carry; import it inside the function that needs it"
        )
    what = ", ".join(n for n in names if n)
    return f'raise ImportError("{what} is not part of a Hylas export, which runs the torch path")'


def rewrite(module: str, bundled: set[str]) -> str:
    """The bundled copy of ``module``: its source with the imports rewritten."""
    text, path = _source(module)
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    module_level = {id(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
    edits = []
    for node, in_try in _imports(tree):
        if in_try:
            continue
        new = _rewrite_import(node, bundled, f"{path.name}:{node.lineno}", id(node) in module_level)
        if new is not None:
            edits.append((node, new))
    for node, new in sorted(edits, key=lambda e: -e[0].lineno):
        assert node.end_lineno is not None  # ast.parse gives every statement its end
        first, last = node.lineno - 1, node.end_lineno - 1
        indent = lines[first][: node.col_offset]
        tail = lines[last][node.end_col_offset :]  # a trailing comment, and the newline
        lines[first : last + 1] = [indent + new + tail]
    header = f"# Copied from Hylas's {module} by `hylas export`; its Hylas imports made relative.\n"
    return header + "".join(lines)


MANIFEST_LINE = "# -- the bundled modules --"


def write_bundle(directory: Path) -> list[str]:
    """Write every bundled module into ``directory``; return the file names written.

    Each root gets, at its ``MANIFEST_LINE``, one ``from .name import __name__`` line per
    module it needs (transformers copies the files it sees named so), and the configuration
    file ends with a digest of every file written: transformers maps a configuration class to
    its model class within a process, so two exports with different code must not share a
    byte-identical configuration file."""
    modules = closure()
    bundled = set(modules)
    texts = {}
    for module in modules:
        text = rewrite(module, bundled)
        if module in ROOTS:
            names = "".join(
                f"from .{file_name(m)} import __name__ as _  # noqa: F401\n"
                for m in closure((module,))
                if m not in ROOTS
            )
            if MANIFEST_LINE not in text:
                raise BundleError(f"{module} lacks the line {MANIFEST_LINE!r}")
            text = text.replace(MANIFEST_LINE, MANIFEST_LINE + "\n" + names.rstrip("\n"), 1)
        texts[f"{file_name(module)}.py"] = text
    digest = hashlib.sha256("".join(texts[n] for n in sorted(texts)).encode()).hexdigest()
    texts[f"{file_name(ROOTS[1])}.py"] += f'\nHYLAS_CODE_DIGEST = "{digest}"\n'
    for name, text in texts.items():
        (directory / name).write_text(text)
    return sorted(texts)


def source_digest() -> str:
    """sha256 over the bundled modules' sources: an installed Hylas whose digest equals an
    export's runs that export with its own kernels (Triton on CUDA)."""
    h = hashlib.sha256()
    for module in closure():
        h.update(module.encode() + b"\0" + _source(module)[0].encode() + b"\0")
    return h.hexdigest()
