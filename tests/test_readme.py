"""The runnable code blocks of the README and the docs pages run.

Every ```python block of README.md and of docs/*.md runs, except blocks starting with `# (sketch)`
(outlines that need the reader's own model and data; they must still compile). docs/api.md is
rendered from docstrings and docs/ray.md has a test of its own.
"""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))
    if os.path.basename(p) not in ("api.md", "ray.md")
)


def _blocks(page):
    return re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, page)).read(), re.S)


RUNNABLE = [(page, i, b) for page in PAGES for i, b in enumerate(_blocks(page)) if not b.startswith("# (sketch)")]
SKETCHES = [(page, i, b) for page in PAGES for i, b in enumerate(_blocks(page)) if b.startswith("# (sketch)")]


def test_pages_have_runnable_blocks():
    pages = {page for page, _, _ in RUNNABLE}
    assert {"README.md", os.path.join("docs", "guide.md"), os.path.join("docs", "integrations.md")} <= pages


@pytest.mark.parametrize("page,block,code", RUNNABLE, ids=[f"{p}:{i}" for p, i, _ in RUNNABLE])
def test_block_runs(page, block, code):
    # As a script runs: `if __name__ == "__main__":` bodies (the Quickstart's) run too.
    exec(compile(code, f"{page} block {block}", "exec"), {"__name__": "__main__"})


@pytest.mark.parametrize("page,block,code", SKETCHES, ids=[f"{p}:{i}" for p, i, _ in SKETCHES])
def test_sketch_compiles(page, block, code):
    compile(code, f"{page} block {block}", "exec")
