"""Helpers shared by provcollate's benchmark scripts: the machine, timing, markdown results.

    machine()                      -> dict: CPU model, caches, cores, torch threads, versions, allocator policy
    set_allocator(policy)          -> pins glibc malloc to "reuse" or "fresh" memory (see ALLOCATORS)
    median_time(fn, min_run_time)  -> median seconds of one call of fn (torch.utils.benchmark)
    cold_median_time(fn, calls)    -> the same with the caches flushed before every call (untimed)
    best_of(times)                 -> the figure to report from several rounds of median_time
    rounds_of(fns, rounds, t)      -> {name: [median seconds per round]}, candidates in rotating order
    paired_ratio(times, a, b)      -> median over rounds of a's time / b's time in the same round
    markdown_table(headers, rows)  -> str, a GitHub markdown table
    command_line()                 -> str, the exact command that ran this script
    write_markdown(path, title, sections, machine_info=None) -> writes the results page
    status_kib(field), reset_peak_rss() -> this process's memory from /proc (VmRSS, VmHWM), Linux
"""
from __future__ import annotations

import ctypes
import os
import platform
import shlex
import statistics
import time
import sys
from typing import Callable, Dict, Iterable, List, Sequence

import torch
from torch.utils.benchmark import Timer

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# glibc's default mmap threshold moves with the sizes freed so far, so whether an allocation is
# reused memory or fresh pages (one page fault per 4 KiB) depends on what ran before: pin it.
ALLOCATORS = {
    "reuse": "glibc malloc keeps and reuses freed memory (no mmap, no trim): steady state, no page faults",
    "fresh": "glibc malloc maps every allocation >= 128 KiB anew: each call pays its page faults",
    "default": "glibc malloc untouched: reuse or page faults depend on the sizes allocated before",
}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_allocator = "default"
_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _caches() -> str:
    """cpu0's data and unified caches from sysfs, e.g. "L1d 48K, L2 1024K, L3 32768K" ("" where sysfs lacks them).

    Recorder numbers depend on them: whether a result's random rows and counts stay in L2 or L3.
    """
    root = "/sys/devices/system/cpu/cpu0/cache"
    found = []
    try:
        for name in sorted(n for n in os.listdir(root) if n.startswith("index")):
            fields = {}
            for field in ("level", "type", "size"):
                with open(os.path.join(root, name, field)) as f:
                    fields[field] = f.read().strip()
            if fields["type"] != "Instruction":
                found.append(f"L{fields['level']}{'d' if fields['type'] == 'Data' else ''} {fields['size']}")
    except OSError:
        return ""
    return ", ".join(found)


def set_allocator(policy: str) -> None:
    """Pin glibc malloc (which torch's CPU allocator calls) to one of ALLOCATORS, for the whole process."""
    global _allocator
    if policy not in ALLOCATORS:
        raise ValueError(f"allocator policy must be one of {sorted(ALLOCATORS)}, got {policy!r}")
    if policy != "default":
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError as exc:
            raise RuntimeError(f"allocator policy {policy!r} needs glibc ({exc})") from exc
        settings = ({_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1} if policy == "reuse"
                    else {_M_MMAP_THRESHOLD: 128 * 1024, _M_TRIM_THRESHOLD: 128 * 1024})
        for param, value in settings.items():
            if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
                raise RuntimeError(f"mallopt({param}, {value}) failed")
    _allocator = policy


def machine() -> dict:
    """What the numbers were measured on: CPU model, its caches, cores, torch threads, versions, allocator policy."""
    import provcollate

    return {
        "cpu": _cpu_model(),
        "caches": _caches(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "provcollate": provcollate.__version__,
        "provcollate_compiled": provcollate.HAS_EXTENSION,
        "allocator": _allocator,
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "env": {k: v for k, v in os.environ.items() if k in _ENV or k.startswith("MALLOC_")},
    }


def median_time(fn: Callable[[], object], min_run_time: float = 0.2) -> float:
    """Median seconds of one ``fn()``, over as many calls as fit in ``min_run_time`` (after a warm-up).

    Runs with the process's current ``torch.get_num_threads()``: Timer would otherwise pin one thread.
    """
    fn()
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def best_of(times: Iterable[float]) -> float:
    """The smallest of several rounds' medians: on a shared machine noise only ever adds time."""
    return min(times)


_FLUSH_BYTES = 128 << 20
_flush_buffer = None


def flush_caches() -> None:
    """Evict this process's data from the CPU caches by writing a buffer 4x a 32 MiB last-level cache."""
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = torch.empty(_FLUSH_BYTES, dtype=torch.uint8)
    _flush_buffer.fill_(1)


def cold_median_time(fn: Callable[[], object], calls: int = 30) -> float:
    """Median seconds of one ``fn()`` that starts with cold caches: a flush runs before every call, untimed.

    Where inputs and outputs together come near the size of the last-level cache, warm timings
    depend on which physical pages they got (the same op swings 1.5x between processes); with
    the caches flushed every candidate reads its input from memory, as a batch produced long
    before would be, and the spread is a few percent.
    """
    fn()
    times = []
    for _ in range(calls):
        flush_caches()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rounds_of(fns: Dict[str, Callable[[], object]], rounds: int, min_run_time: float,
              cold: bool = False) -> Dict[str, List[float]]:
    """Median seconds of every candidate in each of ``rounds`` rounds.

    Each round times every candidate back to back, starting one candidate later than the round
    before, so that no candidate always runs after the same neighbour (which leaves the caches in
    its own state) and drift in the machine's speed reaches every candidate alike. ``cold``: each
    call starts with flushed caches (``cold_median_time``, 30 calls) instead.
    """
    names = list(fns)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(cold_median_time(fns[name]) if cold else median_time(fns[name], min_run_time))
    return times


def paired_ratio(times: Dict[str, List[float]], a: str, b: str) -> float:
    """Median over rounds of ``a``'s time over ``b``'s in the same round.

    On a shared machine memory bandwidth drifts by up to 2x within seconds; two candidates timed
    in the same round saw the same machine, so their ratio is steadier than a ratio of best times
    taken from different rounds.
    """
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table; numbers must already be formatted as the caller wants them."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """The command that ran this process, as a user would type it from the repo root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]))
    return shlex.join(["python", script, *sys.argv[1:]])


def write_markdown(path: str, title: str, sections: Sequence[str], machine_info: dict | None = None) -> None:
    """Write a results page: title, the machine and the command, then ``sections`` (markdown) in order."""
    m = machine_info or machine()
    head = [
        f"# {title}",
        "",
        f"Machine: {m['cpu']}" + (f" ({m['caches']})" if m.get("caches") else "") + f", {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"Python {m['python']}, provcollate {m['provcollate']}"
        + (f", load average {m['load_average']} when it started" if m.get("load_average") is not None else "")
        + ("" if m["provcollate_compiled"] else " (reference fallback: extension not compiled)"),
        "",
        f"Allocator: {m['allocator']}: {ALLOCATORS[m['allocator']]}"
        + "".join(f"; {k}={v}" for k, v in m["env"].items()),
        "",
        f"Command: `{command_line()}`",
    ]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n\n".join(["\n".join(head), *sections]) + "\n")


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB: ``VmRSS`` (resident set now), ``VmHWM`` (its high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Reset this process's VmHWM to its current resident set, so that a later VmHWM is a peak since now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def floors_module():
    """benchmarks/floors.cpp, compiled on first use (about a minute) and cached by torch."""
    from torch.utils.cpp_extension import load

    here = os.path.dirname(os.path.abspath(__file__))
    return load(name="provcollate_bench_floors", sources=[os.path.join(here, "floors.cpp")], extra_cflags=["-O3"])
