"""Streaming Parquet shards: ``Recorder.write``, ``Recorder(resume=...)``, ``Recorder.done`` and
``Predictions.read`` of a directory.

A shard directory holds files ``part-r{rank:05d}-{seq:06d}.parquet``, each one ``write()`` of
one rank: the entries that rank recorded since its previous write. A shard is written under a
hidden temporary name, flushed to disk, and renamed into place only when complete, so a killed
run leaves whole shards only (plus at most one hidden temporary file per rank, which readers
skip and that rank's next resume removes). The file names are all a reader needs: no manifest.

Columns of a shard, one row per raw entry (an ``(index, view)`` slot; views are combined when
read): ``index`` int64, ``view`` int64 (when some view is not 0), ``count`` int64 (with
``on_duplicate="mean"``: how many records the entry averages), ``length`` int64 (with per-token
outputs), then one column per output holding each entry's bytes in native byte order:
``fixed_size_binary`` (its row) per example, ``large_binary`` (its ``length`` rows) per token.
The schema metadata key ``provcollate.shard`` records dtypes, row shapes and the Recorder's
settings. Every data page carries a CRC checksum that reading verifies, so a flipped bit or a
truncated file raises ValueError naming the file instead of coming back as data. Byte columns are written and read at close to disk speed, several times faster than
Arrow's nested lists; ``Predictions.read(dir).to_parquet(file)`` gives one typed table.

Reading merges shards in (rank, seq) order, one row group (about 64 MiB) at a time, into storage
allocated once: memory is the result plus one row group. ``"first"`` keeps the value of the
lowest rank, and within a rank the earliest write; ``"last"`` the highest rank's latest.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from . import _entries, _progress
from .record import Predictions, Recorder, _first_last, _host_long

__all__ = ["write", "read", "resume", "done", "result"]

_META_KEY = b"provcollate.shard"
_FORMAT = 1
_NAME = re.compile(r"^part-r(\d{5,})-(\d{6,})\.parquet$")
_GROUP_BYTES = 16 << 20  # bytes of one row group: what reading holds besides the result
_SETTINGS = ("on_duplicate", "views", "num_items")
_INTS = ("index", "view", "count", "length")  # bookkeeping columns: sorted or small, delta-packed to a few bits


def _rank_world() -> Tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _directory(owner: str, path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{owner}: path must be a str or os.PathLike naming a directory, got {type(path).__name__}")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{owner}: path must be a directory of shards, got the file {path!r}")
    return path


def _shards(directory: str) -> List[Tuple[int, int, str]]:
    """(rank, seq, file) of every complete shard in ``directory``, in (rank, seq) order."""
    found = []
    for name in os.listdir(directory):
        m = _NAME.match(name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), os.path.join(directory, name)))
    return sorted(found)


@contextlib.contextmanager
def _reading(file: str, owner: str):
    """Whatever a damaged, truncated or foreign file makes pyarrow, the OS or json raise comes out
    as one ValueError naming the file."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{owner}: {file} is damaged or is not a shard written by Recorder.write "
                         f"({type(exc).__name__}: {exc})") from exc


def _meta(file: str, owner: str) -> Dict[str, Any]:
    import pyarrow.parquet as pq

    with _reading(file, owner):
        raw = (pq.read_schema(file).metadata or {}).get(_META_KEY)
        if raw is None:
            raise ValueError(f"{owner}: {file} has no provcollate shard metadata; it was not written by Recorder.write")
        meta = json.loads(raw)
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else meta
            raise ValueError(f"{owner}: {file} has shard format {found!r}; this provcollate reads format {_FORMAT}")
        if meta["byteorder"] != sys.byteorder:
            raise ValueError(f"{owner}: {file} was written on a {meta['byteorder']}-endian machine; this one is {sys.byteorder}-endian")
        for key in ("outputs", "single") + _SETTINGS:
            meta[key]  # noqa: B018  (a KeyError here names the missing key)
    return meta


def _common(metas: List[Dict[str, Any]], files: List[str], owner: str, keys=("outputs", "single") + _SETTINGS) -> Dict[str, Any]:
    """The settings and outputs every shard shares; ValueError naming two shards that differ."""
    for key in keys:
        for m, f in zip(metas[1:], files[1:]):
            if m[key] != metas[0][key]:
                raise ValueError(f"{owner}: the shards disagree on {key}: {metas[0][key]!r} in {files[0]} but {m[key]!r} in {f}")
    return metas[0]


def _host_bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _row_bytes(out: Dict[str, Any]) -> int:
    return getattr(torch, out["dtype"]).itemsize * int(np.prod(out["shape"], dtype=np.int64))


def _write_shard(file: str, block: _entries.Entries, meta: Dict[str, Any]) -> None:
    """Write ``block`` to ``file`` through a temporary name: the file appears whole or not at all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(block)
    arrays = {"index": pa.array(block.index)}
    if block.view is not None and block.view.any():
        arrays["view"] = pa.array(block.view)
    if block.count is not None:
        arrays["count"] = pa.array(block.count)
    if block.lengths is not None:
        arrays["length"] = pa.array(block.lengths)
    nbytes = 8 * n * len(arrays)
    for out in meta["outputs"]:
        row = _row_bytes(out)
        if not row:
            continue  # rows without elements: the shape in the metadata is all there is
        data = pa.py_buffer(_host_bytes(block.columns[out["name"]]))
        if out["per_token"]:
            offsets = np.concatenate(([0], np.cumsum(block.lengths))) * row
            arrays[out["name"]] = pa.Array.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), data])
        else:
            arrays[out["name"]] = pa.Array.from_buffers(pa.binary(row), n, [None, data])
        nbytes += data.size
    table = pa.table(arrays).replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    rows_per_group = max(1, _GROUP_BYTES * n // max(nbytes, 1))
    directory, name = os.path.split(file)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, row_group_size=rows_per_group, compression="none", use_dictionary=False,
                       write_page_checksum=True,
                       write_statistics=["index"], column_encoding={c: "DELTA_BINARY_PACKED" for c in _INTS if c in arrays})
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the name says the shard is complete
        finally:
            os.close(fd)
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        pa.default_memory_pool().release_unused()  # Arrow's allocator would keep the encoding buffers
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # and the rename itself survives a crash
    finally:
        os.close(fd)


def _bytes_tensor(buffer, start: int, size: int) -> torch.Tensor:
    if not size:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(buffer, dtype=torch.uint8, count=size, offset=start)


def _column(table, out: Dict[str, Any], n: int, lengths: Optional[np.ndarray], file: str, owner: str) -> torch.Tensor:
    """One output of a row group as a tensor ``[rows, *shape]`` over the Arrow buffers (no copy)."""
    dtype, shape = getattr(torch, out["dtype"]), tuple(out["shape"])
    rows = int(lengths.sum()) if out["per_token"] else n
    row = _row_bytes(out)
    if not row:
        return torch.empty((rows, *shape), dtype=dtype)
    array = table.column(out["name"]).combine_chunks()
    buffers = array.buffers()
    if out["per_token"]:
        offsets = np.frombuffer(buffers[1], np.int64)[array.offset:array.offset + n + 1]
        if not np.array_equal(np.diff(offsets), lengths * row):
            raise ValueError(f"{owner}: {file} is damaged: output {out['name']!r} does not hold length rows per entry")
        raw = _bytes_tensor(buffers[2], int(offsets[0]), int(offsets[-1] - offsets[0]))
    else:
        raw = _bytes_tensor(buffers[1], array.offset * row, n * row)
    return raw.view(dtype).view(rows, *shape)


def _blocks(file: str, meta: Dict[str, Any], owner: str, values: bool = True) -> Iterator[_entries.Entries]:
    """The entries of one shard, a row group at a time; bookkeeping columns only unless ``values``."""
    import pyarrow.parquet as pq

    with _reading(file, owner):
        # Every page's CRC is checked: a flipped bit raises instead of being returned as data.
        pf = pq.ParquetFile(file, page_checksum_verification=True)
        names = set(pf.schema_arrow.names)
        num_row_groups = pf.num_row_groups
    wanted = None if values else [c for c in ("index", "view", "count", "length") if c in names]
    for g in range(num_row_groups):
        with _reading(file, owner):
            table = pf.read_row_group(g, columns=wanted)
            # Copies (8 bytes an entry): Arrow's own buffers are read-only, and these become index tensors.
            index = np.array(table.column("index").to_numpy())
            view = np.array(table.column("view").to_numpy()) if "view" in names else None
            count = np.array(table.column("count").to_numpy()) if "count" in names else None
            lengths = np.array(table.column("length").to_numpy()) if "length" in names else None
            columns = {o["name"]: _column(table, o, len(index), lengths, file, owner) for o in meta["outputs"]} if values else {}
        yield _entries.Entries(index, view, count, lengths, columns)


def _grow_to(rec: Recorder, metas: List[Dict[str, Any]]) -> None:
    """Size ``rec``'s storage once for every shard's largest index and view."""
    top = max(m["max_index"] for m in metas)
    vmax = max(m["max_view"] for m in metas)
    cap, vcap = rec._count.shape
    if top >= cap or vmax >= vcap:
        rec._grow(top, vmax)


# --------------------------------------------------------------------------------------------
# The writing side: one _Stream per Recorder that writes or resumes
# --------------------------------------------------------------------------------------------

class _Stream:
    """A Recorder's link to its shard directory.

    ``disk`` marks the slots ``[index, view]`` found in any shard (read at resume, or written
    since). Under ``"error"`` and ``"first"`` the Recorder keeps counting written slots, so that
    ``add`` still rejects or ignores them; under ``"last"`` and ``"mean"`` their counts go back to
    0, so that a later record is a new entry that reading merges with the written one.
    ``owned`` lists the shards whose entries this Recorder's ``result()`` and ``gather()`` hold.
    """

    def __init__(self, path: str, rank: int) -> None:
        self.path, self.rank = path, rank
        self.seq = 0
        self.every: Optional[int] = None
        self.since = 0  # rows added since the last shard
        self.disk = np.zeros((0, 1), bool)
        self.owned: List[str] = []
        self.checked = False  # the directory was checked for an earlier run's shards

    def added(self, rec: Recorder, rows: int) -> None:
        """Called by ``Recorder.add``: writes a shard once ``every`` rows have come in since the last."""
        self.since += rows
        if self.every is not None and self.since >= self.every:
            self.flush(rec)

    def _disk_flat(self, rec: Recorder) -> np.ndarray:
        """``disk`` laid out like the Recorder's slots (its storage only ever grows)."""
        shape = rec._count.shape
        if self.disk.shape != shape:
            disk = np.zeros(shape, bool)
            disk[:self.disk.shape[0], :self.disk.shape[1]] = self.disk
            self.disk = disk
        return self.disk.reshape(-1)

    def _unwritten(self, rec: Recorder) -> np.ndarray:
        """The slots recorded in memory and not yet in a shard, sorted."""
        recorded = rec._count_flat > 0
        if rec.on_duplicate in ("error", "first"):
            recorded &= ~self._disk_flat(rec)
        return np.flatnonzero(recorded)

    def flush(self, rec: Recorder) -> None:
        """Write the unwritten entries to a new shard, then drop them from memory."""
        rec._drain(wait=True)
        self.since = 0
        if rec._specs is None:
            return
        flat = self._unwritten(rec)
        if not len(flat):
            return
        block = _entries.extract(rec, flat)
        os.makedirs(self.path, exist_ok=True)
        if not self.checked:
            self._check_fresh()
            self.checked = True
        file = os.path.join(self.path, f"part-r{self.rank:05d}-{self.seq:06d}.parquet")
        meta = {"format": _FORMAT, "rank": self.rank, "seq": self.seq, "byteorder": sys.byteorder,
                "outputs": _entries.outputs_meta(rec), "single": rec._single, "entries": len(block),
                "max_index": int(block.index.max()), "max_view": 0 if block.view is None else int(block.view.max()),
                **{key: getattr(rec, key) for key in _SETTINGS}}
        _write_shard(file, block, meta)
        _progress.logger.info("Recorder.write: %d entries, %d bytes to %s", len(block), os.path.getsize(file), file)
        del block
        self.seq += 1
        self.owned.append(file)
        self._disk_flat(rec)[flat] = True
        if rec.on_duplicate not in ("error", "first"):
            rec._count_flat[flat] = 0
        # Fresh storage: pages never written again cost no memory, the written ones are returned.
        rec._dense = {name: torch.empty_like(t) for name, t in rec._dense.items()}
        rec._chunks = {name: type(c)(c.shape, c.dtype, c.device) for name, c in rec._chunks.items()}
        rec._shared = False

    def _check_fresh(self) -> None:
        """A first write must not mix into an earlier run's shards: those of this rank, or of ranks
        this run does not have (other ranks of this run may be writing already)."""
        world = _rank_world()[1]
        old = [f for r, _, f in _shards(self.path) if r == self.rank or r >= world]
        if old:
            raise ValueError(f"Recorder.write: {self.path} already holds shards of an earlier run ({os.path.basename(old[0])}, ...); "
                             f"continue it with Recorder(..., resume={self.path!r}) or write to another directory")

    def collected(self, rec: Recorder) -> Recorder:
        """A Recorder holding everything ``rec`` recorded: its shards read back, then what is in memory."""
        owner = "Recorder.result"
        merged = _entries.empty_like(rec, owner)
        if rec._specs is None:
            return merged
        for file in self.owned:
            meta = _meta(file, owner)
            for block in _blocks(file, meta, owner):
                _entries.absorb(merged, block, f"{owner}: {file}")
        rec._drain(wait=True)
        _entries.absorb(merged, _entries.extract(rec, self._unwritten(rec)), f"{owner}: recorded since the last write")
        return merged


def write(rec: Recorder, path, every: Optional[int] = None) -> None:
    """See :meth:`provcollate.Recorder.write`."""
    owner = "Recorder.write"
    path = _directory(owner, path)
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)):
            raise TypeError(f"{owner}: every must be an int (rows) or None, got {type(every).__name__}")
        if every < 1:
            raise ValueError(f"{owner}: every must be >= 1 row, got {every}")
    stream = rec._stream
    if stream is None:
        stream = _Stream(path, _rank_world()[0])
    elif stream.path != path:
        raise ValueError(f"{owner}: this Recorder writes to {stream.path!r} (resumed from or written to before), got {path!r}")
    stream.flush(rec)
    rec._stream = stream  # only once the first write went through
    if every is not None:
        stream.every = int(every)


def resume(rec: Recorder, path) -> None:
    """See ``resume=`` of :class:`provcollate.Recorder`: load the bookkeeping of every shard in ``path``."""
    owner = "Recorder: resume"
    path = _directory(owner, path)
    rank, world = _rank_world()
    stream = _Stream(path, rank)
    stream.checked = True
    found = _shards(path) if os.path.isdir(path) else []
    if os.path.isdir(path):
        prefix = f".part-r{rank:05d}-"
        for name in os.listdir(path):
            if name.startswith(prefix) and name.endswith(".tmp"):
                os.remove(os.path.join(path, name))  # this rank's shard cut short by a kill
    if found:
        files = [f for _, _, f in found]
        metas = [_meta(f, owner) for f in files]
        common = _common(metas, files, owner)
        for key in _SETTINGS:
            if common[key] != getattr(rec, key):
                raise ValueError(f"Recorder: resume={path!r} holds shards written with {key}={common[key]!r}, "
                                 f"but this Recorder has {key}={getattr(rec, key)!r}")
        _entries.setup(rec, common["outputs"], common["single"], owner)
        _grow_to(rec, metas)
        disk = stream._disk_flat(rec)
        vcap = rec._count.shape[1]
        keep_counts = rec.on_duplicate in ("error", "first")
        for file, meta in zip(files, metas):
            for block in _blocks(file, meta, owner, values=False):
                slots = block.index if vcap == 1 else block.index * vcap + (0 if block.view is None else block.view)
                again = disk[slots] | ~_first_last(slots)[0] if rec.on_duplicate == "error" else None
                if again is not None and again.any():
                    b = int(np.flatnonzero(again)[0])
                    raise ValueError(f"{owner}: item {block.index[b]} is in more than one shard (found again in {file}) "
                                     f"but the shards were written with on_duplicate='error'")
                disk[slots] = True
                if keep_counts:
                    rec._count_flat[slots] = 1
                if block.lengths is not None:
                    rec._token_len.reshape(-1)[slots] = block.lengths
        stream.owned = [f for r, _, f in found if r % world == rank]
        stream.seq = 1 + max((s for r, s, _ in found if r == rank), default=-1)
    rec._stream = stream


def result(rec: Recorder) -> Predictions:
    """``Recorder.result()`` of a Recorder that writes shards: they are read back, then merged with memory."""
    merged = rec._stream.collected(rec)
    _entries.check_view_lengths(merged, "Recorder.result")
    return merged.result()


def read(path, on_duplicate: Optional[str] = None) -> Predictions:
    """See :meth:`provcollate.Predictions.read` (a directory of shards)."""
    import pyarrow as pa

    owner = "Predictions.read"
    if on_duplicate is not None and on_duplicate not in ("error", "first", "last", "mean"):
        raise ValueError(f"{owner}: on_duplicate must be None (the shards' own) or one of 'error', 'first', 'last', 'mean', got {on_duplicate!r}")
    path = _directory(owner, path)
    found = _shards(path)
    if not found:
        raise ValueError(f"{owner}: {path!r} holds no shards (files part-r*-*.parquet written by Recorder.write)")
    files = [f for _, _, f in found]
    metas = [_meta(f, owner) for f in files]
    keys = ("outputs", "single", "views", "num_items") + (("on_duplicate",) if on_duplicate is None else ())
    common = _common(metas, files, owner, keys)
    policy = on_duplicate or common["on_duplicate"]
    if policy == "mean" and not all(getattr(torch, o["dtype"]).is_floating_point for o in common["outputs"]):
        raise TypeError(f"{owner}: on_duplicate='mean' averages floating-point outputs; the shards hold "
                        f"{[(o['name'], o['dtype']) for o in common['outputs']]}")
    rec = Recorder(num_items=common["num_items"], on_duplicate=policy, views=common["views"])
    _entries.setup(rec, common["outputs"], common["single"], owner)
    _grow_to(rec, metas)
    for file, meta in zip(files, metas):
        for block in _blocks(file, meta, owner):
            _entries.absorb(rec, block, f"{owner}: {file}")
    pa.default_memory_pool().release_unused()  # the row groups' buffers
    _entries.check_view_lengths(rec, owner)
    return rec.result()


def done(rec: Recorder, index, view=None) -> torch.Tensor:
    """See :meth:`provcollate.Recorder.done`."""
    owner = "Recorder.done"
    scalar = False
    if hasattr(index, "host_index"):
        if view is not None:
            raise TypeError(f"{owner}: view= is only for a plain index; a Batch carries its own, got view={view!r}")
        host_view = getattr(index, "host_view", None)
        view = _host_long(owner, "batch.view", index.view if host_view is None else host_view)
        idx = _host_long(owner, "batch.host_index", index.host_index)
    elif isinstance(index, (int, np.integer)) and not isinstance(index, bool):
        idx, scalar = np.array([index], np.int64), True
    else:
        idx = _host_long(owner, "index", index)
    if view is not None:
        if isinstance(view, (int, np.integer)) and not isinstance(view, bool):
            view = np.full(len(idx), view, np.int64)
        else:
            view = _host_long(owner, "view", view)
            if len(view) != len(idx):
                raise ValueError(f"{owner}: view must have one entry per index ({len(idx)}), got {len(view)}")
        if len(view) and view.min() < 0:
            raise ValueError(f"{owner}: views must be >= 0, got {view.min()}")
    if len(idx) and (idx.min() < 0 or (rec.num_items is not None and idx.max() >= rec.num_items)):
        bad = idx.min() if idx.min() < 0 else idx.max()
        raise ValueError(f"{owner}: index must lie in range(num_items) = range({rec.num_items}), got {bad}")
    found = _lookup(rec._count, idx, view)
    if rec._stream is not None:
        found |= _lookup(rec._stream.disk, idx, view)
    out = torch.from_numpy(found)
    return out[0] if scalar else out


def _lookup(table: np.ndarray, idx: np.ndarray, view: Optional[np.ndarray]) -> np.ndarray:
    """``table[idx, view] != 0`` (in any view when ``view`` is None), False outside the table."""
    cap, vcap = table.shape
    inside = idx < cap
    if view is not None:
        inside &= view < vcap
    found = np.zeros(len(idx), bool)
    rows = idx[inside]
    found[inside] = (table[rows] != 0).any(1) if view is None else table[rows, view[inside]] != 0
    return found
