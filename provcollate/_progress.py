"""Optional tqdm progress bars (``progress=True``) and the package's ``logging`` logger."""
from __future__ import annotations

import logging
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

logger = logging.getLogger("provcollate")


def bar(owner: str, progress, items: Iterable[T], total: Optional[int], desc: str, unit: str) -> Iterator[T]:
    """``items`` as they come, through a tqdm bar when ``progress`` is True.

    Raises TypeError unless ``progress`` is a bool, ImportError naming the fix when tqdm is absent.
    """
    if not isinstance(progress, bool):
        raise TypeError(f"{owner}: progress must be a bool, got {type(progress).__name__}")
    if not progress:
        return iter(items)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError(f"{owner}: progress=True needs tqdm; pip install tqdm (or pip install 'provcollate[progress]')") from None
    return iter(tqdm(items, total=total, desc=desc, unit=unit))
