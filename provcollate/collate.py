"""Collator and Batch: the drop-in ``collate_fn`` that pads a batch and keeps every example's identity.

``Collator`` looks at the first sample only, to learn the structure of the batch (a plan: which
fields there are and what they hold), and hands the samples and the plan to the compiled fused
pass (``provcollate._C.collate``, csrc/collate.cpp). That pass checks every sample against the
plan and writes each field into one output tensor: tensors and numpy arrays are copied with the
GIL released, lists of Python numbers are read in place. Without the compiled extension the same
plan runs on :func:`_collate_python`, which gives the same batches and the same errors.
"""
from __future__ import annotations

import collections.abc
import contextlib
import math
import operator
import warnings
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.utils.data

from . import fingerprints as _fingerprint
from . import ops, reference
from ._keys import batch_keys
from .dataset import Sample

try:
    import numpy as np
except ImportError:  # numpy is optional for torch, and so for provcollate
    np = None

__all__ = ["Collator", "Batch"]

if ops.HAS_EXTENSION:
    from ._C import collate as _native
else:
    _native = None

# Plan codes shared with csrc/collate.cpp.
_MAP, _SEQ, _LEAF, _INDEX, _VIEW = range(5)
_TENSOR, _ARRAY, _NUMBER, _LIST, _OBJECT = range(5)
_BOOL, _INT, _FLOAT, _BAD = range(4)
_MAPPING, _SEQUENCE = 5, 6  # what _kind says of containers (leaves are _TENSOR.._OBJECT)

_EXPECTED = {
    _TENSOR: "a Tensor",
    _ARRAY: "a numpy array or scalar",
    _NUMBER: "a number (bool, int or float)",
    _LIST: "a list of numbers",
}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_MULTIPLE = 2**20


# ---------------------------------------------------------------------------------------------
# The plan, from sample 0


def _is_number(x) -> bool:
    if isinstance(x, (bool, int, float)):
        return True
    return np is not None and isinstance(x, (np.bool_, np.integer, np.floating))


_MAX_LIST_DEPTH = 64  # deeper nesting (or a list that holds itself) is not a list of numbers


def _numeric_list(x: list) -> bool:
    """A list of numbers, nested up to 64 deep (judged by its first elements), or an empty one."""
    for _ in range(_MAX_LIST_DEPTH + 1):
        if not isinstance(x, list):
            return _is_number(x)
        if not x:
            return True
        x = x[0]
    return False


def _kind(x) -> int:
    if isinstance(x, torch.Tensor):
        return _TENSOR
    if np is not None and isinstance(x, (np.ndarray, np.bool_, np.number)):
        return _ARRAY
    if isinstance(x, (str, bytes)):
        return _OBJECT
    if isinstance(x, (bool, int, float)):
        return _NUMBER
    if isinstance(x, list):
        if _numeric_list(x):
            return _LIST
        return _SEQUENCE if _kind(x[0]) in (_TENSOR, _ARRAY, _MAPPING, _SEQUENCE) else _OBJECT
    if isinstance(x, collections.abc.Mapping):
        return _MAPPING
    if isinstance(x, tuple):
        return _SEQUENCE
    return _OBJECT


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _seq_maker(x) -> Callable:
    if isinstance(x, list):
        return list
    if hasattr(type(x), "_fields"):  # a namedtuple comes back as its own type
        return lambda parts: type(x)(*parts)
    return tuple


class _Leaf(NamedTuple):
    """One field of the plan, as the fused pass reads it (a tuple to csrc/collate.cpp)."""

    path: str
    kind: int
    expected: str  # what every sample must hold there, in words (for errors)
    object_type: type  # what sample 0 holds there
    pad_value: Any
    sequence: bool  # padded (or packed) with lengths; else stacked


class _FieldOut(NamedTuple):
    """One collated field from the fused pass: its value and, for a sequence field, lengths, offsets, T."""

    value: Any
    lengths: Optional[torch.Tensor]
    offsets: Optional[torch.Tensor]
    max_len: Optional[int]


class _Collated(NamedTuple):
    """What the fused pass returns (``provcollate._C.collate`` or :func:`_collate_python`)."""

    index: torch.Tensor
    view: torch.Tensor
    fields: list
    primary: int
    mask: Optional[torch.Tensor]
    fingerprint: Optional[torch.Tensor] = None


class _Plan:
    """What the batch holds, learned from sample 0.

    ``walk`` is the tree the fused pass follows through every raw sample (identity included);
    ``template`` rebuilds ``batch.data`` from the collated fields; ``leaves`` describes each field
    (:class:`_Leaf`); a sequence field is padded (or packed) with lengths, any other field is stacked.
    """

    def __init__(self, collator: "Collator", first) -> None:
        self.collator = collator
        self.leaves: list[_Leaf] = []
        self.paths: list[tuple] = []  # each field's keys/positions inside batch.data
        self.ndims: list[int] = []
        self.names: dict[str, int] = {}  # field path -> leaf id
        if isinstance(first, Sample):
            if collator.index is not None:
                raise ValueError(
                    f"Collator: index={collator.index!r} reads the index from raw samples, but these are "
                    "provcollate.Sample (from Indexed), which carry their own; use Collator(index=None)"
                )
            data_walk, self.template = self._node(first.data, ())
            # Sample(index, view, data[, key]): the pass reads the first three; keys are taken before it.
            self.walk = (_SEQ, "", "Sample", False, len(first), (0, 1, 2), ((_INDEX, ""), (_VIEW,), data_walk))
            self.data_child = 2  # fingerprints hash the data alone
        elif collator.index is None:
            raise TypeError(
                f"Collator: sample 0 is a {type(first).__name__} that carries no index: wrap the dataset in "
                "provcollate.Indexed, or pass Collator(index=K) if samples hold their index at position/key K"
            )
        else:
            self.walk, self.template = self._root_with_index(first, collator.index)
            self.data_child = -1  # fingerprints hash the sample without its index
        self.primary = self._named_fields()

    def _root_with_index(self, first, key):
        if isinstance(first, collections.abc.Mapping):
            if key not in first:
                raise ValueError(f"Collator: index={key!r} is not a key of sample 0, whose keys are {list(first)}")
            walks, keys, tmpls = [], [], []
            for k in first:
                if k == key:
                    walks.append((_INDEX, f"key {key!r}"))
                    continue
                w, t = self._node(first[k], (k,))
                walks.append(w)
                keys.append(k)
                tmpls.append(t)
            walk = (_MAP, "", type(first).__name__, len(first), tuple(first), tuple(walks))
            return walk, (_MAP, tuple(keys), tuple(tmpls))
        if isinstance(first, (tuple, list)):
            n = len(first)
            if isinstance(key, bool) or not isinstance(key, int) or not -n <= key < n:
                raise ValueError(
                    f"Collator: index={key!r} must be a position in sample 0, a {type(first).__name__} of {n} elements"
                )
            key %= n
            walks, tmpls = [], []
            for p, x in enumerate(first):
                if p == key:
                    walks.append((_INDEX, f"position {key}"))
                    continue
                w, t = self._node(x, (len(tmpls),))
                walks.append(w)
                tmpls.append(t)
            walk = (_SEQ, "", type(first).__name__, isinstance(first, list), n, tuple(range(n)), tuple(walks))
            return walk, (_SEQ, list if isinstance(first, list) else tuple, tuple(tmpls))
        raise TypeError(
            f"Collator: index={key!r} needs samples that are tuples, lists or dicts, got sample 0 of type "
            f"{type(first).__name__}"
        )

    def _node(self, x, path: tuple):
        name = ".".join(str(k) for k in path)
        kind = _kind(x)
        if kind == _MAPPING:
            keys = tuple(x)
            children = [self._node(x[k], path + (k,)) for k in keys]
            walk = (_MAP, name, type(x).__name__, len(keys), keys, tuple(w for w, _ in children))
            return walk, (_MAP, keys, tuple(t for _, t in children))
        if kind == _SEQUENCE:
            children = [self._node(v, path + (i,)) for i, v in enumerate(x)]
            walk = (_SEQ, name, type(x).__name__, isinstance(x, list), len(x), tuple(range(len(x))),
                    tuple(w for w, _ in children))
            return walk, (_SEQ, _seq_maker(x), tuple(t for _, t in children))
        leaf_id = len(self.leaves)
        c = self.collator
        if kind == _OBJECT:
            expected = "anything" if x is None else f"a {type(x).__name__} (or None)"
        else:
            expected = _EXPECTED[kind]
        if name in self.names:
            first = self.paths[self.names[name]]
            raise ValueError(
                f"Collator: two fields of sample 0 have the path {name!r} (keys {list(first)} and {list(path)}); "
                "fields are named by their path joined with '.', so rename one of them"
            )
        ndim = x.dim() if kind == _TENSOR else (x.ndim if kind == _ARRAY else (1 if kind == _LIST else 0))
        # A sequence (padded or packed, with lengths) by type and rank alone, never by the lengths
        # one batch happens to hold: equal lengths padded are the same data as stacked.
        sequence = ndim >= 1 and name not in c.stack
        self.names[name] = leaf_id
        self.leaves.append(_Leaf(name, kind, expected, type(x), c.pad_values.get(name, c.pad_value), sequence))
        self.paths.append(path)
        self.ndims.append(ndim)
        return (_LEAF, leaf_id), (_LEAF, leaf_id)

    def _named_fields(self) -> int:
        """Checks the fields named by ``primary``, ``pad_values`` and ``stack``; returns the primary's id:
        the named one, else the first sequence field of sample 0 (-1 without one)."""
        c = self.collator
        names = self.names
        named = [("pad_values", name) for name in c.pad_values] + [("stack", name) for name in c.stack]
        if c.primary is not None:
            named.append(("primary", c.primary))
        for arg, name in named:
            if name not in names:
                fields = ", ".join("the sample itself ('')" if n == "" else repr(n) for n in names)
                raise ValueError(f"Collator: {arg} names field {name!r}, which sample 0 does not have; its fields are {fields}")
            i = names[name]
            if self.ndims[i] < 1:
                raise ValueError(
                    f"Collator: {arg} names field {name!r}, which has no length dimension to pad "
                    f"(sample 0 holds a {self.leaves[i].object_type.__name__} there)"
                )
            if arg != "stack" and name in c.stack:
                raise ValueError(f"Collator: {arg} names field {name!r}, which stack= also names: a stacked field is never padded")
        if c.primary is not None:
            return names[c.primary]
        return next((i for i, leaf in enumerate(self.leaves) if leaf.sequence), -1)

    def assemble(self, values: list):
        """``batch.data``: the structure of sample 0's data with each field's collated value in place."""
        return _assemble(self.template, values)


def _assemble(tmpl, values):
    if tmpl[0] == _LEAF:
        return values[tmpl[1]]
    if tmpl[0] == _MAP:
        return {k: _assemble(c, values) for k, c in zip(tmpl[1], tmpl[2])}
    return tmpl[1]([_assemble(c, values) for c in tmpl[2]])


# ---------------------------------------------------------------------------------------------
# The pure-Python pass: the fallback without the extension. Same plan, results and messages as
# csrc/collate.cpp, in the same order of checks.


def _subject(path: str, b: int) -> str:
    return f"field '{path}' of sample {b}" if path else f"sample {b}"


def _mismatch(path: str, b: int, x, expected: str) -> TypeError:
    return TypeError(f"Collator: {_subject(path, b)} has type {type(x).__name__}, expected {expected} like sample 0")


def _num_kind(x) -> int:
    if isinstance(x, float):
        return _FLOAT
    if isinstance(x, bool):
        return _BOOL
    if isinstance(x, int):
        return _INT
    if np is not None and isinstance(x, np.generic):
        if isinstance(x, np.bool_):
            return _BOOL
        if isinstance(x, np.integer):
            return _INT
        if isinstance(x, np.floating):
            return _FLOAT
    return _BAD


def _int64(x, what: str) -> int:
    v = operator.index(x)
    if not _INT64_MIN <= v <= _INT64_MAX:
        raise ValueError(f"Collator: {what} {x}, which does not fit in int64")
    return v


def _identity(node, x, b: int) -> int:
    what = f"the {'index' if node[0] == _INDEX else 'view'} of sample {b}" + (f" ({node[1]})" if node[0] == _INDEX and node[1] else "")
    if isinstance(x, bool) or not hasattr(type(x), "__index__"):
        raise TypeError(f"Collator: {what} has type {type(x).__name__}, expected an int")
    try:
        v = operator.index(x)
    except TypeError:
        raise TypeError(f"Collator: {what} has type {type(x).__name__}, expected an int") from None
    if not _INT64_MIN <= v <= _INT64_MAX:
        raise ValueError(f"Collator: {what} is {x}, which does not fit in int64")
    return v


_MISSING = object()


def _walk(node, x, b: int, items: list, index: list, view: list) -> None:
    kind = node[0]
    if kind == _LEAF:
        items[node[1]][b] = x
    elif kind == _INDEX:
        index[b] = _identity(node, x, b)
    elif kind == _VIEW:
        view[b] = _identity(node, x, b)
    elif kind == _SEQ:
        _, path, expected, is_list, size, positions, children = node
        if not isinstance(x, list if is_list else tuple):
            raise _mismatch(path, b, x, "a " + expected)
        if len(x) != size:
            raise ValueError(f"Collator: {_subject(path, b)} has {len(x)} elements, expected {size} like sample 0")
        for p, child in zip(positions, children):
            _walk(child, x[p], b, items, index, view)
    else:
        _, path, expected, size, keys, children = node
        is_dict = isinstance(x, dict)
        if not is_dict and not isinstance(x, collections.abc.Mapping):
            raise _mismatch(path, b, x, "a " + expected)
        for k, child in zip(keys, children):
            if is_dict:
                v = dict.get(x, k, _MISSING)
            else:
                try:
                    v = x[k]
                except KeyError:
                    v = _MISSING
            if v is _MISSING:
                raise ValueError(f"Collator: field '{_join(path, k)}' is missing from sample {b} (sample 0 has it)")
            _walk(child, v, b, items, index, view)
        if len(x) != size:
            known = set(keys)
            for k in x:
                if k not in known:
                    raise ValueError(f"Collator: field '{_join(path, k)}' of sample {b} is not in sample 0")


def _shape(s) -> str:
    return str(tuple(s))


def _pad_for(path: str, value, dtype: torch.dtype):
    """``value`` converted to ``dtype``; it must survive the trip (-100 must not become 156 in uint8),
    by Python's == (0 pads a bool field). The same rule as csrc/collate.cpp's pad_pattern."""
    try:
        cast = torch.full((), value, dtype=dtype).item()
        if dtype.is_floating_point:  # only an infinite value may become inf (1e5 in float16 would)
            ok = math.isinf(value) or not math.isinf(cast)
        else:
            ok = dtype.is_complex or cast == value
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"Collator: pad value {value} of field '{path}' does not fit its dtype {dtype}")
    return cast


class _Field:
    """One collated field: its value and, for sequence fields, lengths, offsets and T."""

    __slots__ = ("value", "lengths", "offsets", "max_len")

    def __init__(self, value, lengths=None, offsets=None, max_len=None) -> None:
        self.value, self.lengths, self.offsets, self.max_len = value, lengths, offsets, max_len


def _place(leaf, tensors: list, lengths: list, length_dim: bool, opts: dict) -> _Field:
    """Pad (or pack) a sequence field, or stack the others, as the fused pass lays them out."""
    sequence = length_dim and leaf.sequence
    if not sequence:
        b = next((b for b, n in enumerate(lengths) if n != lengths[0]), None)
        if length_dim and b is not None:
            raise ValueError(f"Collator: {_subject(leaf.path, b)} has length {lengths[b]}, but sample 0 has length "
                             f"{lengths[0]}: fields named by stack= are stacked, so their items must have one shape")
        return _Field(torch.stack(tensors))
    max_len = max(lengths)
    m = opts["multiple"]
    if m > 1:
        max_len = -(-max_len // m) * m
    values = torch.cat(tensors)
    offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    if opts["packed"]:
        return _Field(values, lengths, offsets, max_len)
    pad = _pad_for(leaf.path, leaf.pad_value, values.dtype)
    return _Field(ops.pad(values, offsets.to(values.device), max_len, pad, opts["left"]), lengths, None, max_len)


def _array_tensor(leaf, x, b: int) -> torch.Tensor:
    if np is None or not isinstance(x, (np.generic, np.ndarray)):
        raise _mismatch(leaf.path, b, x, leaf.expected)
    with warnings.catch_warnings():
        # Items are only read, never written: a read-only array is fine.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        x = np.asarray(x)
        with contextlib.suppress(TypeError, RuntimeError, ValueError):
            return torch.from_numpy(x)
        try:
            # Negative strides and the like: a C-ordered copy, as torch.as_tensor would make.
            return torch.from_numpy(np.array(x))
        except (TypeError, RuntimeError, ValueError) as e:
            raise TypeError(f"Collator: {_subject(leaf.path, b)} cannot be read as a tensor: {e}") from None


def _tensor_field(leaf, objs: list, opts: dict) -> _Field:
    path, kind = leaf.path, leaf.kind
    ts = []
    for b, x in enumerate(objs):
        if kind == _TENSOR:
            if not isinstance(x, torch.Tensor):
                raise _mismatch(path, b, x, leaf.expected)
            ts.append(x)
        else:
            ts.append(_array_tensor(leaf, x, b))
    t0 = ts[0]
    length_dim = t0.dim() > 0
    dtype = t0.dtype
    for b, x in enumerate(ts):
        if x.layout != torch.strided or x.is_meta:
            raise TypeError(
                f"Collator: {_subject(path, b)} is a tensor with layout {x.layout} on {x.device}; "
                "only strided tensors with data can be collated"
            )
        if x.dim() != t0.dim() or (length_dim and x.shape[1:] != t0.shape[1:]):
            raise ValueError(
                f"Collator: {_subject(path, b)} has shape {_shape(x.shape)}, but sample 0 has {_shape(t0.shape)}: "
                "all dims after the first must agree"
            )
        if x.device != t0.device:
            raise ValueError(f"Collator: {_subject(path, b)} is on {x.device}, but sample 0 is on {t0.device}")
        try:
            dtype = torch.promote_types(dtype, x.dtype)
        except RuntimeError:
            raise TypeError(f"Collator: {_subject(path, b)} has dtype {x.dtype}, which torch cannot promote with {dtype} "
                            "(the dtype of the samples before it): give every sample one dtype") from None
    lengths = [x.shape[0] if length_dim else 1 for x in ts]
    return _place(leaf, [x.to(dtype) for x in ts], lengths, length_dim, opts)


def _number_field(leaf, objs: list, opts: dict) -> _Field:
    kind = _BOOL
    for b, x in enumerate(objs):
        k = _num_kind(x)
        if k == _BAD:
            raise _mismatch(leaf.path, b, x, leaf.expected)
        kind = max(kind, k)
    if kind == _BOOL:
        return _Field(torch.tensor([bool(x) for x in objs], dtype=torch.bool))
    if kind == _INT:
        return _Field(torch.tensor([_int64(x, _subject(leaf.path, b) + " is") for b, x in enumerate(objs)], dtype=torch.int64))
    values = []
    for b, x in enumerate(objs):
        try:
            values.append(float(x))
        except OverflowError:
            raise ValueError(f"Collator: {_subject(leaf.path, b)} is an int too large for float64, the dtype of this "
                             "field because some sample holds a float there") from None
    return _Field(torch.tensor(values, dtype=torch.float64))


def _flatten(leaf, x: list, b: int, trailing: list, depth: int, at: list, out: list) -> int:
    """Appends the numbers of one nested list to ``out``; returns the widest kind seen."""
    kind = _BOOL
    if depth == len(trailing):
        for i, v in enumerate(x):
            k = _num_kind(v)
            if k == _BAD:
                if isinstance(v, list):
                    raise ValueError(f"Collator: {_subject(leaf.path, b)} is a ragged nested list: element "
                                     f"{''.join(f'[{j}]' for j in at + [i])} is a list, expected a number")
                raise TypeError(f"Collator: {_subject(leaf.path, b)} holds a {type(v).__name__} at "
                                f"{''.join(f'[{j}]' for j in at + [i])}; lists must hold only numbers (bool, int, float)")
            if k == _INT:
                v = _int64(v, f"{_subject(leaf.path, b)} holds at {''.join(f'[{j}]' for j in at + [i])}")
            else:  # Python's own bool and float, as the fused pass reads numpy scalars
                v = bool(v) if k == _BOOL else float(v)
            out.append(v)
            kind = max(kind, k)
        return kind
    want = trailing[depth]
    for i, v in enumerate(x):
        where = "".join(f"[{j}]" for j in at + [i])
        if not isinstance(v, list):
            raise ValueError(f"Collator: {_subject(leaf.path, b)} is a ragged nested list: element {where} is a "
                             f"{type(v).__name__}, expected a list of {want} elements")
        if len(v) != want:
            raise ValueError(f"Collator: {_subject(leaf.path, b)} is a ragged nested list: element {where} is a list of "
                             f"{len(v)} elements, expected a list of {want} elements")
        kind = max(kind, _flatten(leaf, v, b, trailing, depth + 1, at + [i], out))
    return kind


def _list_field(leaf, objs: list, opts: dict) -> _Field:
    for b, x in enumerate(objs):
        if not isinstance(x, list):
            raise _mismatch(leaf.path, b, x, leaf.expected)
    trailing = []
    first = next((x for x in objs if x), None)
    if first is not None:
        el = first[0]
        while isinstance(el, list) and el:
            trailing.append(len(el))
            el = el[0]
        if isinstance(el, list):
            trailing.append(0)
    kind, flat = _BOOL, []
    for b, x in enumerate(objs):
        items = []
        kind = max(kind, _flatten(leaf, x, b, trailing, 0, [], items))
        flat.append(items)
    if not any(flat):
        kind = _FLOAT  # no element at all: torch.tensor([]) is of the default float dtype
    dtype = {_BOOL: torch.bool, _INT: torch.int64, _FLOAT: opts["float_dtype"]}[kind]
    tensors = [torch.tensor(items, dtype=dtype).view(len(x), *trailing) for items, x in zip(flat, objs)]
    return _place(leaf, tensors, [len(x) for x in objs], True, opts)


def _object_field(leaf, objs: list, opts: dict) -> _Field:
    expected = leaf.object_type
    for b, x in enumerate(objs):
        if expected is not type(None) and x is not None and type(x) is not expected:
            raise _mismatch(leaf.path, b, x, leaf.expected)
    return _Field(list(objs))


_FIELDS = {_TENSOR: _tensor_field, _ARRAY: _tensor_field, _NUMBER: _number_field, _LIST: _list_field, _OBJECT: _object_field}


def _sample_digest(walk, sample, data_child: int) -> int:
    """The signed fingerprint of one raw sample under ``walk``: its data, without identity."""
    if data_child >= 0:
        return _fingerprint.signed(_fingerprint.digest(sample[data_child]))
    children = walk[5] if walk[0] == _MAP else walk[6]
    at = next(i for i, child in enumerate(children) if child[0] == _INDEX)
    return _fingerprint.without_index(sample, walk[4][at] if walk[0] == _MAP else walk[5][at])


def _collate_python(samples, walk, leaves, left, pad_to_multiple_of, packed, pin_memory, float_dtype, primary,
                    fingerprint=False, data_child=-1):
    """The fused pass in Python: same arguments and results as ``provcollate._C.collate``."""
    n = len(samples)
    if n == 0:
        raise ValueError("Collator: samples must be a non-empty list, got an empty one")
    items = [[None] * n for _ in leaves]
    index, view = [0] * n, [0] * n
    for b, s in enumerate(samples):
        _walk(walk, s, b, items, index, view)
    opts = {"left": left, "multiple": pad_to_multiple_of, "packed": packed, "float_dtype": float_dtype}
    with torch.no_grad():  # a batch never carries autograd history
        fields = [_FIELDS[leaf.kind](leaf, objs, opts) for leaf, objs in zip(leaves, items)]
    if primary < 0:
        primary = next((i for i, f in enumerate(fields) if f.lengths is not None), -1)
    pin = (lambda t: t.pin_memory()) if pin_memory else (lambda t: t)
    out = []
    for f in fields:
        value = pin(f.value) if isinstance(f.value, torch.Tensor) else f.value
        if f.lengths is None:
            out.append(_FieldOut(value, None, None, None))
        else:
            offsets = pin(f.offsets) if f.offsets is not None else None
            out.append(_FieldOut(value, pin(torch.tensor(f.lengths, dtype=torch.int64)), offsets, f.max_len))
    mask = None
    if primary >= 0 and not packed:
        mask = pin(reference.valid_mask(out[primary].lengths, fields[primary].max_len, left))
    fingerprints = None
    if fingerprint:
        fingerprints = pin(torch.tensor([_sample_digest(walk, s, data_child) for s in samples], dtype=torch.int64))
    return _Collated(pin(torch.tensor(index, dtype=torch.int64)), pin(torch.tensor(view, dtype=torch.int64)), out, primary,
                     mask, fingerprints)


# ---------------------------------------------------------------------------------------------
# Batch


def _map_objects(x, fn):
    """``x`` with every leaf inside dicts, lists, tuples and namedtuples replaced by ``fn(leaf)``."""
    if isinstance(x, dict):
        return {k: _map_objects(v, fn) for k, v in x.items()}
    if isinstance(x, list):
        return [_map_objects(v, fn) for v in x]
    if isinstance(x, tuple):
        parts = [_map_objects(v, fn) for v in x]
        return type(x)(*parts) if hasattr(type(x), "_fields") else tuple(parts)
    return fn(x)


def _map_tensors(x, fn):
    """``x`` with every tensor inside (dicts, lists, tuples, namedtuples) replaced by ``fn(tensor)``."""
    return _map_objects(x, lambda v: fn(v) if isinstance(v, torch.Tensor) else v)


def _replace(x, path: tuple, value):
    """A copy of ``x`` with the element at ``path`` (keys/positions) replaced by ``value``."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(x, dict):
        return {**x, head: _replace(x[head], rest, value)}
    parts = list(x)
    parts[head] = _replace(parts[head], rest, value)
    if isinstance(x, list):
        return parts
    return type(x)(*parts) if hasattr(type(x), "_fields") else tuple(parts)


# ---------------------------------------------------------------------------------------------
# Pickling a Batch: one buffer for all its tensors
#
# A DataLoader worker sends each batch to the main process by pickling it, and every tensor
# storage pickled costs a shared-memory segment of its own (create, map, send a descriptor,
# map again): about 0.1 ms each, more than a whole collate. So a Batch pickles its CPU tensors
# of up to 1 MiB as one byte buffer (allocated straight in shared memory inside a worker) and
# rebuilds them from it; larger tensors travel as themselves, since copying them outweighs a
# segment. The identity/length tensors and small data tensors come back as copies, so keeping
# ``batch.index`` alive never keeps a batch's data alive; other data tensors come back as views
# of the buffer, which saves copying them again.

_PACK_BYTES = 1 << 20  # tensors up to this size travel in the one buffer
_CLONE_BYTES = 1 << 16  # data tensors up to this size come back as copies, larger ones as views
_ALIGN = 64


class _Slot:
    """Where a packed tensor stood in a Batch's state."""

    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i

    def __reduce__(self):
        return (_Slot, (self.i,))


def _packable(t) -> bool:
    return (type(t) is torch.Tensor and t.device.type == "cpu" and t.layout == torch.strided and not t.requires_grad
            and not t.is_quantized and not t.is_conj() and not t.is_neg())


def _pack_state(state: dict):
    """``state`` with its CPU tensors replaced by slots, the byte buffer holding them, and their layout."""
    slots: dict = {}
    tensors: list = []
    layout: list = []  # (dtype, shape, byte offset, nbytes, keep as a view)
    total = 0

    def take(t, is_data: bool):
        nonlocal total
        if not _packable(t) or t.numel() * t.element_size() > _PACK_BYTES:
            return t
        slot = slots.get(id(t))
        if slot is None:
            slot = slots[id(t)] = _Slot(len(tensors))
            nbytes = t.numel() * t.element_size()
            tensors.append(t)
            layout.append((t.dtype, tuple(t.shape), total, nbytes, is_data and nbytes > _CLONE_BYTES))
            total += -(-nbytes // _ALIGN) * _ALIGN
        return slot

    packed = {key: _map_tensors(value, lambda t, d=(key == "data"): take(t, d)) for key, value in state.items()}
    if torch.utils.data.get_worker_info() is not None:  # on its way to the main process: no copy to share it
        buffer = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(total))
    else:
        buffer = torch.empty(total, dtype=torch.uint8)
    for t, (dtype, shape, offset, nbytes, _) in zip(tensors, layout):
        buffer[offset:offset + nbytes].view(dtype).view(shape).copy_(t)
    return packed, buffer, layout


def _rebuild_batch(buffer: torch.Tensor, layout: list, state: dict) -> "Batch":
    tensors = []
    for dtype, shape, offset, nbytes, as_view in layout:
        t = buffer[offset:offset + nbytes].view(dtype).view(shape)
        tensors.append(t if as_view else t.clone())
    unslot = lambda x: tensors[x.i] if isinstance(x, _Slot) else x
    batch = Batch.__new__(Batch)
    batch.__dict__.update({key: _map_objects(value, unslot) for key, value in state.items()})
    return batch


class Batch:
    """A collated batch that knows which dataset item each of its rows is.

    ``len(batch)`` is the number of rows B. A batch whose data is a dict is a read-only mapping
    of its fields: ``batch["input_ids"]``, ``keys()``, ``values()``, ``items()``, ``get()``,
    ``"labels" in batch`` and ``model(**batch)``; a tuple-data batch unpacks like its data
    (``x, y = batch``). Iteration yields fields, never rows (see :meth:`__iter__`).

    Attributes:
        index: LongTensor [B], the dataset index of each row.
        view: LongTensor [B], the view id of each row (zeros without views).
        data: the samples' data collated, with the structure of one sample's data.
        lengths: LongTensor [B], lengths of the primary sequence field, or None without one.
        field_lengths: {field path: LongTensor [B]} for every padded (or packed) field.
        mask: BoolTensor [B, max_len], True on real positions of the primary field (None if packed).
        max_len: int, the padded length T of the primary field (known on the host), or None.
        offsets: LongTensor [B+1] of the primary field's rows in its packed values (packed only).
        field_offsets: {field path: LongTensor [B+1]} for every packed field (packed only, else {}).
        padding_side: "right" or "left".
        host_index, host_lengths, host_view: CPU copies of index, lengths and view that stay on the
            host through ``to()``, so consumers know every size without reading a device back.
        key: None when the samples carry no key (``Indexed(..., key=...)``); else each row's own
            key: a LongTensor [B] when every key is an int, a list of B keys otherwise. It stays
            on the host through ``to()`` and ``pin_memory()``.
        fingerprint: LongTensor [B], the fingerprint of each row's data as the Collator received it
            (:func:`provcollate.fingerprint`), or None with ``Collator(fingerprint=False)``. It stays
            on the host through ``to()``, like ``host_index``.
        primary: the primary sequence field's path (None without one).
        position_ids, cu_seqlens: packed only: LongTensor [total], each row's position in its
            sequence (0 at each start), and ``offsets`` as int32 [B+1]; made with the batch on the
            host and moved with it, for :meth:`model_inputs`.
    """

    def __init__(self, *, index, view, data, lengths=None, field_lengths=None, mask=None, max_len=None,
                 offsets=None, field_offsets=None, padding_side="right", host_index=None, host_lengths=None,
                 packed_fields=None, host_view=None, key=None, primary=None, position_ids=None, cu_seqlens=None,
                 fingerprint=None) -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"Batch: padding_side must be 'right' or 'left', got {padding_side!r}")
        self.index = index
        self.view = view
        self.data = data
        self.lengths = lengths
        self.field_lengths = field_lengths if field_lengths is not None else {}
        self.mask = mask
        self.max_len = max_len
        self.offsets = offsets
        self.field_offsets = field_offsets if field_offsets is not None else {}
        self.padding_side = padding_side
        self.host_index = host_index if host_index is not None else index
        self.host_lengths = host_lengths if host_lengths is not None else lengths
        self.host_view = host_view if host_view is not None else view
        self.key = key
        self.fingerprint = fingerprint
        self.primary = primary
        self.position_ids = position_ids
        self.cu_seqlens = cu_seqlens
        # field path -> (keys/positions in data, pad value, padded length): what padded() needs.
        self._packed = packed_fields if packed_fields is not None else {}

    def __len__(self) -> int:
        return self.host_index.shape[0]

    def __getitem__(self, key):
        """``batch["input_ids"]`` or ``batch[0]``: an item of ``batch.data``."""
        return self.data[key]

    def _fields(self, method: str) -> dict:
        if not isinstance(self.data, dict):
            raise TypeError(f"Batch.{method}: needs a batch whose data is a dict of fields, got data of type {type(self.data).__name__}")
        return self.data

    def keys(self):
        """The field names of a dict-data batch: what ``model(**batch)`` and ``dict(batch)`` pass on."""
        return self._fields("keys").keys()

    def values(self):
        """The collated fields of a dict-data batch, in ``keys()`` order."""
        return self._fields("values").values()

    def items(self):
        """``(name, field)`` pairs of a dict-data batch."""
        return self._fields("items").items()

    def get(self, key, default=None):
        """``batch.data[key]`` of a dict-data batch, or ``default`` when it has no such field."""
        return self._fields("get").get(key, default)

    def __contains__(self, key) -> bool:
        """``"labels" in batch``: whether a dict-data batch has that field (False for other data)."""
        return isinstance(self.data, dict) and key in self.data

    def __iter__(self):
        """The batch's fields, never its rows: a tuple's elements (``x, y = batch``), a dict's values
        (in ``keys()`` order), otherwise the data itself as the one field (``x, = batch``).

        A Batch is deliberately not a ``collections.abc.Mapping``: transformers' Trainer and
        accelerate rebuild Mappings as ``type(m)({...})``, which would drop the identity; they move
        a Batch with :meth:`to` instead. Iterating fields (not keys) lets Lightning infer the batch
        size from the first field, as it does for a tuple or a dict. Rows come from ``len(batch)``
        and ``batch.index``.
        """
        if isinstance(self.data, tuple):
            return iter(self.data)
        if isinstance(self.data, dict):
            return iter(self.data.values())
        return iter((self.data,))

    def _map(self, fn) -> "Batch":
        opt = lambda t: fn(t) if t is not None else None
        return Batch(
            index=fn(self.index), view=fn(self.view), data=_map_tensors(self.data, fn), lengths=opt(self.lengths),
            field_lengths={k: fn(v) for k, v in self.field_lengths.items()}, mask=opt(self.mask),
            max_len=self.max_len, offsets=opt(self.offsets),
            field_offsets={k: fn(v) for k, v in self.field_offsets.items()}, padding_side=self.padding_side,
            host_index=self.host_index, host_lengths=self.host_lengths, packed_fields=self._packed,
            host_view=self.host_view, key=self.key, primary=self.primary, position_ids=opt(self.position_ids),
            cu_seqlens=opt(self.cu_seqlens), fingerprint=self.fingerprint,
        )

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """A new Batch with every tensor on ``device``; ``host_index``, ``host_lengths`` and ``host_view`` stay on the CPU."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """A new Batch with every tensor in pinned memory (what ``DataLoader(pin_memory=True)`` calls)."""
        return self._map(lambda t: t.pin_memory())

    def padded(self) -> "Batch":
        """The padded form of a packed batch, padded by ``provcollate.ops.pad`` on the batch's device.

        Each packed field becomes ``[B, T, ...]`` with its pad value; ``mask`` is rebuilt from
        ``lengths``. No device value is read back: every size is known on the host. A batch that is
        not packed is returned as is.
        """
        if not self._packed:
            return self
        left = self.padding_side == "left"
        data = self.data
        for name, (path, pad_value, max_len) in self._packed.items():
            field = data
            for k in path:
                field = field[k]
            pad = _pad_for(name, pad_value, field.dtype)
            data = _replace(data, path, ops.pad(field, self.field_offsets[name], max_len, pad, left))
        mask = reference.valid_mask(self.lengths, self.max_len, left) if self.lengths is not None else None
        return Batch(
            index=self.index, view=self.view, data=data, lengths=self.lengths, field_lengths=self.field_lengths,
            mask=mask, max_len=self.max_len, padding_side=self.padding_side, host_index=self.host_index,
            host_lengths=self.host_lengths, host_view=self.host_view, key=self.key, primary=self.primary,
        )

    def model_inputs(self) -> dict:
        """The batch as a transformers model takes it, without reading anything back from a device.

        Packed (``Collator(packed=True)``): the primary field as ``input_ids`` ``[1, total]``,
        ``position_ids`` ``[1, total]`` (int64, restarting at 0 per sequence: the padding-free
        path of decoders with ``use_cache=False`` and of encoders whose attention builds its
        masks from them), ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32 ``[B+1]``, the offsets:
        flash-attention's varlen path) and ``max_length_q`` / ``max_length_k`` (Python ints, the
        longest sequence), and every other packed field as ``[1, total, ...]`` under its name.
        Padded: every padded field under its name, and ``attention_mask`` (the batch's mask as
        int64, unless a field of that name is there). Tensors are on the batch's device; the
        sizes come from the host, so calling it never syncs.
        """
        if isinstance(self.data, tuple):
            raise TypeError("Batch.model_inputs: needs a batch whose data is a dict of fields or one tensor (keyword "
                            "arguments need names), got a tuple")
        if self.offsets is None:
            if isinstance(self.data, dict):
                inputs = {name: value for name, value in self.data.items() if name in self.field_lengths}
            else:
                inputs = {"input_ids": self.data}
            if "attention_mask" not in inputs and self.mask is not None:
                inputs["attention_mask"] = self.mask.long()
            return inputs
        if self.position_ids is None:
            raise ValueError("Batch.model_inputs: this packed batch has no position_ids (it was not made by "
                             "provcollate.Collator(packed=True)); collate it with one")
        inputs = {}
        for name, (path, _, _) in self._packed.items():
            value = self.data
            for k in path:
                value = value[k]
            inputs["input_ids" if name == self.primary else name] = value.unsqueeze(0)
        inputs["position_ids"] = self.position_ids.unsqueeze(0)
        inputs["cu_seq_lens_q"] = inputs["cu_seq_lens_k"] = self.cu_seqlens
        inputs["max_length_q"] = inputs["max_length_k"] = self.max_len
        return inputs

    def __reduce__(self):
        """Pickles every CPU tensor of the batch as one buffer: one shared-memory segment per batch
        from a DataLoader worker instead of one per tensor (see ``_pack_state``)."""
        state, buffer, layout = _pack_state(self.__dict__)
        return (_rebuild_batch, (buffer, layout, state))

    def __copy__(self) -> "Batch":
        """A shallow copy: the same tensors (pickling and deepcopy copy them)."""
        new = Batch.__new__(Batch)
        new.__dict__.update(self.__dict__)
        return new

    def __repr__(self) -> str:
        def describe(x):
            if isinstance(x, torch.Tensor):
                return f"Tensor{list(x.shape)} {str(x.dtype).removeprefix('torch.')}"
            if isinstance(x, dict):
                return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in x.items()) + "}"
            if isinstance(x, tuple):
                return "(" + ", ".join(describe(v) for v in x) + ("," if len(x) == 1 else "") + ")"
            return f"list[{len(x)}]" if isinstance(x, list) else type(x).__name__

        packed = ", packed" if self._packed else ""
        return f"Batch(size={len(self)}, data={describe(self.data)}, max_len={self.max_len}{packed})"


# ---------------------------------------------------------------------------------------------
# Collator


def _packed_positions(offsets: torch.Tensor, lengths: torch.Tensor, pin: bool):
    """(position_ids [total], restarting at 0 per sequence; cu_seqlens int32 [B+1]) of a packed
    batch, made on the host with it, so that a model's packed inputs never come from a device."""
    total = int(offsets[-1])
    position_ids = torch.arange(total) - torch.repeat_interleave(offsets[:-1], lengths, output_size=total)
    cu_seqlens = offsets.to(torch.int32)
    if pin:
        position_ids, cu_seqlens = position_ids.pin_memory(), cu_seqlens.pin_memory()
    return position_ids, cu_seqlens


def _keys_of(samples: list):
    """``batch.key`` of Samples that carry keys: None when sample 0 has none; then none may have one."""
    if type(samples[0]) is not Sample:
        return None
    keyed = len(samples[0]) == 4
    for b, s in enumerate(samples):
        if type(s) is Sample and (len(s) == 4) != keyed:
            raise TypeError(f"Collator: sample {b} {'has no key' if keyed else 'has a key'} but sample 0 "
                            f"{'has one' if keyed else 'has none'}; one batch's samples all carry keys or none do")
    return batch_keys("Collator", [s[3] for s in samples]) if keyed else None


def _check_number(name: str, value) -> None:
    if not isinstance(value, (bool, int, float)):
        raise TypeError(f"Collator: {name} must be a number (bool, int or float), got {type(value).__name__}")
    if isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"Collator: {name} must fit in int64, got {value}")


def _field_name(arg: str, key) -> str:
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TypeError(f"Collator: {arg} must name a field by its path (a str, or an int position), got {type(key).__name__}")
    return str(key)


class Collator:
    """A picklable ``collate_fn`` that pads a batch and keeps each example's identity.

    Samples are ``provcollate.Sample`` (from ``provcollate.Indexed``), or raw samples that hold their
    index at position/key ``index`` (``Collator(index=2)`` for datasets returning ``(x, y, idx)``;
    that field is dropped from ``batch.data``). Their data may nest tuples, lists and dicts of:

    * tensors and numpy arrays with a leading dim: padded along it to ``[B, T, ...]``
      (``pad_value``, per-field ``pad_values``, ``padding_side``, ``pad_to_multiple_of``);
      dims after the first must agree. 0-d ones are stacked to ``[B]``.
    * lists of numbers, nested to any depth (as tokenizers return them): padded like tensors, of dtype bool, int64 or the default float dtype (torch.tensor's rule).
    * numbers: a tensor [B] of dtype bool, int64 or float64 (default_collate's rule).
    * strings and other objects: a list of the samples' values.

    Fields are named by their path in the data: ``"input_ids"``, ``"0"``, ``"inputs.ids"``; two
    fields with one path (``{"a.b": x, "a": {"b": y}}``, keys ``0`` and ``"0"``) raise ValueError.

    Which fields are sequences is decided by the samples' types and ranks and these arguments,
    never by the lengths one batch holds, so every batch of a loader has the same schema (the last,
    short batch and a batch of one included): every tensor or array with a leading dim and every
    list of numbers is a *sequence field*, padded along its first dim (or packed), with its lengths
    in ``batch.field_lengths``; items of equal length padded are the same data as stacked (seed
    scenario 1's feature rows ``[10]`` come out ``[B, 10]``). Fields named by ``stack`` are stacked
    instead (their items must agree in shape; use it for fixed-size inputs such as images when
    ``packed`` or ``pad_to_multiple_of`` is on). ``batch.lengths``, ``batch.mask`` and
    ``batch.max_len`` describe the *primary* field: ``primary``, or else the first sequence field of
    sample 0; they are None only when there is no sequence field at all.

    Args:
        pad_value: fill of padded positions.
        pad_values: {field path: pad value} overriding ``pad_value`` per field (e.g. ``{"labels": -100}``).
        padding_side: "right" or "left".
        pad_to_multiple_of: round every padded length T up to a multiple of this.
        packed: sequence fields come as values ``[sum(L), ...]`` with ``batch.offsets`` ([B+1],
            flash-attention's cu_seqlens) instead of padded; ``batch.padded()`` pads them later.
        index: position/key of the index in raw samples; None for ``provcollate.Sample``.
        primary: path of the primary sequence field.
        pin_memory: write every output straight into pinned memory (needs an accelerator). With
            DataLoader workers use ``DataLoader(pin_memory=True)`` instead, which pins in the main process.
        stack: field paths to stack rather than pad: no lengths, never packed or rounded up.
        fingerprint: compute ``batch.fingerprint``, a 64-bit hash of each example's data, in the
            same pass (:func:`provcollate.fingerprint` gives it for one example); False leaves it None.

    Every output is new memory (no tensor of the samples is shared) and carries no autograd history.
    Bad input raises TypeError/ValueError naming the field path and the sample's position in the batch.
    """

    def __init__(self, pad_value=0, pad_values=None, padding_side: str = "right", pad_to_multiple_of=None,
                 packed: bool = False, index=None, primary=None, pin_memory: bool = False, stack=None,
                 fingerprint: bool = True) -> None:
        _check_number("pad_value", pad_value)
        if pad_values is None:
            pad_values = {}
        if not isinstance(pad_values, collections.abc.Mapping):
            raise TypeError(f"Collator: pad_values must be a dict {{field path: pad value}}, got {type(pad_values).__name__}")
        self.pad_values = {}
        for key, value in pad_values.items():
            _check_number(f"pad_values[{key!r}]", value)
            self.pad_values[_field_name("pad_values", key)] = value
        if padding_side not in ("right", "left"):
            raise ValueError(f"Collator: padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None and (
            isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int)
        ):
            raise TypeError(f"Collator: pad_to_multiple_of must be None or an int, got {type(pad_to_multiple_of).__name__}")
        if pad_to_multiple_of is not None and not 1 <= pad_to_multiple_of <= _MAX_MULTIPLE:
            raise ValueError(
                f"Collator: pad_to_multiple_of must be in [1, {_MAX_MULTIPLE}] (2**20: every padded field is "
                f"at least that long), got {pad_to_multiple_of}"
            )
        if stack is None:
            stack = ()
        if isinstance(stack, str) or not isinstance(stack, collections.abc.Iterable):
            raise TypeError(f"Collator: stack must be a list of field paths, got {type(stack).__name__}")
        self.stack = tuple(_field_name("stack", key) for key in stack)
        for name, flag in (("packed", packed), ("pin_memory", pin_memory), ("fingerprint", fingerprint)):
            if not isinstance(flag, bool):
                raise TypeError(f"Collator: {name} must be a bool, got {type(flag).__name__}")
        if index is not None and (isinstance(index, bool) or not isinstance(index, (int, str))):
            raise TypeError(f"Collator: index must be None, an int position or a str key, got {type(index).__name__}")
        if pin_memory and not torch.accelerator.is_available():
            raise ValueError("Collator: pin_memory=True needs an accelerator (CUDA, XPU, ...) and none is available")
        self.pad_value = pad_value
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.packed = packed
        self.index = index
        self.primary = None if primary is None else _field_name("primary", primary)
        self.pin_memory = pin_memory
        self.fingerprint = fingerprint

    def __call__(self, samples) -> Batch:
        """Collate a list of samples (what a DataLoader passes to its ``collate_fn``) into a :class:`Batch`."""
        if not isinstance(samples, (list, tuple)):
            raise TypeError(f"Collator: samples must be a list of samples, got {type(samples).__name__}")
        if not samples:
            raise ValueError("Collator: samples must be a non-empty list, got an empty one")
        samples = list(samples)
        key = _keys_of(samples)
        plan = _Plan(self, samples[0])
        collate = _native if _native is not None else _collate_python
        left = self.padding_side == "left"
        out = _Collated(*collate(
            samples, plan.walk, tuple(plan.leaves), left, self.pad_to_multiple_of or 0, self.packed,
            self.pin_memory, torch.get_default_dtype(), plan.primary, self.fingerprint, plan.data_child,
        ))
        fields = [_FieldOut(*f) for f in out.fields]
        data = plan.assemble([f.value for f in fields])
        names = [leaf.path for leaf in plan.leaves]
        field_lengths = {names[i]: f.lengths for i, f in enumerate(fields) if f.lengths is not None}
        packed = {}
        field_offsets = {}
        if self.packed:
            for i, f in enumerate(fields):
                if f.offsets is not None:
                    field_offsets[names[i]] = f.offsets
                    packed[names[i]] = (plan.paths[i], plan.leaves[i].pad_value, f.max_len)
        primary = fields[out.primary] if out.primary >= 0 else None
        position_ids = cu_seqlens = None
        if self.packed and primary is not None and primary.offsets is not None:
            position_ids, cu_seqlens = _packed_positions(primary.offsets, primary.lengths, self.pin_memory)
        return Batch(
            index=out.index, view=out.view, data=data, lengths=None if primary is None else primary.lengths,
            field_lengths=field_lengths, mask=out.mask, max_len=None if primary is None else primary.max_len,
            offsets=None if primary is None else primary.offsets, field_offsets=field_offsets,
            padding_side=self.padding_side, packed_fields=packed, key=key,
            primary=None if primary is None else names[out.primary], position_ids=position_ids, cu_seqlens=cu_seqlens,
            fingerprint=out.fingerprint,
        )

    def __repr__(self) -> str:
        args = [f"pad_value={self.pad_value!r}"]
        for name in ("pad_values", "pad_to_multiple_of", "index", "primary", "stack"):
            if getattr(self, name):
                args.append(f"{name}={getattr(self, name)!r}")
        if self.padding_side != "right":
            args.append(f"padding_side={self.padding_side!r}")
        args += [f"{name}=True" for name in ("packed", "pin_memory") if getattr(self, name)]
        if not self.fingerprint:
            args.append("fingerprint=False")
        return f"Collator({', '.join(args)})"
