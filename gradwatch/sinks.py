"""Where rows go: CSV files written as the run goes (never half-written over a good file), CSV/JSON text.

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import GradwatchError


def _cell(value) -> str:
    """One CSV cell. Floats round-trip exactly; text that a spreadsheet would run as a
    formula (starting with = + - @) gets a leading quote."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, np.floating):
        return repr(float(value))
    text = "" if value is None else str(value)
    if text[:1] in ("=", "+", "-", "@"):
        text = "'" + text
    return text


class CsvSink:
    """Writes rows to a CSV as the run goes, without ever leaving a half-written file where a
    good one was.

    Rows go to a temporary file beside the target, flushed after every batch of rows. On
    :meth:`commit` (a finished, stopped or interrupted run) it replaces the target
    atomically; on :meth:`discard` (a crash) it is removed and the old file stays.
    """

    def __init__(self, path: str | os.PathLike, columns: list[str]):
        self.path = Path(path)
        self.columns = columns
        if self.path.is_dir():
            raise GradwatchError(f"--csv {self.path} is a folder; give a file name such as {self.path / 'steps.csv'}")
        parent = self.path.parent
        if not parent.is_dir():
            raise GradwatchError(f"cannot write {self.path}: folder {parent} does not exist; create it first")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=parent)
        except OSError as exc:
            raise GradwatchError(f"cannot write {self.path}: {exc.strerror}; choose a writable folder") from None
        self.tmp_path = Path(tmp)
        self._file = os.fdopen(fd, "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        self._writer.writerow(columns)
        self._file.flush()

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            self._writer.writerow([_cell(row[c]) for c in self.columns])
        self._file.flush()

    def commit(self) -> None:
        if self._file.closed:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self.tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give it a normal file's mode
        os.replace(self.tmp_path, self.path)

    def discard(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        self.tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def rows_to_csv(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row[c]) for c in columns])
    return buffer.getvalue()


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or Infinity; `nonfinite` says why the cell is empty
    return value


def rows_to_json(rows: list[dict], columns: list[str]) -> str:
    return json.dumps([{c: _json_value(r[c]) for c in columns} for r in rows], indent=1)


