"""The library as a package: declared dependencies, sdist and wheel, a fresh install.

pyproject.toml declares what ``import metabp`` needs (plus extras for the comparison
libraries, the book and the tests); requirements.txt is the pinned set the book is
built and tested with. The two must name the same packages, the pins must satisfy the
declared ranges, and a wheel built from the tree must install into a fresh virtual
environment and run a meta-step there.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shlex
import site
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

# In requirements.txt but deliberately not in pyproject.toml: learn2learn 0.2.0 builds on
# Python 3.11 only with a per-requirement pip option, which package metadata cannot carry.
NOT_DECLARABLE = {"learn2learn"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _declared() -> dict[str, Requirement]:
    project = _pyproject()["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    out: dict[str, Requirement] = {}
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name not in out, f"pyproject.toml declares {req.name} twice"
        out[name] = req
    return out


def _pinned() -> dict[str, Requirement]:
    out: dict[str, Requirement] = {}
    for raw in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()  # pip's comment rule
        if not line:
            continue
        tokens = shlex.split(line)
        words = [t for t in tokens if not t.startswith("-")]  # drop per-requirement options
        req = Requirement(" ".join(words))
        out[canonicalize_name(req.name)] = req
    return out


def test_pyproject_and_requirements_name_the_same_packages() -> None:
    declared, pinned = _declared(), _pinned()
    assert not NOT_DECLARABLE & set(declared)
    only_pinned = sorted(set(pinned) - set(declared) - NOT_DECLARABLE)
    only_declared = sorted(set(declared) - set(pinned))
    assert not only_pinned, f"in requirements.txt but not declared in pyproject.toml: {only_pinned}"
    assert not only_declared, f"declared in pyproject.toml but not in requirements.txt: {only_declared}"


def test_pins_satisfy_declared_ranges() -> None:
    declared = _declared()
    for name, req in _pinned().items():
        if name in NOT_DECLARABLE:
            continue
        exact = [s.version for s in req.specifier if s.operator == "=="]
        for version in exact:
            assert declared[name].specifier.contains(version, prereleases=True), (
                f"requirements.txt pins {name}=={version}, outside pyproject.toml's {declared[name]}"
            )


def test_installed_versions_satisfy_declared_ranges() -> None:
    # Catches an unpinned line of requirements.txt that resolves outside pyproject's range.
    for name, req in _declared().items():
        installed = md.version(name)
        assert req.specifier.contains(installed, prereleases=True), f"{name} {installed} is installed, {req} declared"


def test_environment_yml_installs_the_package_with_its_declared_dependencies() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e ." in pip


def test_license_and_citation_match_the_package() -> None:
    project = _pyproject()["project"]
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0"
    assert cff["version"] == project["version"]
    assert project["license"] in cff["license"]
    assert "CC-BY-4.0" in cff["license"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "MIT License" in text and "CC BY 4.0" in text
    book = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    assert cff["title"] == book["title"]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # The sdist first, then the wheel from the unpacked sdist (so the sdist is proven
    # complete); --no-isolation: with the installed setuptools instead of downloading one.
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out


def test_sdist_and_wheel_pass_twine_check(dist: Path) -> None:
    files = sorted(dist.iterdir())
    assert sorted(f.suffix for f in files) == [".gz", ".whl"], files
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, files)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_wheel_installs_into_a_fresh_venv_and_runs_a_meta_step(dist: Path, tmp_path: Path) -> None:
    wheel = next(dist.glob("*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    fresh_site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # Reuse this environment's torch (and pip) instead of downloading gigabytes: its
    # site-packages go on the fresh interpreter's path after the fresh site-packages,
    # so the installed wheel, not this checkout's src/, is what `import metabp` finds.
    # (A path in a .pth file is appended as is; the .pth files inside it, such as an
    # editable install's hook, are not processed.)
    (fresh_site / "reuse-parent.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-index", "--no-deps", "--no-warn-script-location", str(wheel)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    script = textwrap.dedent(
        f"""
        import importlib.metadata as md
        from pathlib import Path
        from packaging.requirements import Requirement

        import torch
        import metabp
        from metabp.bilevel import InnerLoop, make_optimizer, meta_step
        from metabp.models import SineNet
        from metabp.tasks import SinusoidTasks

        where = Path(metabp.__file__).resolve()
        assert where.is_relative_to(Path({str(fresh_site)!r}).resolve()), where
        assert md.version("metabp") == metabp.__version__
        for line in md.requires("metabp"):
            req = Requirement(line)
            if req.marker is None:  # the runtime dependencies, not the extras
                assert req.specifier.contains(md.version(req.name), prereleases=True), line

        torch.manual_seed(0)
        model = SineNet()
        before = [p.detach().clone() for p in model.parameters()]
        batch = SinusoidTasks().sample(4, torch.Generator().manual_seed(0))
        loss = meta_step(model, make_optimizer(model.parameters(), 1e-3), batch, InnerLoop("mse", 0.01, 1))
        assert loss == loss and loss > 0
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        print("meta-step from", where, "loss", loss)
        """
    )
    run = subprocess.run([str(python), "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "meta-step from" in run.stdout
