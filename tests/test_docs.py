"""Every Python snippet in the README and the guides runs, so the documentation cannot drift from the code.

A page's snippets run in order in one fresh interpreter, sharing their names like a notebook's cells, from a scratch
folder that sees the checkout's bundled ``data/`` (the snippets' relative paths are the checkout's)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def snippets(page: Path) -> list[str]:
    return SNIPPET.findall(page.read_text())


def test_the_pages_with_snippets_are_found():
    """The guard against a renamed fence or folder silently testing nothing."""
    with_code = {page.name for page in PAGES if snippets(page)}
    assert {"README.md", "math-core.md", "your-data.md"} <= with_code, with_code


@pytest.mark.parametrize("page", [p for p in PAGES if snippets(p)], ids=lambda p: p.name)
def test_every_snippet_of_the_page_runs(page, tmp_path):
    (tmp_path / "data").symlink_to(REPO / "data")
    program = "\n".join(f"# --- snippet {i + 1}\n{code}" for i, code in enumerate(snippets(page)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DURIAN_CACHE": str(tmp_path / ".cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{page.name}:\n{done.stderr[-3000:]}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", [*PAGES, REPO / "benchmarks" / "README.md", REPO / "data" / "README.md"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: {broken}"
