"""GPU proof kit: gather what the GPU machine lacks into one folder that travels with the tree.

That machine has python3, torch, pytest and transformers but no package registry. The op, Recorder
and Collator suites import hypothesis (and tests/conftest.py does), and the extension builds with
ninja on all cores rather than one file at a time. This copies the installed files of those
distributions (pure Python, and the ninja binary) from this interpreter's environment:

    python gpu/deps.py build/gpu-deps      # `make gpu-check DRY_RUN=1` runs it

gpu/check.sh puts the folder on PYTHONPATH and PATH only when the machine's own python3 lacks them.
"""
import importlib.metadata
import os
import pathlib
import shutil
import sys
import tempfile

DISTRIBUTIONS = ("hypothesis", "attrs", "sortedcontainers", "exceptiongroup")


def _copy_distribution(name: str, dest: pathlib.Path) -> int:
    """The distribution's files under site-packages (bytecode left out); how many were copied."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return 0
    copied = 0
    for entry in dist.files or ():
        parts = pathlib.PurePath(entry).parts
        if parts[0] == ".." or "__pycache__" in parts:  # console scripts: their shebang names this venv
            continue
        src = pathlib.Path(dist.locate_file(entry))
        if src.is_file():
            (dest / entry).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / entry)
            copied += 1
    return copied


def main(dest: str) -> None:
    target = pathlib.Path(dest).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built next to the target and renamed into place: a concurrent run never sees half a folder.
    work = pathlib.Path(tempfile.mkdtemp(prefix=".gpu-deps-", dir=target.parent))
    counts = {name: _copy_distribution(name, work) for name in DISTRIBUTIONS}
    if not counts["hypothesis"]:
        shutil.rmtree(work)
        raise SystemExit("gpu/deps.py: hypothesis is not installed in this environment: nothing to carry")
    ninja = shutil.which("ninja", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if ninja:
        (work / "bin").mkdir()
        shutil.copy2(ninja, work / "bin" / "ninja")
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    work.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    found = ", ".join(f"{n} ({c} files)" for n, c in counts.items() if c)
    print(f"gpu/deps.py: {target}: {found}{', ninja' if ninja else ', no ninja'}; {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "build/gpu-deps")
