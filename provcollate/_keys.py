"""Keys: the identity users already have (a WebDataset ``__key__``, a ``custom_id``, a database
id, a (document, page) pair), checked once where it enters.

A key is an int (any int64), a str, bytes, or a non-empty tuple of those. Keys sort ints
numerically, str and bytes by their UTF-8 bytes, tuples element by element; one set of keys
holds one kind (all ints, all str, all bytes, or tuples of one shape), so that they always sort.
"""
from __future__ import annotations

import operator
from typing import Any, List

import numpy as np
import torch

__all__ = ["check_key", "key_kind", "tuple_shape", "describe_key", "batch_keys", "keys_kind", "key_array", "keys_from_arrow",
           "encode_keys", "decode_keys", "KEY_KINDS"]

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
KEY_KINDS = ("int", "str", "bytes", "tuple")
_SCALARS = {int: "int", str: "str", bytes: "bytes"}


def describe_key(key) -> str:
    """A key as messages show it: its repr, cut short."""
    text = repr(key)
    return text if len(text) <= 80 else text[:77] + "..."


def _scalar(key, owner: str, where: str):
    if isinstance(key, (str, bytes)):
        return key
    if isinstance(key, bool) or not hasattr(type(key), "__index__"):
        raise TypeError(f"{owner}: {where} is {describe_key(key)} of type {type(key).__name__}; keys are ints, str, bytes "
                        "or tuples of those")
    value = operator.index(key)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{owner}: {where} is {value}, which does not fit in int64")
    return value


def check_key(owner: str, key, where: str):
    """``key`` as a plain Python key (numpy and 0-d tensor ints become int), or TypeError /
    ValueError naming ``where`` (e.g. "the key of example 3") and the key."""
    if isinstance(key, tuple):
        if not key:
            raise ValueError(f"{owner}: {where} is an empty tuple; a tuple key holds at least one int, str or bytes")
        return tuple(_scalar(k, owner, f"{where} (element {i} of {describe_key(key)})") for i, k in enumerate(key))
    if isinstance(key, torch.Tensor):
        if key.dim() != 0 or key.dtype.is_floating_point or key.dtype.is_complex or key.dtype == torch.bool:
            raise TypeError(f"{owner}: {where} is a tensor of shape {list(key.shape)} and dtype {key.dtype}; "
                            "a key is an int, str, bytes or a tuple of those")
        key = int(key)
    return _scalar(key, owner, where)


def key_kind(key) -> str:
    """The kind of a checked key: "int", "str", "bytes", or "tuple"."""
    return "tuple" if isinstance(key, tuple) else _SCALARS[type(key)]


def tuple_shape(key: tuple) -> tuple:
    """The element kinds of a checked tuple key: tuples of one shape compare element by element."""
    return tuple(_SCALARS[type(k)] for k in key)


def batch_keys(owner: str, keys: List[Any], what: str = "sample"):
    """The keys of a batch as ``batch.key``: a LongTensor [B] when every key is an int, else a list
    of B keys (str, bytes or tuples), all of one kind; TypeError or ValueError naming the first
    bad one (``what`` names a row: "sample" gives "the key of sample 3")."""
    types = set(map(type, keys))
    if types == {int}:
        try:
            return torch.tensor(keys, dtype=torch.int64)
        except (RuntimeError, OverflowError):  # one does not fit in int64: named below
            pass
    elif types == {str} or types == {bytes}:
        return list(keys)
    keys = [check_key(owner, k, f"the key of {what} {b}") for b, k in enumerate(keys)]
    first = key_kind(keys[0])
    shape = tuple_shape(keys[0]) if first == "tuple" else None
    for b, k in enumerate(keys):
        kind = key_kind(k)
        if kind != first or (shape is not None and tuple_shape(k) != shape):
            raise TypeError(f"{owner}: the key of {what} {b} is {describe_key(k)} ({kind}) but that of {what} 0 is "
                            f"{describe_key(keys[0])} ({first}); one batch holds keys of one kind"
                            + (" and tuples of one shape" if shape is not None else ""))
    return torch.tensor(keys, dtype=torch.int64) if first == "int" else keys


def keys_kind(keys) -> str:
    """The kind of a column of checked keys (an int64 array, or a list of one kind)."""
    if isinstance(keys, np.ndarray):
        return "int"
    return key_kind(keys[0]) if keys else "str"


def key_array(pa, keys):
    """A column of keys as an Arrow array (``pa`` is pyarrow): int64, large_string, large_binary,
    or a struct of a tuple key's elements named "0", "1", ..."""
    if isinstance(keys, np.ndarray):
        return pa.array(keys, pa.int64())
    kind = keys_kind(keys)
    if kind == "int":
        return pa.array(np.asarray(keys, np.int64), pa.int64())
    if kind == "tuple":
        fields = [key_array(pa, [k[i] for k in keys]) for i in range(len(keys[0]))]
        return pa.StructArray.from_arrays(fields, [str(i) for i in range(len(fields))])
    return pa.array(keys, pa.large_binary() if kind == "bytes" else pa.large_string())


def keys_from_arrow(array, kind: str):
    """The inverse of :func:`key_array`: an int64 array for int keys, else a list of keys."""
    if kind == "int":
        return np.array(array.to_numpy(zero_copy_only=False), np.int64, copy=True)
    if kind == "tuple":
        return list(zip(*(array.field(i).to_pylist() for i in range(array.type.num_fields))))
    return array.to_pylist()


# Keys as bytes plus offsets, for moving them as tensors (never a pickle per key). An int takes
# 8 bytes (little-endian), a str its UTF-8 bytes, bytes themselves; a tuple its elements in turn,
# each as one tag byte (i, s or b), its length in 8 bytes, then those bytes.
_TAGS = {int: b"i", str: b"s", bytes: b"b"}


def _element_bytes(k) -> bytes:
    if isinstance(k, int):
        return k.to_bytes(8, "little", signed=True)
    return k.encode("utf-8") if isinstance(k, str) else k


def _key_bytes(key) -> bytes:
    if isinstance(key, tuple):
        parts = []
        for k in key:
            raw = _element_bytes(k)
            parts += [_TAGS[type(k)], len(raw).to_bytes(8, "little"), raw]
        return b"".join(parts)
    return _element_bytes(key)


def encode_keys(keys) -> tuple:
    """(data uint8 [total], offsets int64 [E+1]) of a list of checked str, bytes or tuple keys."""
    raw = [_key_bytes(k) for k in keys]
    offsets = np.zeros(len(raw) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, raw), np.int64, len(raw)), out=offsets[1:])
    return np.frombuffer(bytearray(b"".join(raw)), np.uint8), offsets


def _element(tag: bytes, raw: bytes):
    if tag == b"i":
        return int.from_bytes(raw, "little", signed=True)
    return raw.decode("utf-8") if tag == b"s" else raw


def decode_keys(data: np.ndarray, offsets: np.ndarray, kind: str) -> list:
    """The keys :func:`encode_keys` made ``data`` and ``offsets`` from (``kind``: str, bytes or tuple)."""
    blob = data.tobytes()
    bounds = offsets.tolist()
    pieces = [blob[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    if kind == "str":
        return [p.decode("utf-8") for p in pieces]
    if kind == "bytes":
        return pieces
    keys = []
    for p in pieces:
        elements, at = [], 0
        while at < len(p):
            tag, size = p[at:at + 1], int.from_bytes(p[at + 1:at + 9], "little")
            elements.append(_element(tag, p[at + 9:at + 9 + size]))
            at += 9 + size
        keys.append(tuple(elements))
    return keys


def encode_id(i):
    """An id (a dataset index, an ``(index, view)`` pair or a key) as JSON data: ints and strs as
    they are, bytes as ``{"bytes": hex}``, tuples as ``{"tuple": [...]}``; :func:`decode_id` inverts it."""
    if isinstance(i, (bool, np.bool_)):
        return bool(i)
    if isinstance(i, (int, np.integer)):
        return int(i)
    if isinstance(i, bytes):
        return {"bytes": i.hex()}
    if isinstance(i, tuple):
        return {"tuple": [encode_id(e) for e in i]}
    return i


def decode_id(i):
    """The id that :func:`encode_id` made ``i`` from."""
    if isinstance(i, dict):
        if "bytes" in i:
            return bytes.fromhex(i["bytes"])
        return tuple(decode_id(e) for e in i["tuple"])
    if isinstance(i, list):  # JSON has no tuples
        return tuple(decode_id(e) for e in i)
    return i
