"""pad / unpad / unpad_scatter_ against their peers and against the memcpy bound, in one process.

For each shape (B, T, D) the items have lengths drawn uniformly from 1..T (one item is set to T so
that every op, pad_sequence included, produces [B, T, D]). Every peer gets its natural input, made
before timing: pad_sequence the list of per-item tensors (the split is not timed), the strided
nested tensor its nested tensor, masked peers the [B, T] bool mask (a Batch carries it). Every
peer's result must equal provcollate's before anything is timed.

Each op is timed with torch.utils.benchmark (warm-up, then as many calls as fit in --min-run-time,
median), in --rounds rounds that time every candidate back to back in rotating order; times are the
best round's median, speedups the median over rounds of the two times taken in the same round (the
memory bandwidth of a shared machine drifts by up to 2x within seconds). The memcpy bound is a plain
``clone()`` of a tensor with the op's output bytes, allocation included.

GB/s counts bytes read + bytes written by the op (pad: reads the rows, writes B*T rows; unpad:
reads and writes the rows; clone: twice its size); "output GB/s" counts the bytes produced.
Target per op and shape: provcollate's throughput >= min(1.5 x the fastest peer, 0.90 x clone),
i.e. 1.5x the fastest peer, or 90% of memcpy speed where a peer already runs near it.

--cache cold flushes the caches (a 128 MiB write, untimed) before every call: with a 32 MiB L3, the
shapes whose input and output together come near it are on the cache's cliff, and warm timings
swing by up to 1.5x between processes with the physical pages they got; cold timings do not.

Every op allocates its output, so how malloc serves it decides much of the time of big outputs:
--alloc reuse (default) pins glibc to reuse freed memory (the steady state of a loop), --alloc fresh
to map new pages for every call (page faults included); glibc's own policy depends on history.

    python benchmarks/bench_ops.py [--dtype float32] [--threads N] [--rounds 5] [--write]
    python benchmarks/bench_ops.py --sweep [--write]     # throughput vs batch size and vs length
    python benchmarks/bench_ops.py --plot                # charts from the sweep JSON (needs matplotlib)
    python benchmarks/bench_ops.py --cache cold [--write] # every call starts with flushed caches
    python benchmarks/bench_ops.py --quick               # tiny sizes, a few seconds
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.nn.utils.rnn import pad_sequence

import provcollate as pc
from common import (ALLOCATORS, RESULTS_DIR, best_of, command_line, machine, markdown_table, median_time,
                    paired_ratio, rounds_of, set_allocator, write_markdown)

try:
    import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm.*)

    FBGEMM_MISSING = None
except ImportError as exc:
    FBGEMM_MISSING = f"fbgemm_gpu not importable ({exc})"

SHAPES = [(64, 512, 1), (256, 512, 64), (64, 128, 768), (1024, 2048, 1)]
QUICK_SHAPES = [(4, 16, 1), (8, 32, 8), (16, 8, 32)]
# Sweeps: (name of the varied size, its values, the fixed (B, T, D) the values replace one of).
SWEEPS = [("batch", [4, 8, 16, 32, 64, 128, 256, 512], (None, 256, 64)),
          ("max_len", [16, 32, 64, 128, 256, 512, 1024, 2048], (64, None, 64))]
QUICK_SWEEPS = [("batch", [2, 4, 8], (None, 16, 4)), ("max_len", [4, 8, 16], (4, None, 4))]
PEER_TARGET = 1.5
MEMCPY_TARGET = 0.90
BOUND = "clone() (memcpy bound)"

Fn = Callable[[], torch.Tensor]


@dataclass
class Case:
    """One shape's data, shared by every op and peer."""

    batch: int
    max_len: int
    dim: int
    lengths: torch.Tensor
    offsets: torch.Tensor
    total: int
    values: torch.Tensor
    padded: torch.Tensor
    mask: torch.Tensor

    @property
    def row_bytes(self) -> int:
        return self.dim * self.values.element_size()

    @property
    def name(self) -> str:
        return f"({self.batch}, {self.max_len}, {self.dim})"


def make_case(batch: int, max_len: int, dim: int, dtype: torch.dtype, gen: torch.Generator, device: str = "cpu") -> Case:
    lengths = torch.randint(1, max_len + 1, (batch,), generator=gen)
    lengths[torch.randint(batch, (1,), generator=gen)] = max_len
    offsets = torch.zeros(batch + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=offsets[1:])
    total = int(offsets[-1])
    if dtype.is_floating_point:
        values = torch.randn(total, dim, generator=gen).to(dtype)
    elif dtype == torch.bool:
        values = torch.randint(0, 2, (total, dim), generator=gen).bool()
    else:
        values = torch.randint(-100, 100, (total, dim), generator=gen).to(dtype)
    lengths, offsets, values = lengths.to(device), offsets.to(device), values.to(device)
    padded = pc.ops.pad(values, offsets, max_len)
    mask = pc.reference.valid_mask(lengths, max_len)
    return Case(batch, max_len, dim, lengths, offsets, total, values, padded, mask)


# Each candidate builder returns (fn, None), or (None, reason) when the peer cannot run this case.
Builder = Callable[[Case], Tuple[Optional[Fn], Optional[str]]]


def pad_candidates() -> Dict[str, Builder]:
    """provcollate.ops.pad first, then its peers."""

    def provcollate(c):
        return (lambda: pc.ops.pad(c.values, c.offsets, c.max_len)), None

    def padseq(c):
        items = list(c.values.split(c.lengths.tolist()))
        return (lambda: pad_sequence(items, batch_first=True, padding_value=0)), None

    def nested_jagged(c):
        def fn():
            njt = torch.nested.nested_tensor_from_jagged(c.values, c.offsets, max_seqlen=c.max_len)
            return torch.nested.to_padded_tensor(njt, 0, output_size=(c.batch, c.max_len, c.dim))
        return fn, None

    def nested_strided(c):
        nt = torch.nested.as_nested_tensor(list(c.values.split(c.lengths.tolist())), layout=torch.strided)
        return (lambda: torch.nested.to_padded_tensor(nt, 0, output_size=(c.batch, c.max_len, c.dim))), None

    def fbgemm(c):
        if FBGEMM_MISSING:
            return None, FBGEMM_MISSING
        return (lambda: torch.ops.fbgemm.jagged_to_padded_dense(c.values, [c.offsets], [c.max_len], 0.0)), None

    def aten_jagged(c):
        # The CUDA kernel behind nested jagged to_padded_tensor, called directly (torch >= 2.3).
        if not hasattr(torch.ops.aten, "_jagged_to_padded_dense_forward"):
            return None, "torch.ops.aten._jagged_to_padded_dense_forward: not in this torch"
        return (lambda: torch.ops.aten._jagged_to_padded_dense_forward(c.values, [c.offsets], [c.max_len], 0.0)), None

    def mask_assign(c):
        def fn():
            out = c.values.new_full((c.batch, c.max_len, c.dim), 0)
            out[c.mask] = c.values
            return out
        return fn, None

    return {
        "provcollate.ops.pad": provcollate,
        "pad_sequence (list of items)": padseq,
        "nested jagged: from_jagged + to_padded_tensor": nested_jagged,
        "nested strided: to_padded_tensor": nested_strided,
        "fbgemm jagged_to_padded_dense": fbgemm,
        "aten._jagged_to_padded_dense_forward": aten_jagged,
        "new_full + out[mask] = values": mask_assign,
    }


def unpad_candidates() -> Dict[str, Builder]:
    """provcollate.ops.unpad first, then its peers."""

    def provcollate(c):
        return (lambda: pc.ops.unpad(c.padded, c.offsets, c.total)), None

    def masked(c):
        return (lambda: c.padded[c.mask]), None

    def flash_attn(c):
        # flash_attn.bert_padding.unpad_input's data path: integer indices of the real positions,
        # then a gather over the flattened (B*T, D) rows with those indices broadcast along D.
        def fn():
            indices = torch.nonzero(c.mask.flatten(), as_tuple=False).flatten()
            rows = c.padded.reshape(-1, c.dim)
            return torch.gather(rows, 0, indices.unsqueeze(1).expand(-1, c.dim))
        return fn, None

    def index_select(c):
        def fn():
            indices = torch.nonzero(c.mask.flatten(), as_tuple=False).flatten()
            return c.padded.reshape(-1, c.dim).index_select(0, indices)
        return fn, None

    def fbgemm(c):
        if FBGEMM_MISSING:
            return None, FBGEMM_MISSING
        return (lambda: torch.ops.fbgemm.dense_to_jagged(c.padded, [c.offsets], c.total)[0]), None

    def aten_jagged(c):
        if not hasattr(torch.ops.aten, "_padded_dense_to_jagged_forward"):
            return None, "torch.ops.aten._padded_dense_to_jagged_forward: not in this torch"
        return (lambda: torch.ops.aten._padded_dense_to_jagged_forward(c.padded, [c.offsets], c.total)), None

    def nested_narrow(c):
        starts = torch.zeros_like(c.lengths)

        def fn():
            njt = torch.nested.narrow(c.padded, 1, starts, c.lengths, layout=torch.jagged)
            return njt.contiguous().values()
        return fn, None

    return {
        "provcollate.ops.unpad": provcollate,
        "padded[mask]": masked,
        "flash-attn unpad_input: nonzero + gather": flash_attn,
        "nonzero + index_select": index_select,
        "fbgemm dense_to_jagged": fbgemm,
        "aten._padded_dense_to_jagged_forward": aten_jagged,
        "nested: narrow(jagged) + contiguous": nested_narrow,
    }


def scatter_candidates() -> Dict[str, Builder]:
    """provcollate.ops.unpad_scatter_ (into a preallocated dst, items in shuffled slots) and peers.

    The peers get the destination row of every real position precomputed (not timed).
    """

    def layout(c):
        gen = torch.Generator().manual_seed(c.batch * 7919 + c.max_len)
        perm = torch.randperm(c.batch, generator=gen).to(c.lengths.device)
        dst_offsets = torch.empty_like(c.lengths)
        dst_offsets[perm] = torch.cumsum(c.lengths[perm], 0) - c.lengths[perm]
        rows = (dst_offsets[:, None] + torch.arange(c.max_len, device=c.lengths.device))[c.mask]
        return torch.empty_like(c.values), dst_offsets, rows

    def provcollate(c):
        dst, dst_offsets, _ = layout(c)
        return (lambda: pc.ops.unpad_scatter_(dst, c.padded, c.lengths, dst_offsets)), None

    def index_put(c):
        dst, _, rows = layout(c)

        def fn():
            dst[rows] = c.padded[c.mask]
            return dst
        return fn, None

    def index_copy(c):
        dst, _, rows = layout(c)
        indices = torch.nonzero(c.mask.flatten(), as_tuple=False).flatten()
        return (lambda: dst.index_copy_(0, rows, c.padded.reshape(-1, c.dim).index_select(0, indices))), None

    return {
        "provcollate.ops.unpad_scatter_": provcollate,
        "dst[rows] = padded[mask]": index_put,
        "dst.index_copy_(rows, index_select)": index_copy,
    }


@dataclass
class Op:
    """How one op is measured: its candidates, the bytes it moves and its memcpy bound."""

    name: str
    candidates: Callable[[], Dict[str, Builder]]
    out_rows: Callable[[Case], int]  # rows the op writes
    bound: Callable[[Case], Fn]  # a plain copy of the op's output bytes
    in_target: bool  # counted against the targets

    def bytes_moved(self, c: Case) -> int:
        return (c.total + self.out_rows(c)) * c.row_bytes

    def out_bytes(self, c: Case) -> int:
        return self.out_rows(c) * c.row_bytes


def _scatter_bound(c: Case) -> Fn:
    dst = torch.empty_like(c.values)
    return lambda: dst.copy_(c.values)


OPS = [
    Op("pad", pad_candidates, lambda c: c.batch * c.max_len, lambda c: c.padded.clone, True),
    Op("unpad", unpad_candidates, lambda c: c.total, lambda c: c.values.clone, True),
    Op("unpad_scatter_", scatter_candidates, lambda c: c.total, _scatter_bound, False),
]


def prepare(op: Op, c: Case) -> Tuple[Dict[str, Fn], Dict[str, str]]:
    """The op's runnable candidates, each checked against provcollate's result, and the skipped ones."""
    fns, skipped = {}, {}
    expected = None
    for name, build in op.candidates().items():
        try:
            fn, reason = build(c)
            out = fn() if fn is not None else None
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            if expected is None:
                raise
            fn, reason = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        if fn is None:
            skipped[name] = reason
            continue
        if expected is None:
            expected = out.clone()
        elif out.shape != expected.shape or not torch.equal(out, expected):
            raise RuntimeError(f"{op.name} {c.name}: {name} disagrees with {next(iter(fns))}")
        fns[name] = fn
    fns[BOUND] = op.bound(c)
    return fns, skipped


def measure(fns: Dict[str, Fn], rounds: int, min_run_time: float,
            cold: bool = False) -> Tuple[Dict[str, float], Dict[str, List[float]]]:
    """Best-of-rounds median seconds per candidate, and every round's medians (for paired ratios)."""
    times = rounds_of(fns, rounds, min_run_time, cold)
    return {name: best_of(t) for name, t in times.items()}, times


def verdict(op: Op, c: Case, secs: Dict[str, float], times: Dict[str, List[float]]) -> dict:
    """provcollate against its fastest peer and the memcpy bound, and whether the target is met.

    Speedups are paired: the median over rounds of the peer's (or clone's) time over provcollate's
    in the same round.
    """
    ours, *peers = [n for n in secs if n != BOUND]
    fastest = min(peers, key=secs.get) if peers else None
    vs_peer = paired_ratio(times, fastest, ours) if fastest else float("inf")
    vs_bound = paired_ratio(times, BOUND, ours)
    # Throughput needed: min(1.5 x peer, 0.9 x clone); the smaller one is the target that binds.
    by_peer = vs_peer / PEER_TARGET
    by_bound = vs_bound / MEMCPY_TARGET
    target = f">= {PEER_TARGET:g}x peer" if PEER_TARGET / vs_peer <= MEMCPY_TARGET / vs_bound else f">= {MEMCPY_TARGET:.2f}x clone"
    return {
        "op": op.name, "shape": c.name, "ours": ours, "fastest_peer": fastest,
        "seconds": secs[ours], "peer_seconds": secs[fastest] if fastest else None,
        "bound_seconds": secs[BOUND], "vs_peer": vs_peer, "vs_bound": vs_bound,
        "target": target, "met": max(by_peer, by_bound) >= 1.0,
    }


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def shape_table(op: Op, c: Case, secs: Dict[str, float], skipped: Dict[str, str]) -> str:
    ours = next(iter(secs))
    rows = []
    for name, s in secs.items():
        moved = 2 * op.out_bytes(c) if name == BOUND else op.bytes_moved(c)
        rows.append([name, f"{s * 1e6:,.1f}", f"{gbps(moved, s):.2f}", f"{gbps(op.out_bytes(c), s):.2f}",
                     f"{s / secs[ours]:.2f}"])
    rows += [[name, "skipped", "", "", reason] for name, reason in skipped.items()]
    title = (f"### {op.name} {c.name}: {c.total:,} of {c.batch * c.max_len:,} rows real, "
             f"{op.out_bytes(c) / 2**20:.2f} MiB out")
    return title + "\n\n" + markdown_table(["op", "time (us)", "GB/s (r+w)", "output GB/s", "its time / provcollate's"], rows)


def summary_table(verdicts: List[dict]) -> str:
    rows = [[v["op"], v["shape"], f"{v['seconds'] * 1e6:,.1f}", v["fastest_peer"] or "-",
             f"{v['peer_seconds'] * 1e6:,.1f}" if v["fastest_peer"] else "-", f"{v['vs_peer']:.2f}x",
             f"{v['bound_seconds'] * 1e6:,.1f}", f"{v['vs_bound']:.2f}", v["target"], "yes" if v["met"] else "NO"]
            for v in verdicts]
    return markdown_table(["op", "(B, T, D)", "provcollate (us)", "fastest peer", "peer (us)", "speedup vs peer",
                           "clone (us)", "throughput / clone's", "target", "met"], rows)


def run_shapes(args, shapes) -> List[str]:
    gen = torch.Generator().manual_seed(args.seed)
    sections, verdicts = [], []
    for shape in shapes:
        c = make_case(*shape, args.dtype, gen, args.device)
        for op in OPS:
            fns, skipped = prepare(op, c)
            secs, times = measure(fns, args.rounds, args.min_run_time, args.cache == "cold")
            table = shape_table(op, c, secs, skipped)
            print(table + "\n", flush=True)
            sections.append(table)
            if op.in_target:
                verdicts.append(verdict(op, c, secs, times))
    summary = ("## Targets: pad and unpad >= 1.5x the fastest peer, or >= 0.90x clone throughput where a peer "
               "is already near memory speed\n\n" + summary_table(verdicts))
    print(summary)
    return [summary, "## Per shape (unpad_scatter_ is informational: in place, into a preallocated dst)", *sections]


def run_sweeps(args, sweeps) -> dict:
    """GB/s (r+w) of every candidate of pad and unpad as the batch size, then the length, grows."""
    gen = torch.Generator().manual_seed(args.seed)
    data = {"machine": machine(), "command": command_line(), "dtype": str(args.dtype).replace("torch.", ""),
            "unit": "GB/s, bytes read + written", "sweeps": []}
    # Each sweep: {"vary", "fixed", "x", "ops": {op: {candidate: {"seconds": [...], "gbps": [...]}}}}.
    for vary, xs, fixed in sweeps:
        series = {"vary": vary, "fixed": dict(zip(("batch", "max_len", "dim"), fixed)), "x": xs, "ops": {}}
        for x in xs:
            shape = tuple(x if f is None else f for f in fixed)
            c = make_case(*shape, args.dtype, gen, args.device)
            for op in OPS[:2]:
                fns, _ = prepare(op, c)
                secs, _ = measure(fns, 1, args.min_run_time)
                per_op = series["ops"].setdefault(op.name, {})
                for name, s in secs.items():
                    moved = 2 * op.out_bytes(c) if name == BOUND else op.bytes_moved(c)
                    curve = per_op.setdefault(name, {"seconds": [], "gbps": []})
                    curve["seconds"].append(s)
                    curve["gbps"].append(round(gbps(moved, s), 4))
            print(f"sweep {vary}={x}: " + ", ".join(
                f"{op}: {next(iter(curves.values()))['gbps'][-1]:.2f} GB/s" for op, curves in series["ops"].items()), flush=True)
        data["sweeps"].append(series)
    return data


def draw(data: dict, out_dir: str, suffix: str) -> List[str]:
    """One PNG per (op, sweep) from the sweep data; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for series in data["sweeps"]:
        for op, curves in series["ops"].items():
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for i, (name, curve) in enumerate(curves.items()):
                ax.plot(series["x"], curve["gbps"], marker="o", label=name, linewidth=2.5 if i == 0 else 1.2,
                        linestyle="--" if name == BOUND else "-")
            fixed = ", ".join(f"{k}={v}" for k, v in series["fixed"].items() if v is not None)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(series["x"], [str(x) for x in series["x"]])
            ax.set(xlabel=series["vary"], ylabel=data["unit"],
                   title=f"{op}, {data['dtype']}, {fixed} ({data['machine']['cpu']}, {data['machine']['torch_threads']} threads)")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            path = os.path.join(out_dir, f"bench_ops_{op}_vs_{series['vary']}{suffix}.png")
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="float32", help="torch dtype of the values (default float32)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) before timing")
    p.add_argument("--rounds", type=int, default=None, help="rounds per shape: best median kept, speedups paired per round (default 5)")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds of calls per median (default 0.3)")
    p.add_argument("--alloc", choices=sorted(ALLOCATORS), default="reuse",
                   help="glibc malloc policy for outputs (default reuse; results of others get a suffix)")
    p.add_argument("--cache", choices=("warm", "cold"), default="warm",
                   help="warm: calls back to back (default); cold: caches flushed before every call (results get _cold)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda: the same table on a GPU (peers without CUDA kernels are skipped)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test that takes seconds")
    p.add_argument("--sweep", action="store_true", help="throughput vs batch size and vs length, saved as JSON")
    p.add_argument("--plot", action="store_true", help="only draw the charts of the sweep JSON under --out (needs matplotlib)")
    p.add_argument("--write", action="store_true", help="write the results under --out")
    p.add_argument("--out", default=RESULTS_DIR, help="directory for --write (default benchmarks/results)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        p.error(f"--dtype must name a torch dtype such as float32 or bfloat16, got {args.dtype!r}")
    args.dtype = dtype
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.device not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_ops --device cuda: skipped, this machine has no CUDA device")
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.min_run_time = args.min_run_time or (0.01 if args.quick else 0.2)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    set_allocator(args.alloc)
    suffix = (("" if args.alloc == "reuse" else f"_{args.alloc}") + ("" if args.device == "cpu" else f"_{args.device}")
              + ("" if args.cache == "warm" else "_cold"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    m = machine()
    print(f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['torch_threads']} threads, "
          f"{str(args.dtype).replace('torch.', '')}, {args.rounds} round(s) of {args.min_run_time} s per op, "
          f"allocator: {ALLOCATORS[args.alloc]}, {args.cache} caches\n")
    sweep_json = os.path.join(args.out, f"bench_ops_sweep{suffix}.json")
    if args.plot:
        with open(sweep_json) as f:
            data = json.load(f)
        try:
            print("wrote " + ", ".join(draw(data, args.out, suffix)))
        except ImportError as exc:
            raise SystemExit(f"--plot needs matplotlib ({exc})") from exc
        return
    if args.sweep:
        data = run_sweeps(args, QUICK_SWEEPS if args.quick else SWEEPS)
        if args.write:
            os.makedirs(args.out, exist_ok=True)
            with open(sweep_json, "w") as f:
                json.dump(data, f, indent=1)
            print(f"wrote {sweep_json}")
            try:
                print("wrote " + ", ".join(draw(data, args.out, suffix)))
            except ImportError:
                print("matplotlib is not installed: no charts drawn (--plot draws them from the JSON later)")
        return
    sections = run_shapes(args, QUICK_SHAPES if args.quick else SHAPES)
    if args.write:
        path = os.path.join(args.out, f"bench_ops{suffix}.md")
        note = (f"dtype {str(args.dtype).replace('torch.', '')}; lengths uniform in 1..T (one item set to T); "
                + (f"{args.rounds} rounds of median times ({args.min_run_time} s of calls each)" if args.cache == "warm"
                   else f"{args.rounds} rounds of median times of 30 calls, each after a 128 MiB write that flushes the caches (untimed)")
                + ", candidates back to back in rotating order; times are the best round's, speedups the median of "
                "per-round ratios. "
                "GB/s = (bytes read + bytes written) / time; the memcpy bound is `clone()` of the op's output "
                "bytes, allocation included.")
        write_markdown(path, "pad / unpad: provcollate vs peers vs memcpy", [note, *sections], m)
        print(f"\nwrote {path}")


if __name__ == "__main__":
    sys.exit(main())
