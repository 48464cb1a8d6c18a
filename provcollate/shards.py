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

Reading merges shards in (rank, seq) order, one row group (about 4 MiB as written) at a time, into
storage allocated once: memory is the result plus one row group. ``"first"`` keeps the value of the
lowest rank, and within a rank the earliest write; ``"last"`` the highest rank's latest.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import stat
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from . import _progress
from ._checks import io_extra
from ._keys import key_array, keys_from_arrow, keys_kind
from .store import ON_DUPLICATE, SlotBlock, Store, books, specs_from_meta, specs_to_meta

__all__ = ["Stream", "write", "read", "resume", "shard_files"]

_META_KEY = b"provcollate.shard"
_FORMAT = 1
_NAME = re.compile(r"^part-r(\d{5,})-(\d{6,})\.parquet$")
_GROUP_BYTES = 4 << 20  # bytes of one row group: what reading holds besides the result
_SETTINGS = ("on_duplicate", "views", "num_items")
_INTS = ("index", "view", "count", "length")  # bookkeeping columns: sorted or small, delta-packed to a few bits


def _pyarrow():
    what = "Parquet shards (Recorder.write, resume=, Predictions.read)"
    return io_extra("pyarrow", what), io_extra("pyarrow.parquet", what)


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


def shard_files(directory: str) -> List[Tuple[int, int, str]]:
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
    pa, _ = _pyarrow()
    try:
        yield
    except (pa.ArrowException, OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{owner}: {file} is damaged or is not a shard written by Recorder.write "
                         f"({type(exc).__name__}: {exc})") from exc


def _meta(file: str, owner: str) -> Dict[str, Any]:
    _, pq = _pyarrow()
    with _reading(file, owner):
        mode = os.stat(file).st_mode
        if not stat.S_ISREG(mode):  # opening a FIFO waits for a writer: refuse before any open
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "a device")
            raise ValueError(f"{owner}: {file} is {kind}, not a regular file; a shard is a file written by Recorder.write")
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
        meta.setdefault("keys", None)  # the kind of key the slots are filed by; None: by position
    return meta


def _common(metas: List[Dict[str, Any]], files: List[str], owner: str, keys=("outputs", "single", "keys") + _SETTINGS) -> Dict[str, Any]:
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


def _write_shard(file: str, block: SlotBlock, meta: Dict[str, Any], progress: bool) -> None:
    """Write ``block`` to ``file`` through a temporary name: the file appears whole or not at all."""
    pa, pq = _pyarrow()
    n = len(block)
    arrays = {"index": pa.array(block.index)}
    if block.keys is not None:
        arrays["key"] = key_array(pa, block.keys)
    if block.view is not None and block.view.any():
        arrays["view"] = pa.array(block.view)
    if block.count is not None:
        arrays["count"] = pa.array(block.count)
    if block.lengths is not None:
        arrays["length"] = pa.array(block.lengths)
    if block.prints is not None:
        arrays["fingerprint"] = pa.array(block.prints, pa.int64())
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
    groups = range(0, max(n, 1), rows_per_group)
    try:
        with pq.ParquetWriter(tmp, table.schema, compression="none", use_dictionary=False, write_page_checksum=True,
                              write_statistics=["index"],
                              column_encoding={c: "DELTA_BINARY_PACKED" for c in _INTS if c in arrays}) as writer:
            for start in _progress.bar("Recorder.write", progress, groups, len(groups), "writing shard", "row group"):
                writer.write_table(table.slice(start, rows_per_group), row_group_size=rows_per_group)
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
    column = table.column(out["name"])
    array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()  # combine_chunks copies even one
    buffers = array.buffers()
    if out["per_token"]:
        offsets = np.frombuffer(buffers[1], np.int64)[array.offset:array.offset + n + 1]
        if not np.array_equal(np.diff(offsets), lengths * row):
            raise ValueError(f"{owner}: {file} is damaged: output {out['name']!r} does not hold length rows per entry")
        raw = _bytes_tensor(buffers[2], int(offsets[0]), int(offsets[-1] - offsets[0]))
    else:
        raw = _bytes_tensor(buffers[1], array.offset * row, n * row)
    return raw.view(dtype).view(rows, *shape)


def _row_groups(file: str, owner: str) -> int:
    _, pq = _pyarrow()
    with _reading(file, owner):
        return pq.ParquetFile(file).num_row_groups


def _blocks(file: str, meta: Dict[str, Any], owner: str, values: bool = True) -> Iterator[SlotBlock]:
    """The slots of one shard, a row group at a time; bookkeeping columns only unless ``values``."""
    _, pq = _pyarrow()
    with _reading(file, owner):
        # Every page's CRC is checked: a flipped bit raises instead of being returned as data.
        pf = pq.ParquetFile(file, page_checksum_verification=True)
        names = set(pf.schema_arrow.names)
        num_row_groups = pf.num_row_groups
    wanted = None if values else [c for c in ("index", "view", "count", "length", "key", "fingerprint") if c in names]
    for g in range(num_row_groups):
        with _reading(file, owner):
            table = pf.read_row_group(g, columns=wanted)
            # Copies (8 bytes an entry): Arrow's own buffers are read-only, and these become index tensors.
            index = np.array(table.column("index").to_numpy())
            view = np.array(table.column("view").to_numpy()) if "view" in names else None
            count = np.array(table.column("count").to_numpy()) if "count" in names else None
            lengths = np.array(table.column("length").to_numpy()) if "length" in names else None
            keys = keys_from_arrow(table.column("key").combine_chunks(), meta["keys"]) if meta.get("keys") else None
            prints = np.array(table.column("fingerprint").to_numpy()) if "fingerprint" in names else None
            columns = {o["name"]: _column(table, o, len(index), lengths, file, owner) for o in meta["outputs"]} if values else {}
        del table  # the block's columns hold the buffers they use, and nothing here outlives the block
        block = SlotBlock(index, view, count, lengths, columns, keys=keys)
        block.prints = prints
        yield block
        del columns, block


def _grow_to(store: Store, metas: List[Dict[str, Any]]) -> None:
    """Size ``store`` once for every shard's largest index and view (shards filed by key: the store
    grows with the keys it is given)."""
    if not any(m.get("keys") for m in metas):
        store.ensure(max(m["max_index"] for m in metas), max(m["max_view"] for m in metas))


def _lay_out(store: Store, files: List[str], metas: List[Dict[str, Any]], owner: str,
             extra: Optional[SlotBlock] = None) -> None:
    """Plan the per-token rows of a fresh ``store`` that will absorb these shards (and ``extra``)
    (see :meth:`Store.lay_out`) from their bookkeeping columns alone (a few bytes an entry): read
    back, the rows then sit in the order a result lists them, so ``jagged()`` takes them as
    they are instead of gathering a copy. Nothing is planned if an item repeats."""
    if not store.tokens or any(m.get("keys") for m in metas):
        return  # shards filed by key: their slots are known once their keys are
    slots, lengths = [], []
    blocks = (block for file, meta in zip(files, metas) for block in _blocks(file, meta, owner, values=False))
    for block in itertools.chain(blocks, [extra] if extra is not None else []):
        if block.lengths is None:
            return
        slots.append(store.table.slots(block.index, block.view))
        lengths.append(block.lengths)
    if slots:
        store.lay_out(np.concatenate(slots), np.concatenate(lengths))


def _records(meta: Dict[str, Any]) -> int:
    """The records a shard stands for: its slots plus the repeats resolved before it was written."""
    return int(meta.get("records", meta["entries"]))


def _counted(blocks: Iterator[SlotBlock], extra: int) -> Iterator[SlotBlock]:
    """``blocks`` with the records they stand for: one per slot, and the first also the ``extra``
    records of repeats resolved before the shard was written."""
    for block in blocks:
        block.records = len(block) + extra
        extra = 0
        yield block
    if extra:
        yield SlotBlock(np.zeros(0, np.int64), None, None, None, {}, records=extra)


def _absorb_file(store: Store, file: str, meta: Dict[str, Any], owner: str, tick=None) -> None:
    pool = _pyarrow()[0].default_memory_pool()
    store.carry(meta.get("books"))  # the fingerprint checks of records resolved before the shard was written
    for block in _counted(_blocks(file, meta, owner), _records(meta) - int(meta["entries"])):
        store.absorb(block, f"{owner}: {file}")
        del block
        pool.release_unused()  # the row group's buffers, before the next one's
        if tick is not None:
            tick()


# --------------------------------------------------------------------------------------------
# The writing side: one Stream per Recorder that writes or resumes
# --------------------------------------------------------------------------------------------

class Stream:
    """A Recorder's link to its shard directory.

    The store books the slots found in any shard (read at resume, or written since):
    :meth:`Store.mark_written` and :meth:`Store.load_index`. ``owned`` lists the shards whose
    slots this Recorder's ``result()`` and ``gather()`` hold; ``flushed`` is the store's record
    count when the last of them was written.
    """

    def __init__(self, path: str, rank: int, store: Store) -> None:
        self.path, self.rank, self.store = path, rank, store
        self.seq = 0
        self.every: Optional[int] = None
        self.since = 0  # rows added since the last shard
        self.owned: List[str] = []
        self.flushed = 0
        self.booked = None  # the store's fingerprint books when the last shard was written
        self.checked = False  # the directory was checked for an earlier run's shards

    def added(self, rows: int) -> None:
        """Called by ``Recorder.add``: writes a shard once ``every`` rows have come in since the last."""
        self.since += rows
        if self.every is not None and self.since >= self.every:
            self.flush()

    def flush(self, progress: bool = False) -> None:
        """Write the unwritten slots to a new shard, then drop them from memory."""
        store = self.store
        self.since = 0
        if store.specs is None:
            return
        flat = store.unwritten()
        pending = books(store, self.booked)
        if not len(flat) and store.records == self.flushed and not (pending["conflicted"] or pending["disagreements"]):
            return  # nothing new: no rows, no repeats resolved, no checks counted since the last shard
        block = store.extract(flat)
        os.makedirs(self.path, exist_ok=True)
        if not self.checked:
            self._check_fresh()
            self.checked = True
        file = os.path.join(self.path, f"part-r{self.rank:05d}-{self.seq:06d}.parquet")
        meta = {"format": _FORMAT, "rank": self.rank, "seq": self.seq, "byteorder": sys.byteorder,
                "outputs": specs_to_meta(store.specs), "single": store.single, "entries": len(block),
                "records": max(len(block), store.records - self.flushed),
                "max_index": int(block.index.max()) if len(block) else -1,
                "max_view": int(block.view.max()) if block.view is not None and len(block) else 0,
                "on_duplicate": store.on_duplicate, "views": store.views, "num_items": store.expected,
                "keys": None if block.keys is None else (store.keys.kind or keys_kind(block.keys)),
                "books": pending}
        _write_shard(file, block, meta, progress)
        _progress.logger.info("Recorder.write: %d entries, %d bytes to %s", len(block), os.path.getsize(file), file)
        del block
        self.seq += 1
        self.owned.append(file)
        self.flushed = store.records
        self.booked = books(store)
        store.mark_written(flat)

    def _check_fresh(self) -> None:
        """A first write must not mix into an earlier run's shards: those of this rank, or of ranks
        this run does not have (other ranks of this run may be writing already)."""
        world = _rank_world()[1]
        old = [f for r, _, f in shard_files(self.path) if r == self.rank or r >= world]
        if old:
            raise ValueError(f"Recorder.write: {self.path} already holds shards of an earlier run ({os.path.basename(old[0])}, ...); "
                             f"continue it with Recorder(..., resume={self.path!r}) or write to another directory")

    def collected(self) -> Store:
        """A store holding everything the Recorder recorded: its shards read back, then what is in memory."""
        owner = "Recorder.result"
        store = self.store
        merged = store.empty_like()
        if store.specs is None:
            return merged
        block = store.extract(store.unwritten())
        block.records = max(len(block), store.records - self.flushed)
        metas = [_meta(file, owner) for file in self.owned]
        _lay_out(merged, self.owned, metas, owner, block)
        for file, meta in zip(self.owned, metas):
            _absorb_file(merged, file, meta, owner)
        merged.absorb(block, f"{owner}: recorded since the last write")
        merged.carry(books(store, self.booked))  # the checks made in memory since the last write
        return merged


def write(store: Store, stream: Optional[Stream], path, every: Optional[int] = None, progress: bool = False) -> Stream:
    """See :meth:`provcollate.Recorder.write`: returns the Recorder's stream (made by its first write)."""
    owner = "Recorder.write"
    _pyarrow()  # before anything is made on disk
    path = _directory(owner, path)
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)):
            raise TypeError(f"{owner}: every must be an int (rows) or None, got {type(every).__name__}")
        if every < 1:
            raise ValueError(f"{owner}: every must be >= 1 row, got {every}")
    if not isinstance(progress, bool):
        raise TypeError(f"{owner}: progress must be a bool, got {type(progress).__name__}")
    if stream is None:
        stream = Stream(path, _rank_world()[0], store)
    elif stream.path != path:
        raise ValueError(f"{owner}: this Recorder writes to {stream.path!r} (resumed from or written to before), got {path!r}")
    stream.flush(progress)
    if every is not None:
        stream.every = int(every)
    return stream


def resume(store: Store, path) -> Stream:
    """See ``resume=`` of :class:`provcollate.Recorder`: load the bookkeeping of every shard in ``path``."""
    owner = "Recorder: resume"
    path = _directory(owner, path)
    rank, world = _rank_world()
    stream = Stream(path, rank, store)
    stream.checked = True
    found = shard_files(path) if os.path.isdir(path) else []
    if os.path.isdir(path):
        prefix = f".part-r{rank:05d}-"
        for name in os.listdir(path):
            if name.startswith(prefix) and name.endswith(".tmp"):
                os.remove(os.path.join(path, name))  # this rank's shard cut short by a kill
    if found:
        files = [f for _, _, f in found]
        metas = [_meta(f, owner) for f in files]
        common = _common(metas, files, owner)
        settings = {"on_duplicate": store.on_duplicate, "views": store.views, "num_items": store.expected}
        for key in _SETTINGS:
            if common[key] != settings[key]:
                raise ValueError(f"Recorder: resume={path!r} holds shards written with {key}={common[key]!r}, "
                                 f"but this Recorder has {key}={settings[key]!r}")
        store.setup(specs_from_meta(common["outputs"]), common["single"], owner)
        _grow_to(store, metas)
        stream.owned = [f for r, _, f in found if r % world == rank]
        owned = set(stream.owned)
        for file, meta in zip(files, metas):
            # Every rank's shards are recorded; this rank counts the records of its own.
            blocks = _blocks(file, meta, owner, values=False)
            if file in owned:
                blocks = _counted(blocks, _records(meta) - int(meta["entries"]))
            for block in blocks:
                if file not in owned:
                    block.records = 0
                store.load_index(block, f"{owner}: {file}")
        stream.seq = 1 + max((s for r, s, _ in found if r == rank), default=-1)
        stream.flushed = store.records
        stream.booked = books(store)
    return stream


def read(path, on_duplicate: Optional[str] = None, progress: bool = False) -> Tuple[Store, int, int]:
    """See :meth:`provcollate.Predictions.read` (a directory of shards): (merged store, ranks, shards)."""
    pa, _ = _pyarrow()
    owner = "Predictions.read"
    if on_duplicate is not None and on_duplicate not in ON_DUPLICATE:
        raise ValueError(f"{owner}: on_duplicate must be None (the shards' own) or one of 'error', 'first', 'last', 'mean', got {on_duplicate!r}")
    path = _directory(owner, path)
    found = shard_files(path)
    if not found:
        raise ValueError(f"{owner}: {path!r} holds no shards (files part-r*-*.parquet written by Recorder.write)")
    files = [f for _, _, f in found]
    metas = [_meta(f, owner) for f in files]
    keys = ("outputs", "single", "views", "num_items", "keys") + (("on_duplicate",) if on_duplicate is None else ())
    common = _common(metas, files, owner, keys)
    policy = on_duplicate or common["on_duplicate"]
    if policy == "mean" and not all(getattr(torch, o["dtype"]).is_floating_point for o in common["outputs"]):
        raise TypeError(f"{owner}: on_duplicate='mean' averages floating-point outputs; the shards hold "
                        f"{[(o['name'], o['dtype']) for o in common['outputs']]}")
    store = Store(common["num_items"], torch.device("cpu"), policy, common["views"], keyed=common["keys"] is not None)
    store.setup(specs_from_meta(common["outputs"]), common["single"], owner)
    _grow_to(store, metas)
    _lay_out(store, files, metas, owner)
    groups = sum(_row_groups(f, owner) for f in files) if progress is True else None
    counter = _progress.Counter(owner, progress, groups, "reading shards", "row group")
    try:
        for file, meta in zip(files, metas):
            _absorb_file(store, file, meta, owner, tick=counter.tick)
    finally:
        counter.close()
    pa.default_memory_pool().release_unused()  # the row groups' buffers
    store.table.check_view_lengths(owner, store.views)
    _progress.logger.info("%s: %d shards from %d ranks in %s", owner, len(files), len({r for r, _, _ in found}), path)
    return store, len({r for r, _, _ in found}), len(files)
