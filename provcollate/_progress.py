"""Optional tqdm progress bars (``progress=True``) and the package's ``logging`` logger."""
from __future__ import annotations

import logging
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

logger = logging.getLogger("provcollate")


def _tqdm(owner: str, progress):
    """tqdm's class when ``progress`` is True, None when False; TypeError for a non-bool,
    ImportError naming the fix when tqdm is absent."""
    if not isinstance(progress, bool):
        raise TypeError(f"{owner}: progress must be a bool, got {type(progress).__name__}")
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError(f"{owner}: progress=True needs tqdm; pip install tqdm (or pip install 'provcollate[progress]')") from None
    return tqdm


def bar(owner: str, progress, items: Iterable[T], total: Optional[int], desc: str, unit: str) -> Iterator[T]:
    """``items`` as they come, through a tqdm bar when ``progress`` is True."""
    tqdm = _tqdm(owner, progress)
    if tqdm is None:
        return iter(items)
    return iter(tqdm(items, total=total, desc=desc, unit=unit))


class Counter:
    """A tqdm bar advanced by hand (``tick()``), or nothing when ``progress`` is False; ``close()`` ends it."""

    def __init__(self, owner: str, progress, total: Optional[int], desc: str, unit: str) -> None:
        tqdm = _tqdm(owner, progress)
        self._bar = None if tqdm is None else tqdm(total=total, desc=desc, unit=unit)

    def tick(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
