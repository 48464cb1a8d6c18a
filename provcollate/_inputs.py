"""What ``Recorder.add`` and ``Recorder.done`` are given, checked once at the edge.

:func:`identify` turns a Batch or a plain index (with ``lengths=``, ``offsets=``, ``view=``,
``padding_side=``) into host arrays (:class:`provcollate.store.Identity`), once for the compiled
pass and the general path alike; :func:`checked` checks its values for the general path;
:func:`batch_outputs` turns the outputs into checked :class:`provcollate.store.Output` records,
reduced as the Recorder says, and compares them with the outputs the first add fixed. None of
them changes any state: an add whose arguments pass them can only be refused by the duplicate
policy.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ._keys import check_key
from .dataset import Sample
from .store import SINGLE, Identity, Output, Spec

__all__ = ["host_long", "index_arrays", "looks_like_keys", "identify", "checked", "check_views", "batch_outputs", "parse_reduce", "view_ids"]


def host_long(owner: str, name: str, value) -> np.ndarray:
    """``value`` (tensor, ndarray or sequence of ints) as a 1-D int64 numpy array on the host."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.int64 and value.is_cpu and value.dim() == 1 and value.layout == torch.strided:
            return value.numpy()
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{owner}: {name} must hold integers, got a tensor of dtype {value.dtype}")
        if value.layout != torch.strided or value.is_meta:
            raise TypeError(f"{owner}: {name} must be a dense tensor with data, got layout {value.layout} on {value.device}")
        if not value.is_cpu:
            value = value.cpu()  # the caller chose a device tensor: this one copy waits for it
        value = value.numpy()
    elif not isinstance(value, np.ndarray):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
            raise TypeError(f"{owner}: {name} must be a 1-D integer tensor, array or sequence, got {type(value).__name__}")
        value = np.asarray(value) if len(value) else np.zeros(0, np.int64)
    if value.dtype.kind not in "iu":
        raise TypeError(f"{owner}: {name} must hold integers, got dtype {value.dtype}")
    if value.ndim != 1:
        raise ValueError(f"{owner}: {name} must be 1-D, got shape {tuple(value.shape)}")
    if value.dtype == np.uint64 and len(value) and value.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{owner}: {name} holds {value.max()}, past the int64 range")
    return value.astype(np.int64, copy=False)


def index_arrays(owner: str, name: str, value) -> Tuple[Optional[torch.Tensor], np.ndarray]:
    """(the tensor itself when it already is a 1-D int64 CPU tensor, else None; its int64 numpy view)."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.int64 and value.is_cpu and value.dim() == 1 and value.layout == torch.strided:
        return value, value.numpy()
    return None, host_long(owner, name, value)


def view_ids(owner: str, view, n: int) -> Optional[np.ndarray]:
    """``view`` (None, one int, or one per item) as int64 ``[n]`` or None."""
    if view is None:
        return None
    if isinstance(view, (int, np.integer)) and not isinstance(view, bool):
        return np.full(n, view, np.int64)
    return host_long(owner, "view", view)


def _check_lengths(owner: str, name: str, lengths: np.ndarray, n: int) -> None:
    if len(lengths) != n:
        raise ValueError(f"{owner}: {name} must have one entry per index ({n}), got {len(lengths)}")


def looks_like_keys(value) -> bool:
    """A list or tuple of str, bytes or tuples: keys, not dataset indices."""
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], (str, bytes, tuple))


def identify(owner: str, batch, lengths=None, view=None, padding_side: Optional[str] = None, offsets=None,
             int_keys: bool = False, fingerprint=None) -> Identity:
    """The identity of ``batch`` (a Batch, a plain index with its keyword arguments, or plain
    keys): its structure checked (types, dtypes, sizes that agree); :func:`checked` checks the
    values. A list of str, bytes or tuples is keys; ``int_keys`` makes int indices keys too (a
    Recorder that files by key). Keyed rows' ``index`` holds their positions in the batch."""
    if isinstance(batch, Sample) or (isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Sample)):
        got = "a Sample of collated fields" if isinstance(batch, Sample) else type(batch).__name__ + " of Samples"
        raise TypeError(f"{owner}: batch must be a pc.Collator batch or an index tensor [B], got {got}: "
                        "the DataLoader used its default collate; pass DataLoader(..., collate_fn=pc.Collator(...))")
    keys = None
    if looks_like_keys(batch):
        kinds = set(map(type, batch))
        # All str or all bytes: keys as they are; anything else is checked key by key (and named).
        keys = list(batch) if kinds == {str} or kinds == {bytes} else [check_key(owner, k, f"key {b}") for b, k in enumerate(batch)]
        batch = np.arange(len(keys), dtype=np.int64)
    if isinstance(batch, (torch.Tensor, np.ndarray, list, tuple, range)):
        index_t, index = index_arrays(owner, "keys" if int_keys else "index", batch)
        if int_keys and keys is None:
            keys, index_t, index = index, None, np.arange(len(index), dtype=np.int64)
        item_lengths = None
        if lengths is not None:
            item_lengths = host_long(owner, "lengths", lengths)
            _check_lengths(owner, "lengths", item_lengths, len(index))
        if offsets is not None:
            item_lengths = _offsets_lengths(owner, offsets, item_lengths, len(index))
        if padding_side not in (None, "right", "left"):
            raise ValueError(f"{owner}: padding_side must be 'right' or 'left', got {padding_side!r}")
        views = view_ids(owner, view, len(index))
        if views is not None and len(views) != len(index):
            raise ValueError(f"{owner}: view must have one entry per index ({len(index)}), got {len(views)}")
        prints = None
        if fingerprint is not None:
            prints = host_long(owner, "fingerprint", fingerprint)
            if len(prints) != len(index):
                raise ValueError(f"{owner}: fingerprint must have one entry per index ({len(index)}), got {len(prints)}")
        return Identity(index_t, index, views, item_lengths, padding_side == "left", None, offsets is not None, keys, prints)
    if hasattr(batch, "host_index"):
        for name, value in (("lengths", lengths), ("view", view), ("padding_side", padding_side), ("offsets", offsets),
                            ("fingerprint", fingerprint)):
            if value is not None:
                raise TypeError(f"{owner}: {name}= is only for a plain index; a Batch carries its own, got {name}={value!r}")
        index_t, index = index_arrays(owner, "batch.host_index", batch.host_index)
        item_lengths = None if batch.host_lengths is None else host_long(owner, "batch.host_lengths", batch.host_lengths)
        if item_lengths is not None:
            _check_lengths(owner, "batch.host_lengths", item_lengths, len(index))
        # A Collator batch keeps its view ids on the host too; batch.view may sit on a GPU.
        host_view = getattr(batch, "host_view", None)
        views = host_long(owner, "batch.view", batch.view if host_view is None else host_view)
        if len(views) != len(index):
            raise ValueError(f"{owner}: the batch has {len(index)} indices but {len(views)} view ids")
        keys = getattr(batch, "key", None)
        if keys is not None:
            if isinstance(keys, torch.Tensor):
                keys = host_long(owner, "batch.key", keys)
            elif isinstance(keys, list):
                kinds = set(map(type, keys))
                if not (kinds == {str} or kinds == {bytes}):
                    keys = [check_key(owner, k, f"batch.key[{b}]") for b, k in enumerate(keys)]
            else:
                raise TypeError(f"{owner}: batch.key must be None, a LongTensor or a list of keys, got {type(keys).__name__}")
            if len(keys) != len(index):
                raise ValueError(f"{owner}: the batch has {len(index)} indices but {len(keys)} keys")
        prints = getattr(batch, "fingerprint", None)
        if prints is not None:
            prints = host_long(owner, "batch.fingerprint", prints)
            if len(prints) != len(index):
                raise ValueError(f"{owner}: the batch has {len(index)} indices but {len(prints)} fingerprints")
        return Identity(index_t, index, views, item_lengths, batch.padding_side == "left", getattr(batch, "max_len", None),
                        getattr(batch, "offsets", None) is not None, keys, prints)
    raise TypeError(f"{owner}: batch must be a provcollate.Batch or an index tensor [B], got {type(batch).__name__}")


def _offsets_lengths(owner: str, offsets, lengths: Optional[np.ndarray], n: int) -> np.ndarray:
    """The lengths that ``offsets`` [n+1] give (checked against ``lengths`` when both are given)."""
    offs = host_long(owner, "offsets", offsets)
    if len(offs) != n + 1 or (len(offs) and offs[0] != 0):
        raise ValueError(f"{owner}: offsets must be [B+1] = [{n + 1}] starting at 0, got {len(offs)} entries"
                         + (f" starting at {offs[0]}" if len(offs) else ""))
    from_offsets = np.diff(offs)
    if len(from_offsets) and from_offsets.min() < 0:
        b = int(np.argmin(from_offsets))
        raise ValueError(f"{owner}: offsets must not decrease, got offsets[{b}] = {offs[b]} > offsets[{b + 1}] = {offs[b + 1]}")
    if lengths is not None and not np.array_equal(lengths, from_offsets):
        raise ValueError(f"{owner}: lengths and offsets disagree (lengths {lengths.tolist()[:8]}..., offsets give "
                         f"{from_offsets.tolist()[:8]}...); pass one of them")
    return from_offsets


def checked(owner: str, ids: Identity) -> Identity:
    """``ids`` with its values checked (lengths >= 0 and within ``max_len``, views >= 0) and its
    views None when every one is 0. The compiled pass checks the same values itself and hands
    back a batch that fails them, so that these messages are the only ones."""
    lengths, views = ids.lengths, ids.views
    if lengths is not None and len(lengths):
        if lengths.min() < 0:
            name = "lengths" if ids.max_len is None else "batch.host_lengths"
            raise ValueError(f"{owner}: {name} must be >= 0, got {name}[{int(np.argmin(lengths))}] = {lengths.min()}")
        if ids.max_len is not None and lengths.max() > ids.max_len:
            raise ValueError(f"{owner}: the batch's lengths reach {lengths.max()}, past its max_len {ids.max_len}")
    if views is not None:
        check_views(owner, views)
        if not np.count_nonzero(views):
            return ids._replace(views=None)
    return ids


def check_views(owner: str, views: np.ndarray) -> None:
    if len(views) and views.min() < 0:
        raise ValueError(f"{owner}: view ids must be >= 0, got view {views.min()} at position {int(np.argmin(views))}")


def parse_reduce(reduce):
    """``reduce=`` of the Recorder as (kind, k) or None."""
    if reduce is None:
        return None
    if not isinstance(reduce, str):
        raise TypeError(f"Recorder: reduce must be None or a str ('argmax', 'softmax', 'topk:K'), got {type(reduce).__name__}")
    if reduce in ("argmax", "softmax"):
        return reduce, None
    k = reduce[5:] if reduce.startswith("topk:") else ""
    if k.isdigit() and int(k) >= 1:
        return "topk", int(k)
    raise ValueError(f"Recorder: reduce must be None, 'argmax', 'softmax' or 'topk:K' with K >= 1, got {reduce!r}")


def _check_tensor(what: str, t: torch.Tensor) -> None:
    """Outputs must be dense tensors with data: the errors a copy would raise after slots were taken."""
    if t.is_nested:
        raise TypeError(f"{what} is a nested tensor; nested outputs are per token only (per_token=True) and must use layout=torch.jagged")
    if t.layout != torch.strided:
        raise TypeError(f"{what} has layout {t.layout}; outputs must be dense tensors (call .to_dense() first)")
    if t.is_meta:
        raise TypeError(f"{what} is on the meta device and holds no data")
    if t.is_quantized:
        raise TypeError(f"{what} is quantized ({t.dtype}); call .dequantize() first")
    if str(t.dtype).startswith("torch.bits"):
        raise TypeError(f"{what} has dtype {t.dtype}, which holds no numbers to record")


def _ragged_dim(t: torch.Tensor) -> int:
    """The dimension of a nested jagged tensor whose size varies per item."""
    ragged = getattr(t, "_ragged_idx", None)
    if ragged is not None:
        return int(ragged)
    return next(d for d in range(1, t.dim()) if not isinstance(t.size(d), int))


def _per_token_rows(what: str, t: torch.Tensor, slots: Identity) -> Output:
    """A per-token output as padded ``[B, T, ...]`` or as rows ``[total, ...]``, checked against the batch."""
    n = len(slots.index)
    lengths = slots.lengths
    if t.is_nested:
        if t.layout != torch.jagged:
            raise TypeError(f"{what} is a nested tensor of layout {t.layout}; per-token nested outputs must use layout=torch.jagged")
        ragged = _ragged_dim(t)
        if ragged != 1:
            shape = ", ".join("j" if d == ragged else str(t.size(d)) for d in range(t.dim()))
            raise ValueError(f"{what} is a nested jagged tensor [{shape}] whose ragged dimension is dim {ragged}; per-token rows "
                             f"run along dim 1 (one row per position): pass it as .transpose(1, {ragged}) to record its "
                             f"positions, or per_token=False")
        if t.size(0) != n:
            raise ValueError(f"{what} has {t.size(0)} rows but the batch has {n} items")
        if lengths is None:
            raise ValueError(f"{what} is per token but the batch has no lengths (pass lengths= or offsets= with a plain index)")
        _check_tensor(f"{what}.values()", t.values())
        if t.offsets().is_cpu:
            own = (t.lengths() if t.lengths() is not None else t.offsets().diff()).numpy()
            if not np.array_equal(own, lengths):
                b = int(np.flatnonzero(own != lengths)[0]) if len(own) == len(lengths) else 0
                raise ValueError(f"{what} has items of lengths {own.tolist()[:8]}{'...' if len(own) > 8 else ''} but the batch's "
                                 f"lengths are {lengths.tolist()[:8]}{'...' if len(lengths) > 8 else ''} (first difference at item {b})")
        if not t.is_contiguous():
            # A view whose items lie apart inside a larger buffer (torch.nested.narrow of a padded
            # output): values() is that whole buffer, so the items' own rows are taken out first.
            t = t.contiguous()
        values = t.values()
        total = int(lengths.sum())
        if values.shape[0] != total:
            raise ValueError(f"{what} holds {values.shape[0]} rows in all, but the batch's lengths add up to {total}")
        return Output(values, True, jagged=True)
    _check_tensor(what, t)
    if lengths is None:
        raise ValueError(f"{what} is per token but the batch has no lengths (pass lengths= or offsets= with a plain index)")
    longest = int(lengths.max()) if n else 0
    total = int(lengths.sum())
    if t.dim() >= 2 and t.shape[0] == n and (t.shape[1] == slots.max_len if slots.max_len is not None else t.shape[1] >= longest):
        return Output(t, True)
    if slots.jagged:
        if t.dim() >= 2 and t.shape[0] == 1 and t.shape[1] == total:
            return Output(t[0], True, jagged=True)
        if t.dim() >= 1 and t.shape[0] == total:
            return Output(t, True, jagged=True)
        padded = f"[B={n}, T, ...]" if slots.max_len is None else f"[B={n}, max_len={slots.max_len}, ...]"
        raise ValueError(f"{what} has shape {tuple(t.shape)}; per-token outputs of a packed batch are rows [total={total}, ...] "
                         f"or [1, {total}, ...] in its offsets order, or padded {padded}")
    if t.dim() < 2:
        raise ValueError(f"{what} must be [B, T, ...] per token, got shape {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"{what} has {t.shape[0]} rows but the batch has {n} items")
    if slots.max_len is not None:
        raise ValueError(f"{what} has {t.shape[1]} positions but the batch's max_len is {slots.max_len}: per-token outputs are "
                         f"[B, max_len, ...]; if it holds one row per item (class logits [B, C], say), pass per_token=False")
    raise ValueError(f"{what} has {t.shape[1]} positions, shorter than the batch's longest item ({longest})")


def _reduced(reduce, reduce_text: str, key: str, out: Output, single: bool) -> Dict[str, Output]:
    what = "outputs" if single else f"outputs[{key!r}]"
    t = out.tensor
    if not t.is_floating_point():
        return {key: out}
    kind, k = reduce
    lead = 1 if out.jagged or not out.per_token else 2
    if t.dim() < 1 + lead:
        raise ValueError(f"Recorder.add: reduce={reduce_text!r} works over a last class dimension; {what} has shape {tuple(t.shape)}")
    if kind == "argmax":
        return {key: out._replace(tensor=t.argmax(-1))}
    if kind == "softmax":
        return {key: out._replace(tensor=t.softmax(-1))}
    if k > t.shape[-1]:
        raise ValueError(f"Recorder.add: reduce={reduce_text!r} keeps {k} of the last dimension, but {what} has only {t.shape[-1]}")
    values, indices = t.topk(k, -1)
    prefix = "" if single else f"{key}."
    return {f"{prefix}values": out._replace(tensor=values), f"{prefix}indices": out._replace(tensor=indices)}


def batch_outputs(outputs, per_token, slots: Identity, reduce, reduce_text: str, specs: Optional[Dict[str, Spec]],
                  on_duplicate: str, views_mode: str) -> Tuple[Dict[str, Output], Optional[Dict[str, Spec]], bool]:
    """(checked outputs after the reduction, their specs on a first add (else None), single)."""
    owner = "Recorder.add"
    if isinstance(outputs, torch.Tensor):
        if per_token is not True and per_token is not False:
            raise TypeError(f"{owner}: per_token must be a bool for a single tensor output, got {per_token!r}")
        raw = ((SINGLE, outputs, per_token),)
        single = True
    elif isinstance(outputs, Mapping):
        if not outputs:
            raise ValueError(f"{owner}: outputs must hold at least one tensor, got an empty dict")
        for key, value in outputs.items():
            if not isinstance(key, str):
                raise TypeError(f"{owner}: output names must be str, got {key!r}")
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{owner}: outputs[{key!r}] must be a tensor, got {type(value).__name__}")
        if per_token is True or per_token is False:
            token_keys = set(outputs) if per_token else set()
        elif isinstance(per_token, (set, frozenset, list, tuple)):
            token_keys = set(per_token)
            unknown = token_keys - set(outputs)
            if unknown:
                raise ValueError(f"{owner}: per_token names {sorted(map(str, unknown))} are not outputs; the outputs are {sorted(outputs)}")
        else:
            raise TypeError(f"{owner}: per_token must be a bool or a set of output names, got {type(per_token).__name__}")
        raw = tuple((key, value, key in token_keys) for key, value in outputs.items())
        single = False
    else:
        raise TypeError(f"{owner}: outputs must be a tensor or a dict of tensors, got {type(outputs).__name__}")

    n = len(slots.index)
    named: Dict[str, Output] = {}
    for key, t, tok in raw:
        what = f"{owner}: " + ("outputs" if single else f"outputs[{key!r}]")
        if tok:
            out = _per_token_rows(what, t, slots)
        else:
            _check_tensor(what, t)
            if t.dim() < 1:
                raise ValueError(f"{what} must be [B, ...], got a 0-d tensor")
            if t.shape[0] != n:
                raise ValueError(f"{what} has {t.shape[0]} rows but the batch has {n} items")
            out = Output(t, False)
        if out.tensor.requires_grad:
            out = out._replace(tensor=out.tensor.detach())
        if reduce is None:
            named[key] = out
            continue
        reduced = _reduced(reduce, reduce_text, key, out, single)
        clash = (reduced.keys() - {key}) & (named.keys() | set(outputs if not single else ()))
        if clash:
            raise ValueError(f"{owner}: reduce={reduce_text!r} names its outputs {sorted(reduced)}, but {sorted(clash)} already exist")
        named.update(reduced)
    if single and len(named) > 1:  # topk turned one output into values and indices
        single = False

    got = {k: Spec(o.per_token, o.tensor.dtype, tuple(o.tensor.shape[1 if o.jagged or not o.per_token else 2:])) for k, o in named.items()}
    if specs is None:
        for k, spec in got.items():
            if on_duplicate == "mean" and not spec.dtype.is_floating_point:
                raise TypeError(f"{owner}: on_duplicate='mean' averages floating-point outputs, got {k!r} of dtype {spec.dtype}")
            if views_mode == "vote" and (spec.dtype.is_floating_point or spec.dtype.is_complex):
                raise TypeError(f"{owner}: views='vote' needs integer or bool outputs, got {k!r} of dtype {spec.dtype}; use views='mean'")
        return named, got, single
    if len(named) != len(specs) or not all(k in specs for k in named):
        raise ValueError(f"{owner}: outputs must have the names of the first add, {sorted(specs)}, got {sorted(named)}")
    for k, spec in specs.items():
        have = got[k]
        if have != spec:
            hint = ""
            if spec.per_token != have.per_token:
                arg = spec.per_token if single else (f"{{{k!r}}}" if spec.per_token else "a set without it")
                hint = (f"; the first add recorded it {'per token' if spec.per_token else 'per example'}: "
                        f"pass per_token={arg} as there")
            raise (TypeError if have.dtype != spec.dtype else ValueError)(
                f"{owner}: output {k!r} must be {spec.describe()} as in the first add, got {have.describe()}{hint}")
    return named, None, single
