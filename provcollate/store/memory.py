"""Host memory for recorded rows: fresh storage of its own, huge pages, and the gathers of
chunked rows. Nothing here knows what a slot or an output is."""
from __future__ import annotations

import ctypes
import mmap
import sys
from typing import List, Tuple

import numpy as np
import torch

__all__ = ["huge_pages", "host_empty", "row_storage", "exclusive_cumsum", "to_device", "acc_dtype", "first_last",
           "row_positions", "gather_rows", "GATHER_ROWS"]

GATHER_ROWS = 1 << 20  # rows per step of a jagged gather: bounds its index tensors

_HUGE = 1 << 21
_MADV_HUGEPAGE = 14
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def huge_pages(t: torch.Tensor) -> torch.Tensor:
    """Ask Linux for transparent huge pages under a fresh host tensor of several MiB, before its
    first write. Rows land at random slots: with 4 KiB pages every write of a large result is a
    TLB miss and each page a fault of its own; 2 MiB pages take both away. Advice only: where the
    kernel declines (THP off, another OS), nothing changes."""
    if _libc is None or t.device.type != "cpu":
        return t
    addr = t.data_ptr()
    start = (addr + _HUGE - 1) & ~(_HUGE - 1)
    end = (addr + t.numel() * t.element_size()) & ~(_HUGE - 1)
    if end - start >= 2 * _HUGE:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    return t


_MAPPED_BYTES = 1 << 20


def host_empty(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, except that host storage of 1 MiB or more is an anonymous mapping of its
    own, unmapped when the last tensor on it goes.

    glibc serves such sizes from mmap too, but freeing one raises its mmap threshold to that size
    (up to 32 MiB): from then on a model's activations of up to that size come from the heap,
    whose freed holes stay resident. A Recorder that writes shards frees its storage after each
    one; through glibc, the resident set of a streaming transformers predict grew by 2.6x the
    result above what the model alone needs."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if device.type != "cpu" or nbytes < _MAPPED_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    # Private, as malloc's are (mmap's default, MAP_SHARED, is shmem: no huge pages, slower faults,
    # and shared with forked children). torch.frombuffer holds a reference to the mapping: it
    # lives exactly as long as its tensors.
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)


def row_storage(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Storage a store writes rows into at random: :func:`host_empty` under :func:`huge_pages`."""
    return huge_pages(host_empty(shape, dtype, device))


def exclusive_cumsum(lengths: np.ndarray) -> np.ndarray:
    out = np.empty(len(lengths), np.int64)
    if len(lengths):
        out[0] = 0
        np.cumsum(lengths[:-1], out=out[1:])
    return out


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on ``device``; to a GPU through pinned memory, without waiting."""
    t = torch.from_numpy(array)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where sums of ``dtype`` values are formed: float32 at least."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def first_last(key: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Masks of the first and of the last occurrence of each value of ``key``."""
    order = np.argsort(key, kind="stable")
    sk = key[order]
    change = sk[1:] != sk[:-1]
    first = np.empty(len(key), bool)
    last = np.empty(len(key), bool)
    first[order] = np.concatenate(([True], change))
    last[order] = np.concatenate((change, [True]))
    return first, last


def row_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Rows ``starts[e] .. starts[e] + lengths[e]`` of every segment, concatenated in order."""
    total = int(lengths.sum())
    shift = np.repeat(starts - exclusive_cumsum(lengths), lengths)
    return shift + np.arange(total, dtype=np.int64)


def gather_rows(chunks: List[torch.Tensor], bases: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
    """Segments of chunked rows (global row ``starts[e]``, ``lengths[e]`` rows) as one tensor, in order.

    Works in steps of about ``GATHER_ROWS`` rows so that the index tensors stay small; loops
    over steps and chunks only, never over segments.
    """
    out = host_empty((int(lengths.sum()), *chunks[0].shape[1:]), chunks[0].dtype, chunks[0].device)
    ends = np.cumsum(lengths)
    begin, e0 = 0, 0
    while e0 < len(lengths):
        e1 = max(e0 + 1, int(np.searchsorted(ends, begin + GATHER_ROWS, side="right")))
        end = int(ends[e1 - 1])
        s, ln = starts[e0:e1], lengths[e0:e1]
        which = np.searchsorted(bases, s, side="right") - 1
        dst = out[begin:end]
        for k in np.unique(which):
            sel = which == k
            src_rows = to_device(row_positions(s[sel] - bases[k], ln[sel]), chunks[k].device)
            if sel.all():
                torch.index_select(chunks[k], 0, src_rows, out=dst)
            else:
                dst_rows = to_device(row_positions(exclusive_cumsum(ln)[sel], ln[sel]), dst.device)
                dst.index_copy_(0, dst_rows, chunks[k].index_select(0, src_rows))
        begin, e0 = end, e1
    return out
