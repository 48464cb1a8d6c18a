"""The recording side's storage core: slots, rows and their staging, knowing nothing of Recorder.

Everything recorded is filed under a *slot*, ``index * V + view`` (``V`` views, 1 without
test-time augmentation). The modules, bottom up:

- ``memory``: host storage of its own (``host_empty``), huge pages, gathers of chunked rows;
- ``records``: plain records: :class:`Spec`, :class:`Identity`, :class:`Output`,
  :class:`Jagged`, :class:`SlotBlock`, :class:`ColumnTable`;
- ``slots``: :class:`SlotTable`, the books per slot, and its ``claim``, the one place where the
  duplicate policy is applied, to batches, shards, ranks and resumed indices alike;
- ``rows``: the row stores (:class:`DenseRows`, :class:`TokenRows`) and the means and view
  combinations over them;
- ``staging``: writes that wait for copies from a GPU;
- ``keys``: the key table of a store that files by key (users' own ids to slots);
- ``result``: a store's records as a finished table (sorted by key when filed by key);
- ``room``: the room an index needs, refused past the machine's memory;
- ``writes``: :class:`RowWriter`, how rows are written (scatter, reserved token rows, means);
- ``fast``: the compiled pass of ``Recorder.add`` (:class:`FastPath`);
- ``store``: :class:`Store`, which owns all of the above and is the only writer of its state:
  sinks (shards, ranks) hand it blocks and tables through its methods.

Sizes always come from host arrays: nothing here waits on a GPU except a drain of the staging
that asks to. Every method that changes state first checks everything it can, so that an error
leaves the store as it was.
"""
from .fast import FastPath
from .memory import first_last, host_empty, huge_pages, to_device
from .records import (
    ON_DUPLICATE,
    SINGLE,
    VIEWS,
    ColumnTable,
    Identity,
    Jagged,
    Output,
    SlotBlock,
    Spec,
    specs_from_meta,
    specs_to_meta,
)
from .result import books
from .store import Store

__all__ = ["SINGLE", "ON_DUPLICATE", "VIEWS", "Spec", "specs_from_meta", "specs_to_meta", "Identity", "Output", "Jagged",
           "SlotBlock", "ColumnTable", "Store", "books", "FastPath", "first_last", "host_empty", "huge_pages", "to_device"]
