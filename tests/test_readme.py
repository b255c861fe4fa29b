"""The README is the user's door: every command it shows answers --help and takes the options
it shows, and its table of config keys is the config's own (every key listed exists, and
every model, train and parallel key is listed)."""

from __future__ import annotations

import dataclasses
import re
import runpy
import sys
import typing
from pathlib import Path

import pytest

from hylas.train.cli import main
from hylas.train.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_lines() -> list[str]:
    """The commands of the README's fenced code blocks (indented ones too), a line continued
    by a backslash joined to the next, comments cut."""
    blocks = re.findall(r"^ *```[a-z]*\n(.*?)^ *```", README, flags=re.S | re.M)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines()]


# -- commands ----------------------------------------------------------------------------

HYLAS = re.compile(r"(?:^|[\s/\"])hylas ((?:data|eval) [a-z-]+|[a-z][a-z-]*)")


def hylas_commands() -> dict[str, set[str]]:
    """Every `hylas <command>` the README runs, with the long options it gives it."""
    shown: dict[str, set[str]] = {}
    for line in code_lines():
        for m in HYLAS.finditer(line):
            rest = line[m.end() :].split("&&")[0]
            shown.setdefault(m[1], set()).update(re.findall(r"(--[a-z][a-z-]*)", rest))
    return shown


def help_text(run, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        run()
    assert exit_.value.code == 0, "--help did not exit 0"
    return capsys.readouterr().out


def test_the_readme_shows_every_command_group():
    assert set(hylas_commands()) == {
        "train",
        "generate",
        "data tokenizer",
        "data prepare",
        "data merge",
        "export",
        "import-hf",
        "sweep",
        "eval recall",
    }


@pytest.mark.parametrize("command", sorted(hylas_commands()))
def test_each_hylas_command_answers_help_with_the_readmes_options(command, capsys):
    text = help_text(lambda: main([*command.split(), "--help"]), capsys)
    assert text.startswith("usage: hylas " + command)
    for option in sorted(hylas_commands()[command]):
        assert re.search(rf"{option}\b", text), f"README gives `hylas {command} {option}`"


# Python entry points the README shows, run as it runs them (module or file), in process.
ENTRY_POINTS = {
    "python -m hylas.train": ("module", "hylas.train"),
    "python -m hylas.train.cli": ("module", "hylas.train.cli"),
    "python -m tests.gpu_compile_gate": ("module", "tests.gpu_compile_gate"),
    "python -m benchmarks.engine": ("module", "benchmarks.engine"),
    "python -m benchmarks.sp": ("module", "benchmarks.sp"),
    "python benchmarks/kernels.py": ("path", "benchmarks/kernels.py"),
    "python scripts/gpu_check.py": ("path", "scripts/gpu_check.py"),
}


def test_the_readmes_python_entry_points_are_the_ones_checked_here():
    shown = {"python " + m for m in re.findall(r"python[0-9.]* (-m [\w.]+|[\w/]+\.py)", README)}
    assert shown - {"python -m pytest"} == set(ENTRY_POINTS)


# runpy's notice that the module it runs is already imported, as it is in this process
@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import:RuntimeWarning")
@pytest.mark.parametrize("shown", sorted(ENTRY_POINTS))
def test_each_python_entry_point_answers_help(shown, capsys, monkeypatch):
    kind, target = ENTRY_POINTS[shown]
    monkeypatch.setattr(sys, "argv", [target, "--help"])
    if kind == "module":
        text = help_text(lambda: runpy.run_module(target, run_name="__main__"), capsys)
    else:  # as a script: its own folder first on sys.path
        monkeypatch.syspath_prepend(str((ROOT / target).parent))
        text = help_text(lambda: runpy.run_path(str(ROOT / target), run_name="__main__"), capsys)
    assert text.startswith("usage:")
    lines = [line for line in README.splitlines() if shown in line]
    options = {o for line in lines for o in re.findall(r"--[a-z][a-z-]*", line.split(shown)[1])}
    for option in sorted(options):
        assert re.search(rf"{option}\b", text), f"README gives `{shown} {option}`"


# -- config keys -------------------------------------------------------------------------


def table_rows() -> dict[str, str]:
    """The README's config-key table: section -> the text of its keys cell."""
    m = re.search(r"^Config keys of this version.*?\n\n(.*?)\n\n", README, flags=re.S | re.M)
    assert m, "the README has no table of config keys"
    rows = re.findall(r"^\| `(\w+)` \| (.*) \|$", m[1], flags=re.M)
    assert rows, "the README has no table of config keys"
    return dict(rows)


def moe_paragraph() -> str:
    """The sentence listing the MoE keys, their notes cut."""
    m = re.search(r"^MoE \(`model\.moe\.\*`\):(.*?)\.\s", README, flags=re.S | re.M)
    assert m, "the README has no paragraph of MoE keys"
    return top_level(m[1])


def top_level(text: str) -> str:
    """The text outside parentheses: keys are listed there, their values and notes inside."""
    depth, kept = 0, []
    for ch in text:
        depth += ch == "("
        if depth == 0:
            kept.append(ch)
        depth -= ch == ")" and depth > 0
    return "".join(kept)


def keys_in(text: str) -> set[str]:
    return set(re.findall(r"`([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)`", text))


def leaves(cls, prefix: str = "") -> set[str]:
    """Every settable key under a config dataclass, nested sections dotted."""
    out = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.add(prefix + f.name)
    return out


SECTIONS = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def test_the_table_has_a_row_per_config_section():
    assert set(table_rows()) == set(SECTIONS)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_key_the_table_lists_exists(section):
    listed = keys_in(top_level(table_rows()[section]))
    assert listed, f"no keys read from the {section} row"
    unknown = listed - leaves(SECTIONS[section])
    assert not unknown, f"README lists {section} keys that do not exist: {sorted(unknown)}"
    if section == "model":
        moe = {f"moe.{k}" for k in keys_in(moe_paragraph())}
        assert not moe - leaves(SECTIONS["model"]), sorted(moe - leaves(SECTIONS["model"]))


@pytest.mark.parametrize("section", ["model", "train", "parallel"])
def test_every_model_train_and_parallel_key_is_in_the_table(section):
    row = table_rows()[section]
    named = keys_in(row)  # a nested section's keys may be named inside its parentheses
    if section == "model":
        named |= {f"moe.{k}" for k in keys_in(moe_paragraph())}
    missing = set()
    for key in leaves(SECTIONS[section]):
        head, _, last = key.rpartition(".")
        if key in named or (head and f"{head}." in row and last in named):
            continue
        missing.add(key)
    assert not missing, f"{section} keys missing from the README's table: {sorted(missing)}"


def test_the_model_zoo_table_names_every_registered_mixer_and_its_family():
    from hylas.model.registry import LINEAR_MIXERS, check_linear_mixer

    check_linear_mixer("gla")  # fills the registry
    zoo = README.split("## Model zoo")[1].split("\n## ")[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| `(\w+)` \|", zoo, flags=re.M))
    assert set(rows) == set(LINEAR_MIXERS)
    for mixer, family in rows.items():
        assert LINEAR_MIXERS[mixer].family.__name__.rsplit(".", 1)[1] == family, mixer
