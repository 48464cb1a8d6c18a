"""pad / unpad / unpad_scatter_: the compiled ops, where Python meets the dispatcher.

Also registered as ``torch.ops.provcollate.{pad, unpad, unpad_scatter_}``. Every output size
(``max_len``, ``total``) is a host integer, so no op ever reads a device value back: on a GPU
they queue work and return at once. Offsets are ``[B+1]`` int32 or int64 starting at 0
(flash-attention's ``cu_seqlens``). Offsets that live on the CPU are validated; on a GPU the
kernels stay in bounds whatever the offsets hold, and ``PROVCOLLATE_CHECK=1`` validates them
too (at the cost of a device-to-host copy).

pad and unpad are differentiable, each the other's backward (autograd is registered in C++,
csrc/autograd.cpp, so calls that need no gradient pay nothing for it); fake kernels for
torch.compile are registered here. Without the compiled extension these functions run on
:mod:`provcollate.reference`.

On the CPU, outputs at least as large as the last-level cache are written with non-temporal
stores (they skip reading each destination line before writing it); ``PROVCOLLATE_STREAM_BYTES``
sets that threshold in bytes instead (0 streams every output). The Collator follows it too.
"""
from __future__ import annotations

import os
import warnings

import torch

from . import reference

__all__ = ["pad", "unpad", "unpad_scatter_", "HAS_EXTENSION"]


def _extension_wanted() -> bool:
    """``PROVCOLLATE_EXTENSION=0`` runs the whole package on the pure-PyTorch paths."""
    flag = os.environ.get("PROVCOLLATE_EXTENSION", "").strip()
    if flag not in ("", "0", "1"):
        raise ValueError(f"provcollate: PROVCOLLATE_EXTENSION must be '0' or '1', got {flag!r}")
    return flag != "0"


if not _extension_wanted():
    HAS_EXTENSION = False
    warnings.warn(
        "provcollate: PROVCOLLATE_EXTENSION=0, so everything runs on the pure-PyTorch paths "
        "(provcollate.reference and the Python collate), without the compiled extension.",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    try:
        from . import _C  # noqa: F401  (loading it registers torch.ops.provcollate.*)

        HAS_EXTENSION = True
        # Bound once: looking an op up through torch.ops on every call costs microseconds.
        _pad = torch.ops.provcollate.pad.default
        _unpad = torch.ops.provcollate.unpad.default
        _unpad_scatter_ = torch.ops.provcollate.unpad_scatter_.default
    except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
        HAS_EXTENSION = False
        warnings.warn(
            f"provcollate: the compiled extension could not be loaded ({exc}); running on the "
            "pure-PyTorch reference (provcollate.reference), which is correct but slower. "
            "Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=2,
        )


def _check_int(op: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    # Bounded here so that both paths raise the same: the dispatcher would fail converting it.
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise ValueError(f"{op}: {name} must fit in int64, got {value}")


def pad(values: torch.Tensor, offsets: torch.Tensor, max_len: int, pad_value=0, left: bool = False) -> torch.Tensor:
    """Jagged rows ``values [total, ...]`` to a padded ``[B, max_len, ...]``.

    Item ``b`` is ``values[offsets[b]:offsets[b+1]]``; it fills the first (``left=False``) or last
    (``left=True``) positions of row ``b``, the rest is ``pad_value``. Differentiable in ``values``.

    An item longer than ``max_len`` is an error, not a truncation: with offsets on the CPU (or
    ``PROVCOLLATE_CHECK=1`` on a GPU) it raises ValueError naming the item; unchecked GPU offsets
    are never read back, so there such an item's row is unspecified (the kernel stays in bounds).
    FBGEMM's ``jagged_to_padded_dense`` truncates instead; to truncate here, cut the items (or
    their lengths) to ``max_len`` before building the offsets.
    """
    _check_int("pad", "max_len", max_len)
    if not HAS_EXTENSION:
        return reference.pad(values, offsets, max_len, pad_value, left)
    return _pad(values, offsets, max_len, pad_value, left)


def unpad(padded: torch.Tensor, offsets: torch.Tensor, total: int, left: bool = False) -> torch.Tensor:
    """Padded ``[B, max_len, ...]`` back to jagged ``[total, ...]``: the masked gather of real rows.

    ``total`` must equal ``offsets[-1]``; pass it from the host (e.g. ``batch.lengths.sum()``
    computed where the lengths were made) so nothing waits on the device. Differentiable.

    As in :func:`pad`, an item whose length (from ``offsets``) exceeds ``padded.shape[1]`` raises
    ValueError where offsets are validated, where FBGEMM's ``dense_to_jagged`` would read past it.
    """
    _check_int("unpad", "total", total)
    if not HAS_EXTENSION:
        return reference.unpad(padded, offsets, total, left)
    return _unpad(padded, offsets, total, left)


def unpad_scatter_(dst: torch.Tensor, padded: torch.Tensor, lengths: torch.Tensor, dst_offsets: torch.Tensor, left: bool = False) -> torch.Tensor:
    """Write ``padded[b, :lengths[b]]`` to ``dst[dst_offsets[b] : dst_offsets[b] + lengths[b]]``, in place.

    The real rows of each padded item go straight to their slots in ``dst`` (with ``left=True``
    the last ``lengths[b]`` rows of item ``b``). Destinations of different items must not
    overlap. Returns ``dst``.
    """
    if not HAS_EXTENSION:
        return reference.unpad_scatter_(dst, padded, lengths, dst_offsets, left)
    _unpad_scatter_(dst, padded, lengths, dst_offsets, left)
    return dst


if HAS_EXTENSION:

    @torch.library.register_fake("provcollate::pad")
    def _pad_fake(values, offsets, max_len, pad_value=0, left=False):
        torch._check(offsets.dim() == 1 and offsets.numel() >= 1, lambda: "pad: offsets must be 1-D with B+1 >= 1 elements")
        return values.new_empty((offsets.shape[0] - 1, max_len, *values.shape[1:]))

    @torch.library.register_fake("provcollate::unpad")
    def _unpad_fake(padded, offsets, total, left=False):
        torch._check(padded.dim() >= 2, lambda: "unpad: padded must be [B, max_len, ...]")
        return padded.new_empty((total, *padded.shape[2:]))

    @torch.library.register_fake("provcollate::unpad_scatter_")
    def _unpad_scatter_fake(dst, padded, lengths, dst_offsets, left=False):
        return None
