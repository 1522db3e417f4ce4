"""How stored numbers become the model's dtype: the one rule for every cast of the data.

NumPy's ``astype`` turns a float64 value beyond float32's range (about 3.4e38) into inf, an
int64 id beyond int32 into another id (it wraps), and a complex value into its real part, with
at most a warning on stderr: the run would then train on inf (its rows NaN) although the file
held finite numbers, on ids nobody wrote, or on half of what it held. Both are refused here with the first value and where it is: in-memory arrays before
training; a streamed ``.npz`` member as its rows are read (and, for a cast that can overflow,
in a pass before training: ``data.fit_to_model``); a record stream, which TensorFlow casts
inside its pipeline, from the first value beyond float32 or int32 that its counting pass kept
(:func:`first_beyond`, ``streams.Column.beyond``).
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from .targets import first_true, indexed


class CastError(DataError):
    """A cast that would lose what the data holds: ``text(where)`` words it with the position as
    ``where(name, index)`` names it (``data.fit_to_model``: a CSV's line and column)."""

    def __init__(self, name: str, target, index: tuple | None = None, value=None):
        self.name, self.target, self.index, self.value = name, np.dtype(target), index, value
        super().__init__(self.text(indexed))

    def text(self, where) -> str:
        if self.index is None:
            return (f"{self.name} holds complex numbers but the model takes {self.target}; store real numbers (the "
                    "real and imaginary parts as features of their own, if both matter)")
        low, high = _range(self.target)
        if self.target.kind == "f":
            return (f"{where(self.name, self.index)} is {self.value:g}, beyond {self.target}'s range (at most "
                    f"{high:.4g}), in which the model computes; scale the data")
        return (f"{where(self.name, self.index)} is {int(self.value)}, beyond {self.target}'s range ({int(low)} to "
                f"{int(high)}), the model's input type; store values it holds")


CHUNK_VALUES = 1 << 20  # first_beyond looks at this many values at a time


def _range(dtype) -> tuple:
    dtype = np.dtype(dtype)
    info = np.finfo(dtype) if dtype.kind == "f" else np.iinfo(dtype)
    return (float(info.min), float(info.max)) if dtype.kind == "f" else (int(info.min), int(info.max))


def can_overflow(stored, target) -> bool:
    """Could casting ``stored`` to ``target`` change a finite value beyond recognition (a float
    into a narrower float, a wide integer into a narrower integer or float16)?"""
    stored, target = np.dtype(stored), np.dtype(target)
    if target.kind not in "fiu" or stored.kind not in "fiu" or stored == target:
        return False
    (low, high), (target_low, target_high) = _range(stored), _range(target)
    return low < target_low or high > target_high


def first_beyond(array: np.ndarray, target, rows=None, start: int = 0):
    """``(index, value)`` of the first finite value of ``array`` that ``target`` cannot hold, or
    None. ``rows``: the whole array's row of each of ``array``'s rows (a streamed read), else
    ``start``: the row ``array`` begins at (a chunk of a record stream's counting pass)."""
    if not isinstance(array, np.ndarray) or not can_overflow(array.dtype, target) or array.size == 0:
        return None
    low, high = _range(target)
    per = max(1, CHUNK_VALUES // max(1, array.size // len(array)))  # rows at a time: the masks stay small
    for first in range(0, len(array), per):
        chunk = array[first:first + per]
        with np.errstate(invalid="ignore"):
            over = (chunk < low) | (chunk > high)  # NaN compares False; inf is not a value a cast loses
        if chunk.dtype.kind == "f":
            over &= np.isfinite(chunk)
        if over.any():
            at = first_true(over)
            row = first + int(at[0])
            row = int(rows[row]) if rows is not None else start + row
            return (row,) + tuple(int(i) for i in at[1:]), chunk[at]
    return None


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
        found = getattr(array, "beyond", None)  # (index, value, the reference it was beyond)
        if found is not None and can_overflow(array.dtype, target) and not can_overflow(target, found[2]):
            raise CastError(name, target, found[0], found[1])  # target holds no more than the reference
        return array.astype(target, copy=False)
    found = first_beyond(array, target, rows)
    if found is not None:
        raise CastError(name, target, *found)
    return array.astype(target, copy=False)


def reference(dtype):
    """The type a record stream's counting pass checks a column against, not yet knowing the
    model's: float32 for floats, int32 for integers (the usual narrowings)."""
    kind = np.dtype(dtype).kind
    return np.float32 if kind == "f" else np.int32 if kind in "iu" else None
