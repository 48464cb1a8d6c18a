"""Ray Data: batch inference over many nodes with every prediction under its example's id.

A Ray Data pipeline (``read_parquet -> map_batches(model class, concurrency=N) -> write_parquet``)
keeps no identity: with ``preserve_order`` off (the default) blocks come back in any order, a
retried task runs its block again, per-token outputs come back padded. This module carries an
id column through it instead, and reads what Ray wrote back in dataset order:

- :func:`read_parquet`: Ray's ``read_parquet`` plus an id column holding each row's position in
  the source files, a key that is the same on every run over the same files;
- :class:`Predict`: the callable class for ``Dataset.map_batches``: collates each batch with a
  :class:`provcollate.Collator` (padded or packed, length-bucketed within the batch), runs the
  model (built once per actor) and returns the columns ``<id_column>, view, <outputs>`` and
  ``fingerprint`` (each row's input, :func:`provcollate.fingerprint`; not with a Collator made
  with ``fingerprint=False``), per-token outputs unpadded as list columns;
- :func:`read`: the Parquet files of ``write_parquet`` as :class:`provcollate.Predictions` in
  dataset order, under a :class:`provcollate.Recorder`'s duplicate policy, missing ids reported;
- :func:`written`: the ids already in an output directory, so that a rerun skips them
  (``Predict(skip=...)``, ``read_parquet(skip=...)``): resuming is keyed by id.

The columns ``Predict`` returns are :meth:`provcollate.Predictions.to_arrow`'s, with ``index``
renamed to its ``id_column``: the schema metadata keeps every output's dtype and row shape, so
reading gives back exactly what the model returned, and names the id column (key
``provcollate.ray``), so that :func:`read` and :func:`written` find it without being told.
See docs/ray.md.
"""
from __future__ import annotations

import collections.abc
import json
import os
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch

import provcollate as pc

__all__ = ["Predict", "read_parquet", "read", "written", "Written"]

_INDEX = "index"  # the entry column of Predictions.to_arrow, renamed to the id column
_META_KEY = b"provcollate.ray"  # schema metadata of Predict's tables: {"id_column": name}
_PREDICTIONS_KEY = b"provcollate"  # Predictions.to_arrow's own metadata (outputs, dtypes, shapes)


def _check_column(owner: str, name: str, value) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{owner}: {name} must be a column name (a non-empty str), got {value!r}")
    return value


def _id_column(owner: str, file: str, schema: pa.Schema, id_column: Optional[str]) -> str:
    """The id column of one output file: ``id_column`` when given, else the one ``Predict`` named
    in the file's schema metadata."""
    if id_column is not None:
        return id_column
    raw = (schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ValueError(f"{owner}: {file} does not name its id column (its schema metadata has no "
                         f"{_META_KEY.decode()!r} key, which Predict writes); pass id_column=, one of its columns {schema.names}")
    return json.loads(raw)["id_column"]


def _parquet_files(owner: str, path) -> List[str]:
    """Every ``.parquet`` file under ``path`` (a file, a directory walked recursively, or a list of them), sorted."""
    if isinstance(path, (str, os.PathLike)):
        path = [path]
    files: List[str] = []
    for p in path:
        p = os.fspath(p)
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs.sort()
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".parquet") and not n.startswith((".", "_"))]
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"{owner}: {p!r} is neither a file nor a directory")
    return files


# ---------------------------------------------------------------------------------------------
# What is already written: ids as ranges, one set per view


class Written:
    """The (id, view) pairs present in a directory of predictions: int ids as sorted ranges per
    view, str or bytes ids (keys) as a set of (id, view) pairs.

    Made by :func:`written`. Int ids come in runs (a block of positional ids is a range), so a
    set of ``n`` ids in ``r`` runs takes ``16 * r`` bytes, not ``8 * n``: a billion positional ids
    written in 100,000 blocks fit in 1.6 MB, small enough to ship to every actor. Picklable.
    """

    def __init__(self, ids, views=None) -> None:
        n = len(ids)
        views = np.zeros(n, np.int64) if views is None else np.asarray(views, dtype=np.int64).reshape(-1)
        if len(views) != n:
            raise ValueError(f"Written: views must have one entry per id ({n}), got {len(views)}")
        self.ranges: Dict[int, tuple] = {}
        self.keys: Optional[set] = None
        self.count = 0
        if n and isinstance(ids, list) and isinstance(ids[0], (str, bytes)):
            self.keys = set(zip(ids, views.tolist()))
            self.count = len(self.keys)
            return
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        for v in np.unique(views).tolist():
            unique = np.unique(ids[views == v])
            breaks = np.flatnonzero(np.diff(unique) != 1) + 1
            starts = unique[np.concatenate(([0], breaks))] if len(unique) else unique
            ends = unique[np.concatenate((breaks - 1, [len(unique) - 1]))] + 1 if len(unique) else unique
            self.ranges[v] = (starts, ends)
            self.count += len(unique)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        if self.keys is not None:
            return f"Written({self.count} entries keyed by id, views {sorted({v for _, v in self.keys})})"
        runs = sum(len(s) for s, _ in self.ranges.values())
        return f"Written({self.count} entries in {runs} runs of ids, views {sorted(self.ranges)})"

    def contains(self, ids, views=None) -> np.ndarray:
        """Bool array: which of the ``(ids[k], views[k])`` pairs are written (``views`` None: view 0)."""
        if isinstance(ids, list) and ids and isinstance(ids[0], (str, bytes)):
            views = [0] * len(ids) if views is None else np.broadcast_to(np.asarray(views, dtype=np.int64), (len(ids),)).tolist()
            keys = self.keys or set()
            return np.fromiter(((k, v) in keys for k, v in zip(ids, views)), bool, len(ids))
        if self.keys is not None:
            return np.zeros(len(ids), bool)  # int ids against a set of str ids: none written
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        views = np.zeros(len(ids), np.int64) if views is None else np.broadcast_to(np.asarray(views, dtype=np.int64), ids.shape)
        done = np.zeros(len(ids), bool)
        for v, (starts, ends) in self.ranges.items():
            rows = np.flatnonzero(views == v)
            run = np.searchsorted(starts, ids[rows], side="right") - 1
            inside = run >= 0
            inside[inside] = ids[rows[inside]] < ends[run[inside]]
            done[rows] = inside
        return done

    def covers(self, start: int, stop: int, view: int = 0) -> bool:
        """Whether every id of ``range(start, stop)`` is written in ``view``."""
        if stop <= start:
            return True
        if self.keys is not None:
            return False
        starts, ends = self.ranges.get(view, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        run = int(np.searchsorted(starts, start, side="right")) - 1
        return run >= 0 and int(ends[run]) >= stop


def _readable(owner: str, file: str) -> Optional[pq.ParquetFile]:
    """The Parquet file, or None (with a warning) when it cannot be opened: a write killed
    half-way leaves a file without its footer, whose rows then count as never written."""
    try:
        return pq.ParquetFile(file)
    except (pa.ArrowInvalid, OSError) as exc:
        warnings.warn(f"{owner}: skipping {file}, which is not a readable Parquet file ({exc}); "
                      "its ids count as not written", RuntimeWarning, stacklevel=3)
        return None


def written(path, *, id_column: Optional[str] = None, view_column: str = "view") -> Written:
    """The (id, view) pairs that the Parquet files under ``path`` hold: what a rerun may skip.

    Reads only the id and view columns (a view column absent means view 0). ``id_column``
    None: the column that ``Predict(id_column=...)`` wrote, as each file's schema metadata names
    it (ValueError naming the file when it does not: files not written from ``Predict``'s
    columns need ``id_column=``). ``path`` may not exist yet: then nothing is written.
    Unreadable files (a write killed half-way) are skipped with a warning, so their ids are run
    again.
    """
    if id_column is not None:
        _check_column("written", "id_column", id_column)
    _check_column("written", "view_column", view_column)
    if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
        return Written(np.zeros(0, np.int64))
    ids, views = [], []
    for file in _parquet_files("written", path):
        pf = _readable("written", file)
        if pf is None:
            continue
        names = pf.schema_arrow.names
        id_name = _id_column("written", file, pf.schema_arrow, id_column)
        if id_name not in names:
            raise ValueError(f"written: {file} has no id column {id_name!r}; its columns are {names}")
        table = pf.read(columns=[c for c in (id_name, view_column) if c in names])
        column = table.column(id_name)
        ids.append(column.to_numpy() if pa.types.is_integer(column.type) else column.to_pylist())
        views.append(table.column(view_column).to_numpy() if view_column in names else np.zeros(table.num_rows, np.int64))
    if not ids:
        return Written(np.zeros(0, np.int64))
    if any(isinstance(part, list) for part in ids):
        return Written([i for part in ids for i in (part if isinstance(part, list) else part.tolist())], np.concatenate(views))
    return Written(np.concatenate(ids), np.concatenate(views))


def _skip_set(owner: str, skip) -> Optional[Written]:
    if skip is None or isinstance(skip, Written):
        return skip
    if isinstance(skip, ray.ObjectRef):
        return _skip_set(owner, ray.get(skip))
    raise TypeError(f"{owner}: skip must be None, a provcollate.integrations.ray.Written (from written(path)) "
                    f"or an ObjectRef of one, got {type(skip).__name__}")


# ---------------------------------------------------------------------------------------------
# Positional ids at the read


class _PositionalParquet(ray.data.Datasource):
    """Parquet files read a few row groups per task, with an id column: the row's position in the
    files sorted by path. The row counts come from the footers, read once on the driver."""

    def __init__(self, files: List[str], id_column: str, columns, skip: Optional[Written]) -> None:
        super().__init__()
        self.files, self.id_column, self.columns, self.skip = files, id_column, columns, skip
        self.groups = []  # (file, row group, first id, rows, bytes)
        base = 0
        for file in files:
            pf = pq.ParquetFile(file)
            if id_column in pf.schema_arrow.names and (columns is None or id_column in columns):
                raise ValueError(f"read_parquet: {file} already has a column {id_column!r}; pass another id_column, "
                                 "or use that column as the id (Predict(id_column=...) after ray.data.read_parquet)")
            meta = pf.metadata
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                self.groups.append((file, g, base, rows, meta.row_group(g).total_byte_size))
                base += rows

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return sum(g[4] for g in self.groups)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        todo = [g for g in self.groups if self.skip is None or not self.skip.covers(g[2], g[2] + g[3])]
        parts = np.array_split(np.arange(len(todo)), max(1, min(parallelism, len(todo)))) if todo else []
        tasks = []
        for part in parts:
            groups = [todo[k] for k in part.tolist()]
            meta = BlockMetadata(num_rows=None if self.skip is not None else sum(g[3] for g in groups),
                                 size_bytes=int(sum(g[4] for g in groups)), exec_stats=None,
                                 input_files=tuple(sorted({g[0] for g in groups})))
            tasks.append(ReadTask(_ReadGroups(groups, self.id_column, self.columns, self.skip), meta,
                                  per_task_row_limit=per_task_row_limit))
        return tasks


class _ReadGroups:
    """One read task: its row groups, each with its id column, rows already written dropped."""

    def __init__(self, groups, id_column, columns, skip) -> None:
        self.groups, self.id_column, self.columns, self.skip = groups, id_column, columns, skip

    def __call__(self) -> Iterable[pa.Table]:
        for file, g, base, rows, _ in self.groups:
            table = pq.ParquetFile(file).read_row_group(g, columns=self.columns)
            ids = np.arange(base, base + rows, dtype=np.int64)
            table = table.append_column(self.id_column, pa.array(ids))
            if self.skip is not None:
                table = table.filter(pa.array(~self.skip.contains(ids)))
            if table.num_rows:
                yield table


def read_parquet(paths, *, id_column: str = "id", columns: Optional[Sequence[str]] = None, skip=None,
                 **read_args) -> "ray.data.Dataset":
    """A Ray Dataset of the Parquet files ``paths`` with an int64 id column: each row's position
    in the files (row 0 of the first file is id 0), the same on every run over the same files.

    ``paths``: a file, a directory (its ``.parquet`` files, recursively, sorted by path) or a
    list of them, in that order.

    ``columns`` reads only those. ``skip`` (a :class:`Written`, from :func:`written`) drops the
    rows already written, and does not read row groups whose ids are all written. ``read_args``
    go to ``ray.data.read_datasource`` (``override_num_blocks``, ``concurrency``, ...). Local or
    mounted paths; the footers are read once, here, to number the rows.
    """
    _check_column("read_parquet", "id_column", id_column)
    files = _parquet_files("read_parquet", paths)
    if not files:
        raise ValueError(f"read_parquet: no .parquet files in {paths!r}")
    source = _PositionalParquet(files, id_column, None if columns is None else list(columns), _skip_set("read_parquet", skip))
    return ray.data.read_datasource(source, **read_args)


# ---------------------------------------------------------------------------------------------
# The map_batches class


def _numpy_rows(array: pa.Array) -> Optional[np.ndarray]:
    """A primitive array, or fixed-size lists of one, as numpy ``[n, *row]``; None for other types."""
    shape = []
    while pa.types.is_fixed_size_list(array.type):
        shape.append(array.type.list_size)
        array = array.flatten()
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type) or pa.types.is_boolean(array.type)):
        return None
    values = array.to_numpy(zero_copy_only=False)
    return values.reshape(-1, *shape)


def _column_rows(name: str, column) -> list:
    """One value per row of an Arrow column: numpy arrays for lists of numbers (views of the
    column's buffers), numpy scalars for numbers, Python objects for anything else."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count:
        raise ValueError(f"Predict: column {name!r} holds {array.null_count} nulls; every input row needs a value")
    if isinstance(array.type, pa.ExtensionType):  # Ray's tensor columns
        values = array.to_numpy(zero_copy_only=False)
        return list(values)
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        rows = _numpy_rows(array.flatten())
        if rows is not None:
            offsets = array.offsets.to_numpy()
            offsets = offsets - offsets[0]
            return [rows[offsets[k]:offsets[k + 1]] for k in range(len(array))]
    rows = _numpy_rows(array)
    return list(rows) if rows is not None else array.to_pylist()


def _as_table(batch) -> pa.Table:
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, collections.abc.Mapping):  # batch_format="numpy" (Ray's default)
        columns = {}
        for name, values in batch.items():
            values = np.asarray(values)
            if values.dtype == object or values.ndim > 1:  # a list or tensor column: one array per row
                rows = [np.asarray(v) for v in values]
                columns[name] = pa.array(rows if all(r.ndim == 1 for r in rows) else [r.tolist() for r in rows])
            else:
                columns[name] = pa.array(values)
        return pa.table(columns)
    if type(batch).__module__.startswith("pandas"):  # batch_format="pandas"
        return pa.Table.from_pandas(batch, preserve_index=False)
    raise TypeError(f"Predict: batches must be pyarrow Tables (batch_format='pyarrow'), dicts of numpy arrays or "
                    f"pandas DataFrames, got {type(batch).__name__}")


def _id_column_values(owner: str, table: pa.Table, name: str):
    """The ids of a batch: an int64 array (ids >= 0), or a list of str or bytes ids (keys)."""
    column = table.column(name)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_binary(column.type) \
            or pa.types.is_large_binary(column.type):
        if column.null_count:
            raise ValueError(f"{owner}: the id column {name!r} holds {column.null_count} nulls; every row needs an id")
        return column.to_pylist()
    return _int_column(owner, table, name)


def _int_column(owner: str, table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name)
    if not pa.types.is_integer(column.type):
        raise TypeError(f"{owner}: the id/view column {name!r} must hold integers (ids: or str / bytes), got {column.type}; "
                        "ids from a row's position in the source files come from provcollate.integrations.ray.read_parquet")
    values = column.to_numpy()
    if len(values) and values.min() < 0:
        raise ValueError(f"{owner}: column {name!r} must hold ids >= 0, got {values.min()}")
    return values.astype(np.int64, copy=False)


class Predict:
    """The callable class for ``ray.data.Dataset.map_batches``: a model over id-carrying rows.

    ``ds.map_batches(Predict, fn_constructor_kwargs=dict(model=make_model, ...),
    compute=ray.data.ActorPoolStrategy(size=N), batch_size=..., batch_format="pyarrow")``
    (``concurrency=N`` before Ray 2.51) builds one ``Predict`` per actor, which calls ``model()``
    once. Each call then takes a batch of rows and:

    1. drops the rows whose ``(id, view)`` is in ``skip`` (a resumed run);
    2. makes each remaining row a :class:`provcollate.Sample` ``(index, view, data)`` with
       ``data`` the ``inputs`` columns (one column: its value; several: a dict by name), list
       columns as numpy arrays;
    3. cuts the batch into length buckets (:class:`provcollate.LengthBucketSampler` with
       ``bucket_size`` rows or ``max_tokens`` padded tokens, over the lengths of the
       Collator's primary field; neither: one bucket), collates each with ``collator``, moves it
       to ``device`` and calls the model on the :class:`provcollate.Batch` under
       ``torch.inference_mode()``;
    4. records the outputs (a tensor, or a dict of tensors: ``[B, ...]`` per example, ``[B, T, ...]``
       per token, or with a packed Collator ``[total, ...]`` in ``batch.offsets`` order) with a
       :class:`provcollate.Recorder`, which unpads per-token ones;
    5. returns a ``pyarrow.Table`` of the columns ``id_column``, ``view``, then one per output
       (per-token outputs are list columns of each row's real positions only), then
       ``fingerprint``, each row's input fingerprint, which :func:`read` keeps. Its schema metadata
       names ``id_column``, so :func:`read` and :func:`written` of what ``write_parquet`` made
       of it need no ``id_column=``.

    Args:
        model: a factory, called once per actor, returning the model: a callable taking a
            :class:`provcollate.Batch` (``batch["input_ids"]``, ``batch.mask``, ``batch.lengths``...).
        inputs: the column (a str) or columns (a list) given to the model; None: every column
            but the id and view columns.
        id_column: the column holding each row's id: ints (from :func:`read_parquet`, or the
            data's own, such as a document number), or str / bytes (a ``custom_id``, a WebDataset
            ``__key__``), which :func:`read` gives back as predictions filed by key; the output's
            id column has this name and type too.
        view_column: an int column of test-time-augmentation view ids; None: every row is view 0.
        per_token: as :meth:`provcollate.Recorder.add`: True, or the set of output names, for
            outputs with a position dimension.
        collator: a :class:`provcollate.Collator` (None: ``Collator()``); ``packed=True`` hands
            the model packed sequences with ``batch.offsets``.
        bucket_size, max_tokens: the size of the length buckets inside each Ray batch (rows, or
            a budget of padded tokens); None for both: the whole Ray batch at once.
        device: where the model runs (``"cuda"`` in an actor with ``num_gpus=1``); None: the CPU.
        skip: a :class:`Written` (from :func:`written`), or an ObjectRef of one: rows to leave out.
    """

    def __init__(self, model: Callable[[], Callable], *, inputs=None, id_column: str = "id", view_column: Optional[str] = None,
                 per_token=False, collator: Optional[pc.Collator] = None, bucket_size: Optional[int] = None,
                 max_tokens: Optional[int] = None, device=None, skip=None) -> None:
        if isinstance(model, torch.nn.Module) or not callable(model):
            raise TypeError(f"Predict: model must be a factory (called once per actor) returning the model, got "
                            f"{type(model).__name__} (pass model=lambda: ... to build it in each actor)")
        if collator is None:
            collator = pc.Collator()
        if not isinstance(collator, pc.Collator):
            raise TypeError(f"Predict: collator must be None or a provcollate.Collator, got {type(collator).__name__}")
        if bucket_size is not None and max_tokens is not None:
            raise ValueError(f"Predict: give bucket_size or max_tokens, not both (got {bucket_size} and {max_tokens})")
        self.id_column = _check_column("Predict", "id_column", id_column)
        self._meta = json.dumps({"id_column": id_column}).encode()
        self.view_column = None if view_column is None else _check_column("Predict", "view_column", view_column)
        if inputs is not None and not isinstance(inputs, str):
            inputs = list(inputs)
            for name in inputs:
                _check_column("Predict", "inputs", name)
        self.inputs = inputs
        self.per_token = per_token
        self.collator = collator
        self.bucket_size, self.max_tokens = bucket_size, max_tokens
        self.device = torch.device("cpu" if device is None else device)
        self.skip = _skip_set("Predict", skip)
        self.model = model()

    def _samples(self, table: pa.Table) -> List[pc.Sample]:
        names = self.inputs
        if names is None:
            names = [n for n in table.column_names if n not in (self.id_column, self.view_column)]
        for name in [names] if isinstance(names, str) else names:
            if name not in table.column_names:
                raise ValueError(f"Predict: input column {name!r} is not in the batch, whose columns are {table.column_names}")
        views = _int_column("Predict", table, self.view_column) if self.view_column is not None else np.zeros(table.num_rows, np.int64)
        if isinstance(names, str):
            data = _column_rows(names, table.column(names))
        else:
            columns = {name: _column_rows(name, table.column(name)) for name in names}
            data = [{name: rows[k] for name, rows in columns.items()} for k in range(table.num_rows)]
        return [pc.Sample(k, int(views[k]), data[k]) for k in range(table.num_rows)]

    def _buckets(self, samples: List[pc.Sample]) -> List[List[int]]:
        if self.bucket_size is None and self.max_tokens is None:
            return [list(range(len(samples)))]
        # The sequence fields, and so the primary one, are what the Collator makes of one sample.
        primary = self.collator.primary or next(iter(self.collator([samples[0]]).field_lengths), None)
        if primary is None:
            raise ValueError("Predict: bucket_size / max_tokens need a sequence input to measure, and the inputs have none")
        sampler = pc.LengthBucketSampler(_lengths(samples, primary), batch_size=self.bucket_size, max_tokens=self.max_tokens, num_replicas=1, rank=0)
        return list(sampler)

    def __call__(self, batch) -> pa.Table:
        table = _as_table(batch)
        if self.id_column not in table.column_names:
            raise ValueError(f"Predict: the batch has no id column {self.id_column!r}; its columns are {table.column_names} "
                             "(read with provcollate.integrations.ray.read_parquet, or name a column with id_column=)")
        ids = _id_column_values("Predict", table, self.id_column)
        if self.skip is not None:
            views = _int_column("Predict", table, self.view_column) if self.view_column is not None else None
            keep = ~self.skip.contains(ids, views)
            if not keep.all():
                table = table.filter(pa.array(keep))
        if table.num_rows == 0:
            empty = pa.table({self.id_column: table.column(self.id_column).combine_chunks()[:0], "view": pa.array([], pa.int64())})
            return empty.replace_schema_metadata({_META_KEY: self._meta})
        samples = self._samples(table)
        # Rows are recorded under their position in this batch: the Recorder's storage is then
        # the batch's size, whatever the ids are (a billion, or sparse).
        recorder = pc.Recorder(views="none")
        with torch.inference_mode():
            for positions in self._buckets(samples):
                collated = self.collator([samples[p] for p in positions]).to(self.device)
                recorder.add(collated, self.model(collated), per_token=self.per_token)
        out = recorder.result().to_arrow()
        entries = out.column(_INDEX).to_numpy()
        ids = table.column(self.id_column).combine_chunks().take(pa.array(entries))  # int or str ids, as they came
        out = out.set_column(out.schema.get_field_index(_INDEX), self.id_column, ids)
        return out.replace_schema_metadata({**out.schema.metadata, _META_KEY: self._meta})


def _lengths(samples: List[pc.Sample], field: str) -> List[int]:
    """The length of ``field`` in each sample (the Collator's primary sequence field)."""
    lengths = []
    for s in samples:
        value = s.data
        for key in field.split(".") if isinstance(value, dict) else ():
            value = value[key]
        lengths.append(len(value))
    return lengths


# ---------------------------------------------------------------------------------------------
# Reading what write_parquet left


def _add_entries(recorder: pc.Recorder, preds: pc.Predictions, rows_per_add: int) -> None:
    """Feed ``preds`` (one row group of a Ray output file) to ``recorder``, ``rows_per_add`` entries at a time."""
    view = preds.view
    if not len(preds):
        return
    # Each entry's id: its int id, or its str / bytes key (entries are (id, view) pairs with views kept apart).
    index = [k for k, _ in preds] if preds.keyed and view is not None else preds.keys() if preds.keyed else preds.index
    names = preds.names
    single = isinstance(next(iter(preds.items()))[1], torch.Tensor)
    token = preds.per_token
    prints = preds.fingerprints
    jagged = {name: preds.jagged(name) for name in names if name in token}
    dense = {name: preds.tensor(name) for name in names if name not in token}
    for start in range(0, len(index), rows_per_add):
        stop = min(start + rows_per_add, len(index))
        outputs, offsets = {}, None
        for name, (values, all_offsets) in jagged.items():
            part = all_offsets[start:stop + 1]
            outputs[name] = values[int(part[0]):int(part[-1])]
            offsets = part - part[0]
        outputs.update({name: values[start:stop] for name, values in dense.items()})
        outputs = {name: outputs[name] for name in names}
        recorder.add(index[start:stop], outputs[names[0]] if single else outputs,
                     per_token=bool(token) if single else set(token), offsets=offsets,
                     view=None if view is None else view[start:stop],
                     fingerprint=None if prints is None else prints[start:stop])


def read(path, num_items=None, *, on_duplicate: str = "error", views: str = "mean", id_column: Optional[str] = None,
         view_column: str = "view", rows_per_add: int = 65536) -> pc.Predictions:
    """The predictions that ``Predict`` -> ``write_parquet`` left under ``path``, in dataset order.

    Every ``.parquet`` file under ``path`` is read a row group at a time, oldest file first, and
    fed to one :class:`provcollate.Recorder` (``num_items``, ``on_duplicate``, ``views``), so the
    result is what one Recorder fed every block would hold:

    - an (id, view) written more than once (a rerun without ``skip``, two drivers on one job, a
      block copied twice) is resolved by ``on_duplicate``: ``"error"`` raises ValueError naming
      the file and the id, ``"first"`` keeps the oldest file's value, ``"last"`` the newest's,
      ``"mean"`` averages them (floating-point outputs only: integer or bool outputs, such as
      class ids, raise TypeError; use ``"first"`` or ``"last"`` for those); never doubled;
    - ``result.missing()`` lists the ids of ``range(num_items)`` that no file holds (give
      ``num_items``: the number of input rows, or an Indexed dataset);
    - a file that is not readable Parquet (a write killed half-way) is skipped with a warning,
      so its ids come out missing and a resumed run writes them again.

    ``id_column`` None: the column that ``Predict(id_column=...)`` wrote, as each file's schema
    metadata names it (ValueError naming the file when it does not); a name: that column.

    Memory: the result (dense per-example outputs, per-token rows) plus one row group; rows
    go to the Recorder ``rows_per_add`` entries at a time, per-token ones as they are stored
    (``offsets=``), never padded.
    """
    if id_column is not None:
        _check_column("read", "id_column", id_column)
    _check_column("read", "view_column", view_column)
    if isinstance(rows_per_add, bool) or not isinstance(rows_per_add, int) or rows_per_add < 1:
        raise ValueError(f"read: rows_per_add must be an int >= 1, got {rows_per_add!r}")
    files = _parquet_files("read", path)
    files.sort(key=lambda f: (os.stat(f).st_mtime_ns, f))  # "first" is the oldest write
    recorder = pc.Recorder(num_items=num_items, on_duplicate=on_duplicate, views=views)
    for file in files:
        pf = _readable("read", file)
        if pf is None:
            continue
        id_name = _id_column("read", file, pf.schema_arrow, id_column)
        for g in range(pf.metadata.num_row_groups):
            table = pf.read_row_group(g)
            if id_name not in table.column_names:
                raise ValueError(f"read: {file} has no id column {id_name!r}; its columns are {table.column_names}")
            id_type = table.schema.field(id_name).type
            keyed = not pa.types.is_integer(id_type)  # str or bytes ids: the entries are filed by key
            entry = "key" if keyed else _INDEX
            names = [entry if n == id_name else "view" if n == view_column else n for n in table.column_names]
            # Ray concatenates blocks into row groups: sorted, they are a valid Predictions (increasing keys).
            order = [(n, "ascending") for n in (entry, "view") if n in names]
            metadata = dict(table.schema.metadata or {})
            if keyed and _PREDICTIONS_KEY in metadata:
                meta = json.loads(metadata[_PREDICTIONS_KEY])
                meta["keys"] = "bytes" if pa.types.is_binary(id_type) or pa.types.is_large_binary(id_type) else "str"
                metadata[_PREDICTIONS_KEY] = json.dumps(meta).encode()
            table = table.rename_columns(names).sort_by(order).replace_schema_metadata(metadata)
            try:
                preds = pc.Predictions.from_arrow(table)
            except ValueError as exc:
                raise ValueError(f"read: {file} was not written from provcollate.integrations.ray.Predict's columns ({exc})") from None
            try:
                _add_entries(recorder, preds, rows_per_add)
            except ValueError as exc:
                raise ValueError(f"read: {file}: {exc}") from exc
    return recorder.result()
