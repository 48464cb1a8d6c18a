"""Render the docstrings of provcollate's public names into docs/api.md.

    python docs/gen_api.py          # rewrite docs/api.md
    python docs/gen_api.py --check  # exit 1 if docs/api.md is out of date (run by the tests)
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import typing

import provcollate as pc

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "api.md")
# The order a reader meets them in the pipeline; anything public not listed here follows.
ORDER = ["Indexed", "Sample", "IndexedIterable", "Collator", "Batch", "LengthBucketSampler", "lengths_of",
         "Recorder", "Predictions", "Summary", "ops", "reference", "HAS_EXTENSION"]


class _Written:
    """An annotation shown exactly as the source wrote it (no quotes, no ForwardRef(...))."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _as_written(annotation):
    if isinstance(annotation, str):
        return _Written(annotation)
    if isinstance(annotation, typing.ForwardRef):
        return _Written(annotation.__forward_arg__)
    return annotation


def _signature(obj) -> str:
    """``obj``'s signature with every annotation as written: ``-> Batch``, not ``-> "'Batch'"``."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    params = [p.replace(annotation=_as_written(p.annotation)) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=_as_written(sig.return_annotation)))


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__ or "").strip()


def _block(title: str, obj, level: str) -> list:
    doc = _doc(obj)
    lines = [f"{level} `{title}`", ""]
    if doc:
        lines += ["```text", doc, "```", ""]
    return lines


def _public_members(cls) -> list:
    out = []
    for name, member in cls.__dict__.items():
        if name.startswith("_") and name not in ("__getitem__", "__len__", "__iter__", "__call__"):
            continue
        if isinstance(member, (staticmethod, classmethod)):
            member = member.__func__
        if isinstance(member, property):
            out.append((name, None, member.fget))
        elif callable(member):
            out.append((name, _signature(member), member))
    return out


def render() -> str:
    names = [n for n in ORDER if n in pc.__all__] + sorted(n for n in pc.__all__ if n not in ORDER and not n.startswith("__"))
    lines = ["# provcollate API reference", "",
             "Generated from the docstrings by `python docs/gen_api.py`; the tests fail when it is out of date.", ""]
    for name in names:
        obj = getattr(pc, name)
        if inspect.isclass(obj):
            lines += _block(f"provcollate.{name}{_signature(obj)}", obj, "##")
            for member, sig, fn in _public_members(obj):
                if _doc(fn):
                    lines += _block(f"{name}.{member}" + (sig if sig is not None else "  (property)"), fn, "###")
        elif inspect.ismodule(obj):
            lines += _block(f"provcollate.{name}", obj, "##")
            for fname in getattr(obj, "__all__", []):
                fn = getattr(obj, fname)
                if callable(fn):
                    lines += _block(f"provcollate.{name}.{fname}{_signature(fn)}", fn, "###")
        elif callable(obj):
            lines += _block(f"provcollate.{name}{_signature(obj)}", obj, "##")
        elif name == "HAS_EXTENSION":
            lines += ["## `provcollate.HAS_EXTENSION`", "",
                      "`bool`: True when the compiled core (provcollate._C) loaded; False means every op runs",
                      "on provcollate.reference, after one warning at import.", ""]
        else:
            lines += [f"## `provcollate.{name}`", "", f"`{type(obj).__name__}`", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if docs/api.md differs from the docstrings")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = open(OUT).read() if os.path.exists(OUT) else ""
        if current != text:
            print("docs/api.md is out of date: run `python docs/gen_api.py`", file=sys.stderr)
            return 1
        return 0
    with open(OUT, "w") as f:
        f.write(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
