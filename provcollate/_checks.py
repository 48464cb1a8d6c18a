"""Argument checks shared by every layer of the package (the bottom of its import graph)."""
from __future__ import annotations

import operator

from torch.utils.data import IterableDataset

__all__ = ["check_int", "is_iterable_only", "io_extra"]


def check_int(owner: str, name: str, value, minimum: int | None = None, what: str = "an int") -> int:
    """``value`` as a Python int (numpy ints and 0-d tensors accepted, bools not), at least ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be {what}, got bool {value}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{owner}: {name} must be {what}, got {type(value).__name__}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
    return value


def is_iterable_only(dataset) -> bool:
    """True for a dataset that can only be iterated (no ``__getitem__`` with ``__len__``)."""
    if isinstance(dataset, IterableDataset):
        return True
    return hasattr(dataset, "__iter__") and not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"))


def io_extra(module: str, what: str):
    """Import ``module`` (pyarrow, pyarrow.parquet, pandas) of the ``[io]`` extra, or raise an
    ImportError saying that ``what`` needs it and how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"provcollate: {what} needs {module.split('.')[0]}: install provcollate's [io] extra "
                          "(pip install --no-build-isolation \".[io]\", or pip install pyarrow pandas)") from exc
