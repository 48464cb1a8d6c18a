"""Every public name is documented, and docs/api.md is the rendering of those docstrings."""
import inspect
import os
import subprocess
import sys

import provcollate as pc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_public_name_has_a_docstring():
    undocumented = []
    for name in pc.__all__:
        obj = getattr(pc, name)
        if name.startswith("__") or name == "HAS_EXTENSION":
            continue
        if not inspect.getdoc(obj):
            undocumented.append(name)
        if inspect.isclass(obj):
            for member, value in vars(obj).items():
                if not member.startswith("_") and callable(value) and not inspect.getdoc(value):
                    undocumented.append(f"{name}.{member}")
        if inspect.ismodule(obj):
            undocumented += [f"{name}.{f}" for f in getattr(obj, "__all__", []) if callable(getattr(obj, f)) and not inspect.getdoc(getattr(obj, f))]
    assert not undocumented, f"public names without a docstring: {undocumented}"


def test_api_reference_is_current():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "gen_api.py"), "--check"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
