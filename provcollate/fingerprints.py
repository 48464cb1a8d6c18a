"""Fingerprints: a 64-bit hash of one example's data, the same in every process, worker and machine.

The Collator computes ``batch.fingerprint`` in its fused pass (csrc/fingerprint.cpp); this module
is the same algorithm in Python, :func:`fingerprint` for one example, and what the pure-Python
collate path uses. The algorithm (docs/fingerprints.md), on little-endian bytes, with
``H(b) = XXH3_64(b, seed=0)`` (XXH3, 64-bit, default secret):

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
    from xxhash import xxh3_64 as _xxh3_stream
except ImportError:  # the pure-Python XXH3 below computes the same digest, slower
    _xxh3_stream = None

__all__ = ["fingerprint", "xxh3_64"]

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


_SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d3165526"
    "29d4689e2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e")
_KEY = struct.unpack("<24Q", _SECRET)  # the secret as 64-bit words, for the aligned reads
_MX1, _MX2 = 0x165667919E3779F9, 0x9FB21C651E98DF25
_P32_1, _P32_2, _P32_3 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _MASK


def _secret64(offset: int) -> int:
    return struct.unpack_from("<Q", _SECRET, offset)[0]


def _fold(a: int, b: int) -> int:
    m = a * b
    return (m ^ (m >> 64)) & _MASK


def _avalanche(x: int) -> int:
    x ^= x >> 37
    x = (x * _MX1) & _MASK
    return x ^ (x >> 32)


def _avalanche_xxh64(x: int) -> int:
    x ^= x >> 33
    x = (x * _P2) & _MASK
    x ^= x >> 29
    x = (x * _P3) & _MASK
    return x ^ (x >> 32)


def _mix16(data: bytes, p: int, offset: int) -> int:
    lo, hi = struct.unpack_from("<2Q", data, p)
    return _fold(lo ^ _secret64(offset), hi ^ _secret64(offset + 8))


def _accumulate(acc: list, lanes, at: int, key_offset: int) -> None:
    for i in range(8):
        lane = lanes[at + i]
        k = lane ^ _secret64(key_offset + 8 * i)
        acc[i ^ 1] = (acc[i ^ 1] + lane) & _MASK
        acc[i] = (acc[i] + (k & 0xFFFFFFFF) * (k >> 32)) & _MASK


def _xxh3_python(data: bytes) -> int:
    """XXH3-64 (seed 0, default secret) of ``data`` (Yann Collet's xxHash), in Python."""
    n = len(data)
    if n == 0:
        return _avalanche_xxh64(_secret64(56) ^ _secret64(64))
    if n <= 3:
        combined = data[-1] | (n << 8) | (data[0] << 16) | (data[n >> 1] << 24)
        s0, s1 = struct.unpack_from("<2I", _SECRET, 0)
        return _avalanche_xxh64((s0 ^ s1) ^ combined)
    if n <= 8:
        first, last = struct.unpack_from("<I", data, 0)[0], struct.unpack_from("<I", data, n - 4)[0]
        v = (_secret64(8) ^ _secret64(16)) ^ (last | (first << 32))
        v ^= _rotl(v, 49) ^ _rotl(v, 24)
        v = (v * _MX2) & _MASK
        v ^= (v >> 35) + n
        v = (v * _MX2) & _MASK
        return v ^ (v >> 28)
    if n <= 16:
        lo = (_secret64(24) ^ _secret64(32)) ^ struct.unpack_from("<Q", data, 0)[0]
        hi = (_secret64(40) ^ _secret64(48)) ^ struct.unpack_from("<Q", data, n - 8)[0]
        swapped = int.from_bytes(lo.to_bytes(8, "little"), "big")
        return _avalanche((n + swapped + hi + _fold(lo, hi)) & _MASK)
    if n <= 240:
        acc = n * _P1 & _MASK
        if n <= 128:
            for i in range((n - 1) // 32, -1, -1):
                acc += _mix16(data, 16 * i, 32 * i) + _mix16(data, n - 16 * i - 16, 32 * i + 16)
            return _avalanche(acc & _MASK)
        for i in range(8):
            acc += _mix16(data, 16 * i, 16 * i)
        acc = _avalanche(acc & _MASK)
        for i in range(8, n // 16):
            acc += _mix16(data, 16 * i, 16 * (i - 8) + 3)
        return _avalanche((acc + _mix16(data, n - 16, 119)) & _MASK)
    acc = [_P32_3, _P1, _P2, _P3, _P4, _P32_2, _P5, _P32_1]
    stripes = (n - 1) // 64  # every stripe followed by at least one byte; a scramble after each 16th
    lanes = struct.unpack_from(f"<{stripes * 8}Q", data)
    for s in range(stripes):
        _accumulate(acc, lanes, 8 * s, 8 * (s % 16))
        if s % 16 == 15:
            for i in range(8):
                a = acc[i] ^ (acc[i] >> 47) ^ _KEY[16 + i]
                acc[i] = (a * _P32_1) & _MASK
    _accumulate(acc, struct.unpack_from("<8Q", data, n - 64), 0, 121)
    result = n * _P1
    for i in range(4):
        result += _fold(acc[2 * i] ^ _secret64(11 + 16 * i), acc[2 * i + 1] ^ _secret64(19 + 16 * i))
    return _avalanche(result & _MASK)


_SMALL = 240  # bytes hashed in Python: xxhash releases the GIL on every call, and taking it back can wait


def _nbytes(part) -> int:
    return part.nbytes if isinstance(part, memoryview) else len(part)


def xxh3_64(*parts) -> int:
    """XXH3-64 (seed 0) of bytes-like objects joined, as an unsigned int: the hash every fingerprint is made of."""
    if _xxh3_stream is not None and sum(map(_nbytes, parts)) > _SMALL:
        h = _xxh3_stream()
        for p in parts:
            h.update(p)
        return h.intdigest()
    return _xxh3_python(b"".join(bytes(p) for p in parts))


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
    return xxh3_64(header, _tensor_bytes(t) if t.numel() else b"")


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
        return xxh3_64(header, memoryview(np.ascontiguousarray(values, "<f8" if is_float else "<i8")))
    return xxh3_64(header, struct.pack(f"<{len(values)}{'d' if is_float else 'q'}", *values))


def _container(tag: bytes, digests: list) -> int:
    return xxh3_64(tag, _u64(len(digests)), *(_u64(d) for d in digests))


def _mapping(pairs) -> int:
    pairs = sorted(pairs)
    return xxh3_64(b"M" + _u64(len(pairs)) + b"".join(_u64(k) + _u64(v) for k, v in pairs))


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
        return xxh3_64(b"I" + struct.pack("<q", v)) if _INT64_MIN <= v <= _INT64_MAX else xxh3_64(b"J" + str(v).encode())
    elif isinstance(x, float):
        return xxh3_64(b"F" + struct.pack("<d", x))
    elif isinstance(x, str):
        return xxh3_64(b"S" + x.encode("utf-8", "surrogatepass"))
    elif isinstance(x, bytes):
        return xxh3_64(b"B" + x)
    elif x is None:
        return xxh3_64(b"N")
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
    return xxh3_64(b"O" + f"{t.__module__}.{t.__qualname__}".encode("utf-8", "surrogatepass"))


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
