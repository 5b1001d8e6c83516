"""Launch buttons follow the repository's own address (book/_ext/book_links.py).

`make book` passes `git remote get-url origin` to the build (BOOK_REPOSITORY_URL
overrides it). A GitHub address gives every chapter Binder, repository and issues
buttons; anything else gives none, and the strict build stays clean. The last two
tests build the whole book in temporary clones, one with a GitHub remote and one with
no remote (about a minute each on two cores).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "_ext"))
from book_links import github_repository, launch_theme_options  # noqa: E402

# A remote address for the temporary clone only: the build never contacts it.
TEST_REMOTE = "git@github.com:metabp-test-owner/metabp-test-repo.git"
# The classes sphinx-book-theme gives the launch menu, repository and issues buttons.
BUTTON_CLASSES = ("dropdown-launch-buttons", "btn-source-repository-button", "btn-source-issues-button")
CHAPTERS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize(
    "url, expected",
    [
        ("https://github.com/owner/repo", ("owner", "repo")),
        ("https://github.com/owner/repo.git", ("owner", "repo")),
        ("https://github.com/owner/repo/", ("owner", "repo")),
        ("git@github.com:owner/my.repo.git", ("owner", "my.repo")),
        ("ssh://git@github.com/owner/repo.git", ("owner", "repo")),
        ("", None),
        ("/home/me/metabp", None),
        ("../metabp", None),
        ("https://gitlab.com/owner/repo", None),
        ("https://github.com/owner", None),
        ("https://github.com.evil.example/owner/repo", None),
        ("https://github.com/owner/repo/tree/main", None),
    ],
)
def test_github_repository(url: str, expected: tuple[str, str] | None) -> None:
    assert github_repository(url) == expected


def test_theme_options_without_a_github_address_turn_every_button_off() -> None:
    options = launch_theme_options("/srv/git/metabp", "main")
    assert not options["use_repository_button"] and not options["use_issues_button"]
    assert not any(options["launch_buttons"].values())


def test_theme_options_with_a_github_address() -> None:
    options = launch_theme_options("git@github.com:o/r.git", "dev")
    assert options["repository_url"] == "https://github.com/o/r"
    assert options["repository_branch"] == "dev"
    assert options["launch_buttons"]["binderhub_url"] == "https://mybinder.org"
    assert options["use_repository_button"] and options["use_issues_button"]


def _build_in_clone(tmp_path: Path, remote: str | None) -> Path:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    if remote is None:
        subprocess.run(["git", "remote", "remove", "origin"], cwd=clone, check=True)
    else:
        subprocess.run(["git", "remote", "set-url", "origin", remote], cwd=clone, check=True)
    # Reuse this environment instead of installing one: VENV points make at it and -o
    # keeps its install stamp from being remade.
    venv = Path(sys.prefix)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOK_REPOSITORY_")}
    env["PYTHONPATH"] = str(clone / "src")
    result = subprocess.run(
        ["make", "-o", str(venv / ".installed"), "book", f"VENV={venv}"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return clone / "_build" / "html"


def _hrefs(page: Path) -> list[str]:
    return re.findall(r'href="([^"]+)"', page.read_text(encoding="utf-8"))


def test_clone_with_a_github_remote_gets_binder_repository_and_issues_buttons(tmp_path: Path) -> None:
    html = _build_in_clone(tmp_path, TEST_REMOTE)
    repo = "https://github.com/metabp-test-owner/metabp-test-repo"
    for stem in CHAPTERS:
        hrefs = _hrefs(html / "notebooks" / f"{stem}.html")
        binder = (
            "https://mybinder.org/v2/gh/metabp-test-owner/metabp-test-repo/main"
            f"?urlpath=lab/tree/notebooks/{stem}.ipynb"
        )
        assert binder in hrefs, stem
        assert repo in hrefs, stem
        assert any(h.startswith(f"{repo}/issues/new") for h in hrefs), stem
        page = (html / "notebooks" / f"{stem}.html").read_text(encoding="utf-8")
        assert all(c in page for c in BUTTON_CLASSES), stem


def test_clone_without_a_remote_gets_no_buttons_and_builds_clean(tmp_path: Path) -> None:
    html = _build_in_clone(tmp_path, None)  # make book's strict build (-W -n) passed
    for stem in CHAPTERS:
        page = (html / "notebooks" / f"{stem}.html").read_text(encoding="utf-8")
        assert not [h for h in _hrefs(html / "notebooks" / f"{stem}.html") if "mybinder.org" in h], stem
        assert not [c for c in BUTTON_CLASSES if c in page], stem
