"""The op families Hylas has, one line each (docs/architecture.md, "Op families").

A family is a folder ``kernels/<name>/`` whose module holds its calls (``chunk``, ``naive``,
``recurrent``, the LASP-2 protocol) and its ``SPEC`` (``hylas.kernels.family``). Adding a
family is adding its folder and its line here; the mixers, sequence parallelism, the compile
gate, the benchmarks, the tests and the export read the families from this list.
"""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = (
    "linear_attn",
    "simple_gla",
    "gla",
    "delta_rule",
    "gated_delta_rule",
    "gated_deltaproduct",
)


def family(name: str) -> ModuleType:
    """The module of the family ``name`` (``hylas.kernels.<name>``)."""
    if name not in FAMILIES:
        raise ValueError(f"{name!r} is not an op family; the families: {', '.join(FAMILIES)}")
    return importlib.import_module(f"hylas.kernels.{name}")


def families() -> dict[str, ModuleType]:
    """Every family's module, by name, in the order above."""
    return {name: family(name) for name in FAMILIES}
