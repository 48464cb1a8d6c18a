"""Fingerprints: a 64-bit hash of one example's data, the same in every process, worker and machine.

The Collator computes ``batch.fingerprint`` in its fused pass (csrc/fingerprint.cpp); this module
is the same algorithm in Python, :func:`fingerprint` for one example, and what the pure-Python
collate path uses. The algorithm (docs/fingerprints.md), on little-endian bytes, with
``H(b) = XXH64(b, seed=0)``:

* a tensor, numpy array or numpy scalar: ``H(b"T" + u8(len(name)) + name + u8(ndim) + i64(size)
  for each dim + its elements in C order)``, ``name`` its dtype as torch names it (``"int64"``,
  ``"float32"``, ``"bool"``, ``"bfloat16"``);
* a list of numbers (nested, rectangular, or empty): the tensor of it, int64 when every number is
  a bool or an int, float64 when any is a float (so ``[1, 2]`` and ``torch.tensor([1, 2])`` agree);
* a bool or an int that fits int64: ``H(b"I" + i64(v))``; a larger int: ``H(b"J" + decimal)``;
  a float: ``H(b"F" + f64(v))``;
* a str: ``H(b"S" + its UTF-8)``; bytes: ``H(b"B" + bytes)``; None: ``H(b"N")``;
* a Mapping: ``H(b"M" + u64(n) + u64(H(key)) + u64(H(value))`` for each entry, entries sorted by
  ``(H(key), H(value)))``: insertion order does not count, as for ``==`` of dicts);
* another list, or a tuple (namedtuples too): ``H(b"L" or b"U" + u64(n) + u64(H(element))...)``;
* anything else: ``H(b"O" + module + "." + qualified name of its type)``: its type only.

The fingerprint is that hash read as a signed int64 (two's complement). A raw sample collated
with ``Collator(index=K)`` is fingerprinted without its index: the Mapping without key ``K``, or
the list/tuple without position ``K``, hashed as a container.
"""
from __future__ import annotations

import collections.abc
import struct

import torch

from . import ops

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional
    np = None

try:
    from xxhash import xxh64 as _xxh64_stream
except ImportError:  # the pure-Python XXH64 below computes the same digest, slower
    _xxh64_stream = None

__all__ = ["fingerprint", "xxh64"]

if ops.HAS_EXTENSION:
    from ._C import fingerprint as _native
else:
    _native = None

_MASK = (1 << 64) - 1
_P1, _P2, _P3, _P4, _P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63,
                           0x27D4EB2F165667C5)
_MAX_DEPTH = 200
_MAX_DIMS = 64
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _MASK


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _P2) & _MASK, 31) * _P1) & _MASK


def _xxh64_python(data: bytes, seed: int = 0) -> int:
    """XXH64 of ``data`` (Yann Collet's xxHash, 64-bit), in Python."""
    n, p = len(data), 0
    if n >= 32:
        v = [(seed + _P1 + _P2) & _MASK, (seed + _P2) & _MASK, seed, (seed - _P1) & _MASK]
        lanes = struct.unpack_from(f"<{(n // 32) * 4}Q", data)
        for i in range(0, len(lanes), 4):
            v = [_round(v[j], lanes[i + j]) for j in range(4)]
        p = (n // 32) * 32
        acc = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _MASK
        for x in v:
            acc = ((acc ^ _round(0, x)) * _P1 + _P4) & _MASK
    else:
        acc = (seed + _P5) & _MASK
    acc = (acc + n) & _MASK
    while p + 8 <= n:
        acc = (_rotl(acc ^ _round(0, struct.unpack_from("<Q", data, p)[0]), 27) * _P1 + _P4) & _MASK
        p += 8
    if p + 4 <= n:
        acc = (_rotl(acc ^ (struct.unpack_from("<I", data, p)[0] * _P1 & _MASK), 23) * _P2 + _P3) & _MASK
        p += 4
    while p < n:
        acc = (_rotl(acc ^ (data[p] * _P5 & _MASK), 11) * _P1) & _MASK
        p += 1
    acc ^= acc >> 33
    acc = (acc * _P2) & _MASK
    acc ^= acc >> 29
    acc = (acc * _P3) & _MASK
    return acc ^ (acc >> 32)


_SMALL = 512  # bytes hashed in Python: xxhash releases the GIL on every call, and taking it back can wait


def xxh64(*parts) -> int:
    """XXH64 (seed 0) of bytes-like objects joined, as an unsigned int: the hash every fingerprint is made of."""
    if _xxh64_stream is not None and sum(map(len, parts)) > _SMALL:
        h = _xxh64_stream()
        for p in parts:
            h.update(p)
        return h.intdigest()
    return _xxh64_python(b"".join(bytes(p) for p in parts))


def _u64(x: int) -> bytes:
    return struct.pack("<Q", x)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_bytes(t: torch.Tensor):
    """A tensor's elements in C order as a bytes-like object (few torch calls: each releases the GIL)."""
    if t.requires_grad:
        t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if np is not None:
        try:
            return memoryview(np.ascontiguousarray(t.numpy())).cast("B")
        except (TypeError, RuntimeError):  # dtypes numpy lacks (bfloat16, float8, ...): their bytes as uint8
            pass
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _tensor_digest(t: torch.Tensor) -> int:
    name = _dtype_name(t.dtype).encode()
    header = b"T" + bytes([len(name)]) + name + bytes([t.dim()]) + struct.pack(f"<{t.dim()}q", *t.shape)
    return xxh64(header, _tensor_bytes(t) if t.numel() else b"")


def _numpy_tensor(x):
    """A numpy array or scalar as a tensor (None when torch cannot hold its dtype)."""
    arr = np.asarray(x)
    for attempt in (arr, None):
        try:
            return torch.from_numpy(arr if attempt is not None else np.array(arr))
        except (TypeError, ValueError, RuntimeError):
            continue
    return None


def _is_number(x) -> bool:
    if isinstance(x, (bool, int, float)):
        return True
    return np is not None and isinstance(x, (np.bool_, np.integer, np.floating))


def _flat_numbers(x: list):
    """A flat list of Python ints (or of ints and floats) as its numeric digest's parts, at C speed;
    None when it holds anything else (the general walk below decides then)."""
    kinds = set(map(type, x))
    if not kinds or not kinds <= {int, float, bool}:
        return None
    if float in kinds:
        return [len(x)], np.array(x, dtype=np.float64), True
    values = np.array(x, dtype=object if len(x) and max(max(x), -min(x)) > _INT64_MAX else np.int64) if x else np.zeros(0, np.int64)
    return ([len(x)], values, False) if values.dtype == np.int64 else None


def _numeric_list(x: list):
    """(shape, flat numbers, any float) of a rectangular list of numbers, or None when it is not one."""
    if np is not None and x and not isinstance(x[0], list):
        flat = _flat_numbers(x)
        if flat is not None:
            return flat
    shape = []
    y = x
    while isinstance(y, list):
        shape.append(len(y))
        if not y or len(shape) > _MAX_DIMS:  # (a list that holds itself ends here too)
            break
        y = y[0]
    if len(shape) > _MAX_DIMS or (shape[-1] != 0 and not _is_number(y)):
        return None
    flat: list = []
    any_float = False

    def walk(v, depth: int) -> bool:
        nonlocal any_float
        if len(v) != shape[depth]:
            return False
        if depth == len(shape) - 1:
            for e in v:
                if isinstance(e, list) or not _is_number(e):
                    return False
                if isinstance(e, float) or (np is not None and isinstance(e, np.floating)):
                    any_float = True
            flat.extend(v)
            return True
        return all(isinstance(e, list) and walk(e, depth + 1) for e in v)

    if not walk(x, 0):
        return None
    if not any_float:
        ints = [int(e) for e in flat]
        if any(not _INT64_MIN <= e <= _INT64_MAX for e in ints):
            return None
        return shape, ints, False
    return shape, [float(e) for e in flat], True


def _list_digest(shape: list, values, is_float: bool) -> int:
    name = b"float64" if is_float else b"int64"
    header = b"T" + bytes([len(name)]) + name + bytes([len(shape)]) + struct.pack(f"<{len(shape)}q", *shape)
    if np is not None and isinstance(values, np.ndarray):
        return xxh64(header, memoryview(np.ascontiguousarray(values, "<f8" if is_float else "<i8")))
    return xxh64(header, struct.pack(f"<{len(values)}{'d' if is_float else 'q'}", *values))


def _container(tag: bytes, digests: list) -> int:
    return xxh64(tag, _u64(len(digests)), *(_u64(d) for d in digests))


def _mapping(pairs) -> int:
    pairs = sorted(pairs)
    return xxh64(b"M" + _u64(len(pairs)) + b"".join(_u64(k) + _u64(v) for k, v in pairs))


def digest(x, depth: int = 0) -> int:
    """The unsigned 64-bit digest of ``x`` (see the module's docstring); :func:`fingerprint` is its signed form."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"fingerprint: data nested deeper than {_MAX_DEPTH} levels")
    if isinstance(x, torch.Tensor):
        return _tensor_digest(x)
    if np is not None and isinstance(x, (np.ndarray, np.generic)):
        t = _numpy_tensor(x)
        if t is not None:
            return _tensor_digest(t)
    elif isinstance(x, (bool, int)):
        v = int(x)
        return xxh64(b"I" + struct.pack("<q", v)) if _INT64_MIN <= v <= _INT64_MAX else xxh64(b"J" + str(v).encode())
    elif isinstance(x, float):
        return xxh64(b"F" + struct.pack("<d", x))
    elif isinstance(x, str):
        return xxh64(b"S" + x.encode("utf-8", "surrogatepass"))
    elif isinstance(x, bytes):
        return xxh64(b"B" + x)
    elif x is None:
        return xxh64(b"N")
    elif isinstance(x, list):
        numeric = _numeric_list(x)
        if numeric is not None:
            return _list_digest(*numeric)
        return _container(b"L", [digest(v, depth + 1) for v in x])
    elif isinstance(x, tuple):
        return _container(b"U", [digest(v, depth + 1) for v in x])
    elif isinstance(x, collections.abc.Mapping):
        return _mapping((digest(k, depth + 1), digest(v, depth + 1)) for k, v in x.items())
    t = type(x)
    return xxh64(b"O" + f"{t.__module__}.{t.__qualname__}".encode("utf-8", "surrogatepass"))


def signed(d: int) -> int:
    """An unsigned 64-bit digest as the signed int64 a LongTensor holds."""
    return d - (1 << 64) if d >= 1 << 63 else d


def fingerprint(data) -> int:
    """The fingerprint of one example's data: what ``batch.fingerprint`` holds for it.

    ``data`` is what the Collator receives as the example (``Indexed(ds)[i].data``): tensors,
    numpy arrays, numbers, strings and lists, tuples and dicts of them. The result depends on the
    data only (dtypes, shapes, values, strings, the container structure and its keys), never on
    padding, packing, the batch, the process, the machine or the torch version. Returns a signed
    int64 (the hash of the module's docstring, read as two's complement).
    """
    if _native is not None:
        return _native(data)
    return signed(digest(data))


def without_index(sample, key) -> int:
    """The signed fingerprint of a raw sample collated with ``Collator(index=key)``: the sample
    without its index entry, as a container."""
    if isinstance(sample, collections.abc.Mapping):
        return signed(_mapping((digest(k, 1), digest(v, 1)) for k, v in sample.items() if k != key))
    n = len(sample)
    pos = key % n
    parts = [digest(v, 1) for i, v in enumerate(sample) if i != pos]
    return signed(_container(b"L" if isinstance(sample, list) else b"U", parts))
