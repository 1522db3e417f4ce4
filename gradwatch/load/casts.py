"""How stored numbers become the model's dtype: the one rule for every cast of the data.

NumPy's ``astype`` turns a float64 value beyond float32's range (about 3.4e38) into inf, and a
complex value into its real part, each with a warning on stderr and nothing else: the run would
then train on inf (its rows NaN) although the file held finite numbers, or on half of what it
held. Both are refused here with the first value and where it is: in-memory arrays before
training; a streamed ``.npz`` member as its rows are read (and, for a cast that can overflow,
in a pass before training: ``data.fit_to_model``); a record stream, which TensorFlow casts
inside its pipeline, from the first value beyond float32 that its counting pass kept
(:func:`first_beyond`, ``streams.Column.beyond``).
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from .targets import first_true


class CastError(DataError):
    """A cast that would lose what the data holds: ``text(where)`` words it with the position as
    ``where(name, index)`` names it (``data.fit_to_model``: a CSV's line and column)."""

    def __init__(self, name: str, target, index: tuple | None = None, value=None):
        self.name, self.target, self.index, self.value = name, np.dtype(target), index, value
        super().__init__(self.text(lambda name, index: f"{name}[{', '.join(str(i) for i in index)}]"))

    def text(self, where) -> str:
        if self.index is None:
            return (f"{self.name} holds complex numbers but the model takes {self.target}; store real numbers (the "
                    "real and imaginary parts as features of their own, if both matter)")
        return (f"{where(self.name, self.index)} is {self.value:g}, beyond {self.target}'s range (at most "
                f"{float(np.finfo(self.target).max):.4g}), in which the model computes; scale the data")


def can_overflow(stored, target) -> bool:
    """Could casting ``stored`` to ``target`` turn a finite value into inf (a float into a
    narrower float, or a wide integer into float16)?"""
    stored, target = np.dtype(stored), np.dtype(target)
    if target.kind != "f" or stored.kind not in "fiu":
        return False
    limit = float(np.finfo(target).max)
    if stored.kind == "f":
        return float(np.finfo(stored).max) > limit
    return float(np.iinfo(stored).max) > limit


def cast(array, target, name: str, rows=None):
    """``array.astype(target)``, or a DataError where that would lose what the array holds.
    ``rows``: the rows of the whole array that ``array`` holds (a streamed read), for the position
    the error names. A streamed ``.npz`` member casts lazily: its reads come back here."""
    target = np.dtype(target)
    if array.dtype == target:
        return array
    if array.dtype.kind == "c":
        raise CastError(name, target)
    if not isinstance(array, np.ndarray):  # a stream: an .npz member checks its reads, a record column its pass
        found = getattr(array, "beyond", None)
        if found is not None and can_overflow(array.dtype, target) and np.finfo(target).max <= np.finfo(np.float32).max:
            raise CastError(name, target, *found)
        return array.astype(target, copy=False)
    if not can_overflow(array.dtype, target):
        return array.astype(target, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):
        out = array.astype(target, copy=False)
    lost = ~np.isfinite(out) & np.isfinite(array)
    if lost.any():
        at = first_true(lost)
        index = (int(rows[at[0]]),) + at[1:] if rows is not None else at
        raise CastError(name, target, tuple(int(i) for i in index), array[at])
    return out


def first_beyond(array: np.ndarray, target, start: int = 0):
    """``(index, value)`` of the first finite value of ``array`` (rows from ``start``) that
    ``target`` cannot hold, or None: what a record stream's counting pass keeps for :func:`cast`."""
    if not isinstance(array, np.ndarray) or array.dtype.kind != "f" or not can_overflow(array.dtype, target):
        return None
    with np.errstate(invalid="ignore"):
        over = np.isfinite(array) & (np.abs(array) > float(np.finfo(target).max))
    if not over.any():
        return None
    at = first_true(over)
    return (start + at[0],) + tuple(at[1:]), array[at]
