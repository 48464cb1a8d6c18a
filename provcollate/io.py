"""Finished column tables (what :class:`provcollate.Predictions` holds) to and from Arrow,
Parquet and pandas. This module sees only :class:`provcollate.store.ColumnTable`.

Arrow layout: an ``index`` column (int64), or for predictions filed by key a ``key`` column
(int64, string, binary, or a struct of a tuple key's elements ``"0"``, ``"1"``, ...), a ``view``
column when views were kept apart, then one column per output. A per-example output with row
shape ``[d1, d2]`` is ``fixed_size_list<fixed_size_list<dtype, d2>, d1>``; a per-token output
is a ``list`` (``large_list`` past 2**31 rows) of such rows. The schema metadata key
``provcollate`` records each output's torch dtype and row shape, so that reading gives back
exactly what was written, bfloat16 (stored as its int16 bits) and empty shapes included, and
the provenance of the table (records, repeats, ranks and shards merged) for ``summary()``.

pyarrow (and pandas, for :func:`to_pandas`) are imported only when these functions are used.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List

import numpy as np
import torch

from ._checks import io_extra
from ._keys import decode_id, encode_id, key_array, keys_from_arrow, keys_kind
from .store import ColumnTable, Jagged
from .dataset import Indexed, Sample

__all__ = ["to_arrow", "from_arrow", "to_pandas", "write_parquet", "read_parquet", "source_kind", "source_rows", "source_column",
           "join"]

_META_KEY = b"provcollate"
_FORMAT = 1
_DTYPES = {
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint16, torch.uint32, torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64,
}
_RESERVED = ("index", "view", "key")
_PROVENANCE = ("records", "slots", "incomplete", "ranks", "shards", "views", "on_duplicate", "disagreements",
               "max_disagreement")
_FINGERPRINT = "fingerprint"  # the column of each entry's input fingerprint, after the outputs


def _check_fingerprint_name(owner: str, t: ColumnTable) -> None:
    if t.prints is not None and _FINGERPRINT in t.columns:
        raise ValueError(f"{owner}: an output may not be named {_FINGERPRINT!r} when fingerprints were recorded (a "
                         "column of its own); rename it")


def _pyarrow():
    return io_extra("pyarrow", "Arrow and Parquet export")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _host_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as a flat numpy array on the host; bfloat16 as its int16 bits."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.reshape(-1).numpy()


def _nested_array(values: torch.Tensor):
    """``values [n, *row]`` as an Arrow array of length n: primitive, in fixed-size lists per row dim."""
    pa = _pyarrow()
    if values.dtype not in _DTYPES:
        raise TypeError(f"provcollate.io: outputs of dtype {values.dtype} have no Arrow type; supported: "
                        f"{sorted(_dtype_name(d) for d in _DTYPES)}")
    array = pa.array(_host_numpy(values))
    shape = values.shape
    if values.numel() == 0 and shape[0] > 0:
        # Rows without elements: Parquet cannot read back fixed-size lists of size 0, so each row
        # is an empty variable-size list; the row shape lives in the metadata.
        return pa.ListArray.from_arrays(pa.array(np.zeros(shape[0] + 1, np.int32)), array)
    for depth in range(len(shape) - 1, 0, -1):  # innermost dim first
        length = int(np.prod(shape[:depth], dtype=np.int64))
        array = pa.Array.from_buffers(pa.list_(array.type, shape[depth]), length, [None], children=[array])
    return array


def _unnested(array, dtype: torch.dtype, shape) -> torch.Tensor:
    """The inverse of :func:`_nested_array`: ``[n, *shape]`` of ``dtype``."""
    n = len(array)
    if 0 in shape:
        return torch.empty((n, *shape), dtype=dtype)
    for _ in shape:
        array = array.flatten()
    if array.null_count:
        raise ValueError("provcollate.io: the table holds nulls; Predictions tables never do")
    host = np.array(array.to_numpy(zero_copy_only=False), copy=True)
    t = torch.from_numpy(host)
    if dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t.reshape(n, *shape).to(dtype)


def _host_index(t: ColumnTable) -> np.ndarray:
    return np.arange(t.size, dtype=np.int64) if t.index is None else t.index


def _key_items(keys) -> np.ndarray:
    """Each keyed entry's item number (entries of one key, its views, share one), keys sorted."""
    if not len(keys):
        return np.zeros(0, np.int64)
    changed = keys[1:] != keys[:-1] if isinstance(keys, np.ndarray) else np.fromiter(
        (a != b for a, b in zip(keys[1:], keys[:-1])), bool, len(keys) - 1)
    return np.concatenate(([0], np.cumsum(changed))).astype(np.int64)


def to_arrow(t: ColumnTable):
    """``t`` as a ``pyarrow.Table``; see the module docstring for the layout."""
    pa = _pyarrow()
    columns: Dict[str, Any] = {"key": key_array(_pyarrow(), t.keys)} if t.keys is not None else {"index": pa.array(_host_index(t))}
    if t.view is not None:
        columns["view"] = pa.array(t.view)
    outputs = []
    for name, col in t.columns.items():
        if name in _RESERVED:
            raise ValueError(f"Predictions.to_arrow: an output may not be named {name!r} (a column of its own); rename it")
        if isinstance(col, Jagged):
            values, offsets = col.contiguous()
            inner = _nested_array(values)
            large = int(offsets[-1]) >= 2**31
            offsets_array = pa.array(offsets.numpy().astype(np.int64 if large else np.int32))
            cls = pa.LargeListArray if large else pa.ListArray
            columns[name] = cls.from_arrays(offsets_array, inner)
            dtype, shape = values.dtype, values.shape[1:]
        else:
            columns[name] = _nested_array(col)
            dtype, shape = col.dtype, col.shape[1:]
        outputs.append({"name": name, "per_token": isinstance(col, Jagged), "dtype": _dtype_name(dtype), "shape": list(shape)})
    _check_fingerprint_name("Predictions.to_arrow", t)
    if t.prints is not None:
        columns[_FINGERPRINT] = pa.array(t.prints, pa.int64())
    provenance = {k: getattr(t, k) for k in _PROVENANCE}
    provenance["conflicted"] = [encode_id(i) for i in t.conflicted]
    meta = {"format": _FORMAT, "single": t.single, "num_items": t.num_items,
            "stacked_views": t.stacked_views, "has_view": t.view is not None, "outputs": outputs,
            "provenance": provenance, "has_fingerprint": t.prints is not None,
            "keys": None if t.keys is None else keys_kind(t.keys)}
    table = pa.table(columns)
    return table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})


def from_arrow(table) -> ColumnTable:
    """The table that :func:`to_arrow` turned into ``table``."""
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ValueError("Predictions.from_arrow: the table has no provcollate metadata; it was not written by Predictions.to_arrow")
    meta = json.loads(raw)
    if meta.get("format") != _FORMAT:
        raise ValueError(f"Predictions.from_arrow: unknown format {meta.get('format')!r}, this provcollate reads format {_FORMAT}")
    keys = None
    if meta.get("keys") is not None:
        keys = keys_from_arrow(table.column("key").combine_chunks(), meta["keys"])
        index = _key_items(keys)
    else:
        index = _unnested(table.column("index").combine_chunks(), torch.int64, ()).numpy()
    view = _unnested(table.column("view").combine_chunks(), torch.int64, ()).numpy() if meta["has_view"] else None
    columns: Dict[str, Any] = {}
    for out in meta["outputs"]:
        dtype, shape = getattr(torch, out["dtype"]), tuple(out["shape"])
        array = table.column(out["name"]).combine_chunks()
        if out["per_token"]:
            offsets = array.offsets.to_numpy().astype(np.int64)
            offsets = offsets - offsets[0]
            values = _unnested(array.flatten(), dtype, shape)
            columns[out["name"]] = Jagged.of(values, offsets)
        else:
            columns[out["name"]] = _unnested(array, dtype, shape)
    provenance = {k: v for k, v in (meta.get("provenance") or {}).items() if k in _PROVENANCE}
    if "views" not in provenance:
        provenance["views"] = 1 if view is None or not len(view) else int(view.max()) + 1
    conflicted = tuple(decode_id(i) for i in (meta.get("provenance") or {}).get("conflicted") or ())
    prints = None
    if meta.get("has_fingerprint"):
        prints = _unnested(table.column(_FINGERPRINT).combine_chunks(), torch.int64, ()).numpy()
    return ColumnTable(index, view, columns, meta["single"], meta["num_items"], meta["stacked_views"], len(index),
                       keys=keys, prints=prints, conflicted=conflicted, conflicts=len(conflicted), **provenance)


def write_parquet(t: ColumnTable, path) -> None:
    """Write ``t`` to one Parquet file at ``path``."""
    io_extra("pyarrow.parquet", "Predictions.to_parquet").write_table(to_arrow(t), path)


def read_parquet(path) -> ColumnTable:
    """The table in the Parquet file at ``path`` (written by :func:`write_parquet`)."""
    return from_arrow(io_extra("pyarrow.parquet", "Predictions.read").read_table(path))


def _readable(values: torch.Tensor) -> np.ndarray:
    """Host numpy values for a DataFrame: bfloat16, which numpy lacks, as float32."""
    values = values.detach().cpu()
    return (values.float() if values.dtype == torch.bfloat16 else values).numpy()


def _field_value(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.dim() == 0 else _readable(value)
    return value


def _fields(row):
    """(name, value) pairs of one dataset sample: a dict's items, a tuple's positions, or the whole."""
    if isinstance(row, dict):
        return [(str(k), v) for k, v in row.items()]
    if isinstance(row, (tuple, list)):
        return [(f"input_{k}", v) for k, v in enumerate(row)]
    return [("input", row)]


def _dataset_columns(dataset, index: np.ndarray) -> Dict[str, List[Any]]:
    """Each recorded item's fields, one column per field (a Python loop: one dataset access per item)."""
    if isinstance(dataset, Indexed):
        dataset = dataset.dataset
    unique, inverse = np.unique(index, return_inverse=True)
    columns: Dict[str, List[Any]] = {}
    for r, i in enumerate(unique.tolist()):
        sample = dataset[i]
        for name, value in _fields(sample.data if isinstance(sample, Sample) else sample):
            columns.setdefault(name, [None] * len(unique))[r] = _field_value(value)
    return {name: [values[j] for j in inverse.tolist()] for name, values in columns.items()}


def to_pandas(t: ColumnTable, dataset=None):
    """``t`` as a ``pandas.DataFrame``; see :meth:`provcollate.Predictions.to_pandas`."""
    pd = io_extra("pandas", "Predictions.to_pandas")
    if t.keys is not None:
        if dataset is not None:
            raise TypeError("Predictions.to_pandas: dataset= looks items up by position, but these predictions are filed "
                            "by key; preds.join(source, on='<key column>') puts them beside their source rows")
        data: Dict[str, Any] = {"key": t.keys if isinstance(t.keys, np.ndarray) else pd.Series(t.keys, dtype=object)}
    else:
        data = {"index": _host_index(t)}
    if t.view is not None:
        data["view"] = t.view
    for name, col in t.columns.items():
        if isinstance(col, Jagged):
            values, offsets = col.contiguous()
            pieces = np.split(_readable(values), offsets[1:-1].numpy())
            if t.stacked_views is not None:
                pieces = [np.moveaxis(p, 1, 0) for p in pieces]
            data[name] = pieces
        else:
            host = _readable(col)
            data[name] = host if host.ndim == 1 else list(host)
    _check_fingerprint_name("Predictions.to_pandas", t)
    if t.prints is not None:
        data[_FINGERPRINT] = t.prints
    if dataset is not None:
        for name, values in _dataset_columns(dataset, _host_index(t)).items():
            data[f"{name}_input" if name in data else name] = values
    return pd.DataFrame(data)



# ---------------------------------------------------------------------------------------------
# join: every source row beside its prediction

def source_kind(source) -> str:
    """"pandas", "arrow" or "datasets" for the tables :meth:`Predictions.join` takes; else TypeError."""
    module = type(source).__module__.split(".")[0]
    name = type(source).__name__
    if module == "pandas" and name == "DataFrame":
        return "pandas"
    if module == "pyarrow" and name == "Table":
        return "arrow"
    if module == "datasets" and name == "Dataset":
        return "datasets"
    raise TypeError(f"Predictions.join: source must be a pandas DataFrame, a pyarrow Table or a datasets.Dataset, got "
                    f"{type(source).__module__}.{name}")


def source_rows(source, kind: str) -> int:
    return len(source) if kind != "arrow" else source.num_rows


def source_column(source, kind: str, on: str) -> list:
    """The values of column ``on`` of ``source``, as Python objects; KeyError naming the columns if absent."""
    names = list(source.columns) if kind == "pandas" else list(source.column_names)
    if on not in names:
        raise KeyError(f"Predictions.join: on={on!r} is not a column of the source, whose columns are {names}")
    if kind == "pandas":
        return source[on].tolist()
    if kind == "arrow":
        return source.column(on).to_pylist()
    return source[on]


def _readable_table(t: ColumnTable) -> ColumnTable:
    """``t`` with bfloat16 outputs as float32 (Arrow, and those who read a joined table, lack bfloat16)."""
    cast = lambda c: c.float() if c.dtype == torch.bfloat16 else c
    columns = {name: (Jagged([cast(x) for x in col.chunks], col.bases, col.starts, col.lengths) if isinstance(col, Jagged)
                      else cast(col)) for name, col in t.columns.items()}
    return t._replace(columns=columns)


def join(t: ColumnTable, positions: np.ndarray, source, kind: str):
    """``source`` with each output of ``t`` as a column beside it: row r gets entry ``positions[r]``
    (-1: null). Outputs whose names a source column already has get the suffix ``_prediction``."""
    pa = _pyarrow()
    names = list(source.columns) if kind == "pandas" else list(source.column_names)
    rename = {n: f"{n}_prediction" if n in names else n for n in t.columns}
    if kind == "pandas":
        pd = io_extra("pandas", "Predictions.join")
        preds = to_pandas(t._replace(index=np.arange(t.size, dtype=np.int64), view=None, keys=None))
        taken = preds[list(t.columns)].reindex(positions).rename(columns=rename)  # position -1: a row of nulls
        taken.index = source.index
        return pd.concat([source, taken], axis=1)
    table = to_arrow(_readable_table(t)._replace(keys=None, index=None, view=None))
    taken = table.select(list(t.columns)).take(pa.array(positions, pa.int64(), mask=positions < 0))
    if kind == "arrow":
        out = source
        for name in t.columns:
            out = out.append_column(rename[name], taken.column(name))
        return out
    datasets = io_extra("datasets", "Predictions.join of a datasets.Dataset")
    base = source.flatten_indices().data.table
    for name in t.columns:
        base = base.append_column(rename[name], taken.column(name))
    return datasets.Dataset(datasets.table.InMemoryTable(base))
