"""Progress bars (tqdm), one wrapper for every stage; each item is also a point where a stop signal
that could not interrupt at once (:func:`semisam_o1.core.errors.raise_if_stopped`) stops the loop."""

from __future__ import annotations

from typing import Iterable

from semisam_o1.core.errors import raise_if_stopped

_BAR = None


def _checked(iterable: Iterable):
    for item in iterable:
        raise_if_stopped()
        yield item


def _bar_class():
    """tqdm with a stop check before each item (created once, tqdm imported on first use)."""
    global _BAR
    if _BAR is None:
        from tqdm import tqdm

        class CheckedBar(tqdm):
            def __iter__(self):
                yield from _checked(super().__iter__())

        _BAR = CheckedBar
    return _BAR


def progress(iterable: Iterable, *, quiet: bool = False, desc: str = "", total: int | None = None, unit: str = "case"):
    """``iterable`` wrapped in a tqdm bar on stderr (or bare when ``quiet``); before each item a stop
    signal received while it could not raise (:func:`semisam_o1.core.errors.note_stop`) is raised."""
    if quiet:
        return _checked(iterable)
    return _bar_class()(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True)
