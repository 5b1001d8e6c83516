"""Sphinx extension: launch and repository buttons from the repository's own address.

``make book`` passes ``git remote get-url origin`` to the build as the environment
variable ``BOOK_REPOSITORY_URL`` (set it yourself to override, or to the empty string
for none) and the branch as ``BOOK_REPOSITORY_BRANCH`` (default ``main``). When the
address names a GitHub repository, every chapter page gets a Binder button (it opens
the chapter's notebook in JupyterLab on mybinder.org), a repository button and an
issues button. Any other address, or none, gives no buttons, so the book never points
at a repository that is not its own.

The extension also keeps the library reference's generated pages (``book/api``,
written by autosummary) out of the exclusion list that ``only_build_toc_files`` builds
from the files present when the build starts.
"""

from __future__ import annotations

import os
import re

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.util import logging

logger = logging.getLogger(__name__)

BINDERHUB_URL = "https://mybinder.org"
GENERATED_DIR = "book/api"

_GITHUB = re.compile(
    r"""^(?:https://|http://|ssh://git@|git://|git@)   # scheme, or scp-like user@
        (?:www\.)?github\.com[:/]                     # host, then / or :
        (?P<owner>[A-Za-z0-9-]+)/(?P<repo>[A-Za-z0-9._-]+?)
        (?:\.git)?/?$""",
    re.VERBOSE,
)


def github_repository(url: str) -> tuple[str, str] | None:
    """``(owner, repo)`` of a GitHub remote address, or ``None`` for any other address.

    Accepts the forms ``git remote get-url`` prints: ``https://github.com/OWNER/REPO(.git)``,
    ``git@github.com:OWNER/REPO(.git)`` and ``ssh://git@github.com/OWNER/REPO(.git)``.
    """
    match = _GITHUB.match(url.strip())
    if match is None or match["repo"] in {".", ".."}:
        return None
    return match["owner"], match["repo"]


def launch_theme_options(url: str, branch: str) -> dict:
    """The ``html_theme_options`` entries for a book built from repository ``url``."""
    repo = github_repository(url)
    if repo is None:
        return {
            "use_repository_button": False,
            "use_issues_button": False,
            "use_edit_page_button": False,
            "launch_buttons": {"binderhub_url": "", "colab_url": "", "jupyterhub_url": "", "thebe": False},
        }
    owner, name = repo
    return {
        "repository_url": f"https://github.com/{owner}/{name}",
        "repository_branch": branch,
        "path_to_docs": "",
        "use_repository_button": True,
        "use_issues_button": True,
        "use_edit_page_button": False,
        "launch_buttons": {
            "binderhub_url": BINDERHUB_URL,
            "notebook_interface": "jupyterlab",
            "colab_url": "",
            "jupyterhub_url": "",
            "thebe": False,
        },
    }


def _configure_buttons(app: Sphinx, config: Config) -> None:
    url = os.environ.get("BOOK_REPOSITORY_URL", "").strip()
    branch = os.environ.get("BOOK_REPOSITORY_BRANCH", "").strip() or "main"
    options = launch_theme_options(url, branch)
    if url and github_repository(url) is None:
        logger.info(f"[book_links] {url!r} is not a GitHub repository: no launch or repository buttons")
    config.html_theme_options.update(options)


def _keep_generated_reference(app: Sphinx, config: Config) -> None:
    # sphinx-external-toc (only_build_toc_files) excludes every source file that the
    # table of contents does not name, among them the reference pages that a previous
    # build generated; autosummary regenerates them and lists them in its toctree.
    config.exclude_patterns[:] = [p for p in config.exclude_patterns if not p.startswith(GENERATED_DIR + "/")]


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _configure_buttons)
    app.connect("config-inited", _keep_generated_reference, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
