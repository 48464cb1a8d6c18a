"""``Recorder.gather``: every rank's recorded outputs on every rank (or one), over torch.distributed.

Two collectives move everything:

1. a size exchange: ``all_gather_object`` of a small header per rank (output names, dtypes
   and row shapes, settings, entry and token counts), so that every rank can check the others
   and lay out their buffers, ranks that recorded nothing included;
2. the data: each rank packs its raw entries (a slot ``index * V + view`` per entry, then the
   counts and per-token lengths it needs, the keys of a Recorder that files by key (int64, or
   bytes plus offsets), then each output's rows) into one byte tensor on the
   communication device, padded to the largest rank's size, and ``all_gather`` (or ``gather``
   to ``dst``) moves them. No Python object holds the data itself.

Receivers merge the ranks' entries in rank order under the Recorder's ``on_duplicate`` policy
(so ``"first"`` keeps the lowest rank's value, ``"last"`` the highest's, ``"mean"`` weighs each
rank's mean by its count), then combine views as ``result()`` does. With NCCL the buffers live
on the GPU: a Recorder storing on a GPU never copies its outputs to the host.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from . import _progress
from ._checks import check_int
from ._keys import decode_keys, encode_keys, keys_kind
from .store import SlotBlock, Store, books, specs_from_meta, specs_to_meta, to_device

__all__ = ["gather"]

_ALIGN = 16  # section starts, so that every dtype can be viewed in place (complex128 included)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _comm_device(group, storage: torch.device) -> torch.device:
    """Where the buffers live: the backend's device, preferring the storage's own."""
    backend = str(dist.get_backend(group)).lower()
    if storage.type == "cuda" and "nccl" in backend:
        return storage
    if any(name in backend for name in ("gloo", "mpi", "ucc")):
        return torch.device("cpu")
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _header(store: Store, block: Optional[SlotBlock]) -> Dict[str, Any]:
    header: Dict[str, Any] = {"on_duplicate": store.on_duplicate, "views": store.views, "num_items": store.expected,
                              "outputs": None, "single": False, "entries": 0, "tokens": 0, "width": 1, "records": store.records,
                              "keys": None, "key_bytes": 0, "prints": False, "books": books(store)}
    if block is not None:
        header.update(outputs=specs_to_meta(store.specs), single=store.single, entries=len(block),
                      tokens=0 if block.lengths is None else int(block.lengths.sum()), width=store.table.shape[1],
                      prints=block.prints is not None)
        if block.keys is not None:
            kind = keys_kind(block.keys)
            header.update(keys=kind, key_bytes=0 if kind == "int" else len(block.key_data[0]))
    return header


def _with_key_bytes(block: Optional[SlotBlock]) -> Optional[SlotBlock]:
    """``block`` with its str, bytes or tuple keys encoded (``block.key_data``: data and offsets)."""
    if block is not None and block.keys is not None and not isinstance(block.keys, np.ndarray):
        block.key_data = encode_keys(block.keys)
    return block


def _sections(header: Dict[str, Any], outputs: List[Dict[str, Any]], mean: bool) -> List[Tuple[str, int, int]]:
    """(name, byte offset, byte size) of each part of a rank's buffer, from its header alone."""
    n, tokens = header["entries"], header["tokens"]
    parts = [("slot", 8 * n)]
    if header.get("keys") == "int":
        parts.append(("key", 8 * n))
    elif header.get("keys") is not None:
        parts += [("key_offsets", 8 * (n + 1)), ("key_data", header["key_bytes"])]
    if mean:
        parts.append(("count", 8 * n))
    if header.get("prints"):
        parts.append(("print", 8 * n))
    if any(o["per_token"] for o in outputs):
        parts.append(("length", 8 * n))
    for o in outputs:
        row = getattr(torch, o["dtype"]).itemsize * int(np.prod(o["shape"], dtype=np.int64))
        parts.append((o["name"], row * (tokens if o["per_token"] else n)))
    out, offset = [], 0
    for name, size in parts:
        out.append((name, offset, size))
        offset += _aligned(size)
    return out


def _pack(block: SlotBlock, width: int, sections, nbytes: int, device: torch.device) -> torch.Tensor:
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    slot = block.index if width == 1 else block.index * width + (0 if block.view is None else block.view)
    host = {"slot": slot, "count": block.count, "length": block.lengths, "key": block.keys, "print": block.prints}
    if block.key_data is not None:
        host["key_offsets"], host["key_data"] = block.key_data[1], block.key_data[0]
    for name, offset, size in sections:
        if not size:
            continue
        src = host[name] if name in host else block.columns[name]
        if isinstance(src, np.ndarray):
            src = to_device(np.ascontiguousarray(src, dtype=np.uint8 if name == "key_data" else np.int64), device)
        buf[offset:offset + size].copy_(src.contiguous().reshape(-1).view(torch.uint8))
    return buf


def _unpack(buf: torch.Tensor, header: Dict[str, Any], outputs, sections, width: int, mean: bool) -> SlotBlock:
    n, tokens = header["entries"], header["tokens"]
    parts = {name: buf[offset:offset + size] for name, offset, size in sections}
    slot = parts["slot"].view(torch.int64).cpu().numpy()
    index, view = (slot, None) if width == 1 else (slot // width, slot % width)
    count = parts["count"].view(torch.int64).cpu().numpy() if mean else None
    lengths = parts["length"].view(torch.int64).cpu().numpy() if "length" in parts else None
    keys = None
    if header.get("keys") == "int":
        keys = parts["key"].view(torch.int64).cpu().numpy()
    elif header.get("keys") is not None:
        keys = decode_keys(parts["key_data"].cpu().numpy(), parts["key_offsets"].view(torch.int64).cpu().numpy(), header["keys"])
    columns = {}
    for o in outputs:
        dtype, shape = getattr(torch, o["dtype"]), tuple(o["shape"])
        rows = tokens if o["per_token"] else n
        raw = parts[o["name"]]
        columns[o["name"]] = raw.view(dtype).view(rows, *shape) if raw.numel() else torch.empty((rows, *shape), dtype=dtype, device=buf.device)
    block = SlotBlock(index, view, count, lengths, columns, records=max(n, int(header["records"])), keys=keys)
    block.prints = parts["print"].view(torch.int64).cpu().numpy() if "print" in parts else None
    return block


def _check_headers(headers: List[Dict[str, Any]], owner: str) -> Tuple[Optional[List[Dict[str, Any]]], bool]:
    """The ranks' common outputs and single flag; ValueError (on every rank alike) if the ranks disagree."""
    for key in ("on_duplicate", "views", "num_items"):
        values = [h[key] for h in headers]
        if any(v != values[0] for v in values):
            raise ValueError(f"{owner}: every rank's Recorder must have the same {key}; the ranks have {values}")
    kinds = {h["keys"] for h in headers if h["outputs"] is not None}
    if len(kinds) > 1:
        raise ValueError(f"{owner}: the ranks file their records in different ways: {[h['keys'] for h in headers]} "
                         "(None: by position; else the kind of key)")
    outputs, single, first = None, False, None
    for r, h in enumerate(headers):
        if h["outputs"] is None:
            continue
        if outputs is None:
            outputs, single, first = h["outputs"], h["single"], r
        elif h["outputs"] != outputs or h["single"] != single:
            raise ValueError(f"{owner}: ranks {first} and {r} recorded different outputs: {outputs} and {h['outputs']}")
    return outputs, single


def gather(store: Store, dst: Optional[int] = None, group=None, progress: bool = False) -> Optional[Tuple[Store, int]]:
    """See :meth:`provcollate.Recorder.gather`: (the merged store, the ranks merged) on receivers, else None."""
    owner = "Recorder.gather"
    if dst is not None:
        dst = check_int(owner, "dst", dst, what="a global rank (int) or None")
    if not isinstance(progress, bool):
        raise TypeError(f"{owner}: progress must be a bool, got {type(progress).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError(f"{owner}: group= needs torch.distributed to be initialized, got group={group!r}")
        if dst not in (None, 0):
            raise ValueError(f"{owner}: without torch.distributed there is one process, rank 0; got dst={dst}")
        return store, 1
    world = dist.get_world_size(group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
    if dst is not None and dst not in ranks:
        raise ValueError(f"{owner}: dst must be a global rank of the group {ranks}, got {dst}")

    block = _with_key_bytes(None if store.specs is None else store.extract())
    headers: List[Optional[Dict[str, Any]]] = [None] * world
    dist.all_gather_object(headers, _header(store, block), group=group)
    outputs, single = _check_headers(headers, owner)
    receiving = dst is None or dist.get_rank() == dst
    if outputs is None:  # no rank recorded anything
        return (store, world) if receiving else None

    width = max(h["width"] for h in headers)
    mean = store.on_duplicate == "mean"
    layout = [_sections(h, outputs, mean) for h in headers]
    nbytes = max(_aligned(s[-1][1] + s[-1][2]) for s in layout)
    device = _comm_device(group, store.device)
    mine = layout[dist.get_rank(group)]
    buf = _pack(block, width, mine, nbytes, device) if block is not None else torch.empty(nbytes, dtype=torch.uint8, device=device)
    del block  # the packed copy is all that is sent: free the extracted rows before receiving
    bufs = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(world)] if receiving else None
    if dst is None:
        dist.all_gather(bufs, buf, group=group)
    else:
        dist.gather(buf, bufs, dst=dst, group=group)
    del buf
    if not receiving:
        return None

    keyed = any(h["keys"] is not None for h in headers)
    merged = Store(store.expected, store.device, store.on_duplicate, store.views, keyed=keyed)
    merged.setup(specs_from_meta(outputs), single, owner)
    hint = ("; DistributedSampler pads the ranks with repeated items when the world size does not divide the dataset: "
            "set rec.on_duplicate = 'first' and call gather() again to keep one record of each")
    for r in _progress.bar(owner, progress, range(world), world, "merging ranks", "rank"):
        block = _unpack(bufs[r], headers[r], outputs, layout[r], width, mean)
        merged.absorb(block, f"{owner}: rank {ranks[r]}", repeat_hint=hint)
        merged.carry(headers[r].get("books"))  # the fingerprint checks each rank made itself
        bufs[r] = None  # each rank's buffer is freed once merged
    merged.table.check_view_lengths(owner, merged.views)
    _progress.logger.info("%s: %d entries from %d ranks, %d bytes per rank", owner, int(np.count_nonzero(merged.table.flat)), world, nbytes)
    return merged, world
