"""Pure-PyTorch reference of every provcollate op.

The test oracle, and the fallback when the compiled extension is missing. Written for clarity
with boolean masks, independent of the kernels' index arithmetic; it validates its arguments
like the compiled ops do (it reads offsets on the host, wherever they live).
"""
from __future__ import annotations

import math

import torch

__all__ = ["pad", "unpad", "unpad_scatter_", "valid_mask"]


def _lengths(op: str, offsets: torch.Tensor, total: int, max_len: int) -> torch.Tensor:
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: offsets must be an int32 or int64 tensor, got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"{op}: offsets must be 1-D with B+1 >= 1 elements, got shape {tuple(offsets.shape)}")
    o = offsets.long().cpu()
    if o[0].item() != 0:
        raise ValueError(f"{op}: offsets must start at 0, got offsets[0] = {o[0].item()}")
    lengths = o[1:] - o[:-1]
    if lengths.numel() and lengths.min().item() < 0:
        b = int((lengths < 0).nonzero()[0])
        raise ValueError(f"{op}: offsets must not decrease, got offsets[{b}] = {o[b].item()} > offsets[{b + 1}] = {o[b + 1].item()}")
    if lengths.numel() and lengths.max().item() > max_len:
        b = int((lengths > max_len).nonzero()[0])
        raise ValueError(f"{op}: item {b} has length {lengths[b].item()} (offsets[{b + 1}] - offsets[{b}]), more than max_len = {max_len}")
    if o[-1].item() != total:
        raise ValueError(f"{op}: offsets must end at the number of rows, {total}, got offsets[{o.numel() - 1}] = {o[-1].item()}")
    return lengths


def valid_mask(lengths: torch.Tensor, max_len: int, left: bool = False) -> torch.Tensor:
    """[B, max_len] bool: True where position t of item b holds a real row."""
    t = torch.arange(max_len, device=lengths.device)
    if left:
        return t >= (max_len - lengths)[:, None]
    return t < lengths[:, None]


# torch's indexing lacks the wide unsigned dtypes; their bits move as the signed ones of one size.
_SAME_BITS = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_SAME_BITS[t.dtype]) if t.dtype in _SAME_BITS else t


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it made as bytes when its data sits below its element's alignment
    (numpy and torch.frombuffer allow that; torch's typed kernels can crash on it)."""
    if t.numel() and t.data_ptr() % t.element_size():
        return t.contiguous().view(torch.uint8).clone().view(t.dtype)
    return t


def _check_size(op: str, name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{op}: {name} must be >= 0, got {value}")


def pad(values: torch.Tensor, offsets: torch.Tensor, max_len: int, pad_value=0, left: bool = False) -> torch.Tensor:
    """Reference of :func:`provcollate.ops.pad`: a boolean-mask assignment into a ``new_full``."""
    _check_size("pad", "max_len", max_len)
    if values.dim() < 1:
        raise ValueError("pad: values must have a leading length dimension [total, ...], got a 0-d tensor")
    lengths = _lengths("pad", offsets, values.shape[0], max_len).to(values.device)
    values = _aligned(values)
    fill = torch.full((), pad_value, dtype=values.dtype)
    if values.dtype.is_floating_point and math.isfinite(pad_value) and not math.isfinite(fill.item()):
        raise ValueError(f"pad: pad_value {pad_value} cannot be represented in {values.dtype} (it would become inf)")
    if not (values.dtype.is_floating_point or values.dtype.is_complex) and fill.item() != pad_value:
        raise ValueError(f"pad: pad_value {pad_value} cannot be represented in {values.dtype} (it would become {fill.item()})")
    out = values.new_full((lengths.numel(), max_len, *values.shape[1:]), pad_value)
    _bits(out)[valid_mask(lengths, max_len, left)] = _bits(values)
    return out


def unpad(padded: torch.Tensor, offsets: torch.Tensor, total: int, left: bool = False) -> torch.Tensor:
    """Reference of :func:`provcollate.ops.unpad`: boolean-mask indexing of the real positions."""
    _check_size("unpad", "total", total)
    if padded.dim() < 2:
        raise ValueError(f"unpad: padded must be [B, max_len, ...], got shape {tuple(padded.shape)}")
    if offsets.dtype not in (torch.int32, torch.int64):  # checked in the compiled op's order
        raise TypeError(f"unpad: offsets must be an int32 or int64 tensor, got {offsets.dtype}")
    if offsets.numel() != padded.shape[0] + 1:
        raise ValueError(f"unpad: offsets must have {padded.shape[0] + 1} elements, got {offsets.numel()}")
    lengths = _lengths("unpad", offsets, total, padded.shape[1]).to(padded.device)
    padded = _aligned(padded)
    rows = _bits(padded)[valid_mask(lengths, padded.shape[1], left)]
    return rows.view(padded.dtype) if padded.dtype in _SAME_BITS else rows


def _byte_span(t: torch.Tensor) -> tuple:
    first = t.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return first, first + (last + 1) * t.element_size()


def _check_no_overlap(op: str, dst: torch.Tensor, **inputs: torch.Tensor) -> None:
    """Refuses a write into ``dst`` that could change what is read: spans that meet count."""
    if torch._debug_has_internal_overlap(dst) == 1:
        raise ValueError(f"{op}: dst has elements that share memory (an expanded tensor?); pass dst.clone()")
    for name, t in inputs.items():
        if dst.numel() == 0 or t.numel() == 0 or dst.device != t.device:
            continue
        (a0, a1), (b0, b1) = _byte_span(dst), _byte_span(t)
        if a0 < b1 and b0 < a1:
            raise ValueError(f"{op}: dst and {name} share memory, so writing dst would change what is read from {name}; pass {name}.clone()")


def unpad_scatter_(dst: torch.Tensor, padded: torch.Tensor, lengths: torch.Tensor, dst_offsets: torch.Tensor, left: bool = False) -> torch.Tensor:
    """Reference of :func:`provcollate.ops.unpad_scatter_`: index assignment of the masked rows."""
    op = "unpad_scatter_"
    if padded.dim() < 2:
        raise ValueError(f"{op}: padded must be [B, max_len, ...], got shape {tuple(padded.shape)}")
    if dst.shape[1:] != padded.shape[2:]:
        raise ValueError(f"{op}: trailing dims of dst {tuple(dst.shape[1:])} must equal those of padded {tuple(padded.shape[2:])}")
    if dst.dtype != padded.dtype:
        raise TypeError(f"{op}: dst and padded must have one dtype, got {dst.dtype} and {padded.dtype}")
    _check_no_overlap(op, dst, padded=padded, lengths=lengths, dst_offsets=dst_offsets)
    batch, max_len = padded.shape[:2]
    for name, t in (("lengths", lengths), ("dst_offsets", dst_offsets)):
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: {name} must be an int32 or int64 tensor, got {t.dtype}")
        if t.dim() != 1 or t.numel() != batch:
            raise ValueError(f"{op}: {name} must be 1-D with {batch} elements, got shape {tuple(t.shape)}")
    lengths = lengths.long().to(dst.device)
    dst_offsets = dst_offsets.long().to(dst.device)
    if batch:
        if lengths.min() < 0 or lengths.max() > max_len:
            b = int(((lengths < 0) | (lengths > max_len)).nonzero()[0])
            raise ValueError(f"{op}: lengths[{b}] must be in [0, {max_len}] (padded.size(1)), got {lengths[b].item()}")
        end = dst_offsets + lengths
        bad = (dst_offsets < 0) | (end > dst.shape[0])
        if bad.any():
            b = int(bad.nonzero()[0])
            raise ValueError(f"{op}: rows [{dst_offsets[b].item()}, {end[b].item()}) of item {b} must lie inside dst's {dst.shape[0]} rows")
    starts = torch.cumsum(lengths, 0) - lengths
    rows = torch.repeat_interleave(dst_offsets - starts, lengths) + torch.arange(int(lengths.sum()), device=dst.device)
    _bits(dst)[rows] = _bits(padded)[valid_mask(lengths, max_len, left)]
    return dst
