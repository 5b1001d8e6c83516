"""requirements.txt and environment.yml must install the same packages.

requirements.txt is the source of truth (``make venv`` and CI install it);
environment.yml repeats it for Binder.  This test fails as soon as one list gains,
loses or re-pins a package the other does not, or drops a per-requirement option
such as learn2learn's ``--config-settings`` build flag.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCAL_INSTALL = "-e ."

Entry = tuple[str, str, tuple[str, ...]]  # (specifier, markers, options)


def _strip_comment(line: str) -> str:
    # pip treats "#" as a comment at the start of a line or after whitespace.
    return re.sub(r"(^|\s)#.*$", "", line).strip()


def _parse(lines: list[str], source: str) -> dict[str, Entry]:
    """Map canonical package name -> (specifier, markers, per-requirement options)."""
    packages: dict[str, Entry] = {}
    for raw in lines:
        line = _strip_comment(raw)
        if not line or line == LOCAL_INSTALL:
            continue
        tokens = shlex.split(line)
        first_option = next((i for i, tok in enumerate(tokens) if tok.startswith("-")), len(tokens))
        if first_option == 0:
            pytest.fail(f"{source}: unexpected option line {raw!r}")
        req = Requirement(" ".join(tokens[:first_option]))
        name = canonicalize_name(req.name)
        if name in packages:
            pytest.fail(f"{source}: {req.name} is listed twice")
        packages[name] = (
            str(req.specifier),
            str(req.marker or ""),
            tuple(sorted(tokens[first_option:])),
        )
    return packages


def _requirements_txt() -> list[str]:
    return (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()


def _environment_yml() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))


def _pip_section(env: dict) -> list[str]:
    sections = [dep["pip"] for dep in env.get("dependencies", []) if isinstance(dep, dict) and "pip" in dep]
    assert len(sections) == 1, "environment.yml needs exactly one `pip:` section"
    return [str(line) for line in sections[0]]


def test_pip_lists_agree() -> None:
    from_txt = _parse(_requirements_txt(), "requirements.txt")
    from_yml = _parse(_pip_section(_environment_yml()), "environment.yml")

    only_txt = sorted(set(from_txt) - set(from_yml))
    only_yml = sorted(set(from_yml) - set(from_txt))
    assert not only_txt, f"in requirements.txt but not environment.yml: {only_txt}"
    assert not only_yml, f"in environment.yml but not requirements.txt: {only_yml}"

    differing = {
        name: {"requirements.txt": from_txt[name], "environment.yml": from_yml[name]}
        for name in from_txt
        if from_txt[name] != from_yml[name]
    }
    assert not differing, f"specifiers or options differ: {differing}"


def test_environment_yml_installs_python_311_and_this_package() -> None:
    env = _environment_yml()
    conda_deps = [dep for dep in env["dependencies"] if isinstance(dep, str)]
    assert "python=3.11" in conda_deps
    assert "pip" in conda_deps
    assert LOCAL_INSTALL in _pip_section(env), "Binder must install metabp itself"
