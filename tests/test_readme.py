"""The README's runnable code blocks run (blocks starting with `# (sketch)` are outlines, not run)."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", open(README).read(), re.S) if not b.startswith("# (sketch)")]


def test_readme_has_runnable_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", range(len(BLOCKS)))
def test_readme_block_runs(block):
    # As a script runs: `if __name__ == "__main__":` bodies (the Quickstart's) run too.
    exec(compile(BLOCKS[block], f"README.md block {block}", "exec"), {"__name__": "__main__"})
