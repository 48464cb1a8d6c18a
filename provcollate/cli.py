"""The command line for the files a run leaves: ``python -m provcollate inspect|export``.

``inspect DIR`` prints the summary of a shard directory written by :meth:`Recorder.write`
(items, missing, repeats, shards, schema, size); ``export DIR OUT.parquet`` merges its shards
into one typed Parquet table (:meth:`Predictions.to_parquet`). Both need the ``[io]`` extra.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .record import Predictions
from .shards import shard_files

__all__ = ["main", "summary"]


def summary(path: str) -> str:
    """A few lines describing the shard directory ``path``: what ``inspect`` prints.

    ``items`` counts the merged entries, ``missing`` the items of ``range(num_items)`` never
    recorded (when the Recorder knew ``num_items``), ``repeats`` the records beyond one per
    entry (the same item recorded again, by several ranks or writes, resolved by ``on_duplicate``;
    see :meth:`provcollate.Predictions.summary`).
    Raises ValueError if ``path`` is not a directory of shards.
    """
    if not os.path.isdir(path):
        raise ValueError(f"provcollate inspect: path must be a directory of shards, got {path!r}")
    found = shard_files(path)
    files = [f for _, _, f in found]
    if not files:
        raise ValueError(f"provcollate inspect: no shards (part-r*-*.parquet) in {path!r}")
    import pyarrow.parquet as pq

    preds = Predictions.read(path)  # first: it checks every shard and names a damaged one
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    size = sum(os.path.getsize(f) for f in files)
    s = preds.summary()
    lines = [
        f"directory: {os.path.abspath(path)}",
        f"items:     {len(preds)}" + ("" if preds.num_items is None else f" of num_items={preds.num_items}"),
        f"missing:   {'unknown (no num_items)' if preds.num_items is None else len(preds.missing())}",
        f"repeats:   {s.repeats} ({s.resolution}); records {s.records}, shard rows {rows}",
        f"shards:    {len(files)} from {s.ranks} rank(s)",
        f"size:      {size} bytes",
        "schema:",
    ]
    for name in preds.names:
        per_token, dtype, shape = preds.column_info(name)
        kind = "per-token" if per_token else "per-example"
        lines.append(f"  {name}: {kind} {str(dtype).replace('torch.', '')} row shape {list(shape)}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m provcollate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="summarise a shard directory")
    p_inspect.add_argument("path", help="directory written by Recorder.write")
    p_export = sub.add_parser("export", help="merge a shard directory into one Parquet file")
    p_export.add_argument("path", help="directory written by Recorder.write")
    p_export.add_argument("out", help="the Parquet file to write")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            print(summary(args.path))
        else:
            if not os.path.isdir(args.path):
                raise ValueError(f"provcollate export: path must be a directory of shards, got {args.path!r}")
            preds = Predictions.read(args.path)
            try:
                preds.to_parquet(args.out)
            except TypeError as exc:  # an output dtype Parquet has no type for (complex): nothing is written
                raise ValueError(f"provcollate export: {args.path} cannot be written to {args.out} as one Parquet table "
                                 f"({exc}); read it with provcollate.Predictions.read instead") from exc
            print(f"wrote {len(preds)} entries to {args.out}")
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
