"""Where rows go: CSV files written as the run goes (never half-written over a good file), CSV/JSON text.

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from ..errors import BrokenPipe, GradwatchError, OutputError


def _cell(value) -> str:
    """One CSV cell. Floats round-trip exactly; text that a spreadsheet would run as a
    formula (starting with = + - @) gets a leading quote."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if hasattr(value, "dtype") and hasattr(value, "item"):  # a NumPy scalar
        return _cell(value.item())
    text = "" if value is None else str(value)
    if text[:1] in ("=", "+", "-", "@"):
        text = "'" + text
    return text


PARTIAL_SUFFIX = ".partial"


def check_file_target(option: str, path: Path, example: str) -> None:
    """An output file's path, checked before anything loads: not a folder, in a folder that exists
    (each wrong way named as it is). ``example`` is a file name the fix can suggest."""
    if str(path) == "-":  # Unix tools' standard output: here it would be a file named '-'
        raise GradwatchError(f"{option} -: '-' is not standard output here; give a file name such as {example} "
                             "(--format csv or --format json print the rows on standard output)")
    if path.is_dir():
        raise GradwatchError(f"{option} {path} is a folder; give a file name such as {path / example}")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise GradwatchError(f"cannot write {path}: {parent} is a file, not a folder; give a path in a folder")
    if not parent.is_dir():
        raise GradwatchError(f"cannot write {path}: folder {parent} does not exist; create it first")


def written_in_place(path: Path) -> bool:
    """An output that exists but is not a regular file (/dev/stdout, /dev/full, a FIFO) is written
    directly: it cannot be replaced atomically, and must not be replaced at all."""
    return path.exists() and not path.is_file()


def write_whole(path: Path, write, suffix: str = "") -> None:
    """A file made at once (findings, a plot): ``write(target)`` fills ``target``, a temporary
    file beside ``path`` (ending in ``suffix``) moved over it when complete, so an old file is
    replaced only by a whole new one. A ``path`` that exists but is not a regular file (a
    device such as /dev/full, a FIFO) is written directly, never replaced. OS errors exit 74."""
    direct = written_in_place(path)
    target = path if direct else path.with_name(f".{path.name}{PARTIAL_SUFFIX}{suffix}")
    try:
        write(target)
        if not direct:
            os.replace(target, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if not direct:
            target.unlink(missing_ok=True)


class CsvSink:
    """Writes rows to a CSV as the run goes, without ever leaving a half-written file where a
    good one was, and without losing rows already recorded.

    Rows go to ``TARGET.partial`` beside the target, flushed after every fetched block, so a
    SIGKILL or an out-of-memory kill loses at most one block: what was recorded is in
    ``TARGET.partial`` (``gradwatch report`` reads it). :meth:`commit` (a finished, stopped or
    interrupted run) moves it over the target atomically. :meth:`discard` (an error) removes it
    only when it holds no rows; with rows it stays, and ``kept`` says where.

    A target that exists but is not a regular file (``/dev/stdout``, a FIFO, ``/dev/full``) is
    written directly: it cannot be replaced atomically, and must not be replaced at all.
    A failed write raises :class:`OutputError` (exit 74) naming the path and the OS error.
    """

    def __init__(self, path: str | os.PathLike, columns: list[str], option: str = "--csv"):
        self.path = Path(path)
        self.columns = columns
        self.option = option
        self.rows_written = 0
        self.kept: Path | None = None
        check_file_target(option, self.path, "steps.csv")
        self.direct = written_in_place(self.path)
        self.tmp_path = self.path if self.direct else self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        try:
            if self.direct:
                self._file = open(self.tmp_path, "w", newline="", encoding="utf-8")
            else:
                self._file = _locked(self.tmp_path, self.path, option)
        except OSError as exc:
            raise OutputError(f"cannot write {self.tmp_path}: {exc.strerror}; choose a writable folder for {option}") from None
        self._writer = csv.writer(self._file)
        self._guarded(lambda: self._writer.writerow(columns))

    def _guarded(self, action) -> None:
        try:
            action()
            self._file.flush()
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError):
        self.discard()
        where = f"; the rows written before it are in {self.kept}" if self.kept else ""
        raise OutputError(f"cannot write {self.path}: {exc.strerror}{where}") from None

    def write(self, rows: list[dict]) -> None:
        if self._file.closed:
            return
        self._guarded(lambda: self._writer.writerows([_cell(row[c]) for c in self.columns] for row in rows))
        self.rows_written += len(rows)

    def commit(self) -> None:
        """The run is over: put the rows where the user asked for them."""
        if self._file.closed:
            return

        def finish():
            self._file.flush()
            if not self.direct:
                os.fsync(self._file.fileno())

        self._guarded(finish)
        self._file.close()
        if not self.direct:
            try:
                os.replace(self.tmp_path, self.path)
            except OSError as exc:
                if not self.path.parent.is_dir():
                    raise OutputError(f"cannot write {self.path}: its folder {self.path.parent} was removed while the run "
                                      "wrote into it, and the rows went with it; keep the folder until the run ends") from None
                self.kept = self.tmp_path
                raise OutputError(f"cannot move {self.tmp_path} to {self.path}: {exc.strerror}; the rows are in {self.tmp_path}") from None

    def discard(self) -> None:
        """An error ended the command: remove what holds no rows, keep what does (see ``kept``)."""
        if self._file.closed:
            return
        try:
            self._file.close()
        except OSError:
            pass
        if self.direct:
            return
        if self.rows_written:
            self.kept = self.tmp_path
        else:
            self.tmp_path.unlink(missing_ok=True)


def _locked(partial: Path, target: Path, option: str):
    """``partial`` opened for writing under an exclusive lock, held until it is closed: a second
    gradwatch writing the same output is refused at once instead of mixing its rows in.

    Opened without truncating, so that neither a running run's rows nor an unfinished run's
    are lost before the lock and the check (:func:`_refuse_unfinished`) say it is ours.
    """
    import fcntl

    # A regular open gets the umask's mode, as any new file of the user's would.
    fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise GradwatchError(
            f"another gradwatch is writing {target} now ({partial} is locked); wait for it to finish, "
            f"or give another {option}"
        ) from None
    try:
        _refuse_unfinished(partial, option)
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "w", newline="", encoding="utf-8")


def _refuse_unfinished(partial: Path, option: str) -> None:
    """A ``.partial`` file with rows is what is left of a run that was killed: never overwrite it."""
    if not partial.exists():
        return
    try:
        with partial.open(encoding="utf-8", errors="replace") as handle:
            lines = sum(1 for line, _ in zip(handle, range(2)) if line.strip())
    except OSError:
        lines = 2
    if lines >= 2 or not partial.is_file():
        raise GradwatchError(
            f"{partial} holds the rows of an earlier run that did not finish; read it with "
            f"`gradwatch report {partial}`, then move or delete it (or give another {option})"
        )


def check_outputs(outputs: dict[str, object], inputs: dict[str, object]) -> None:
    """Refuse output paths that are an input, lie inside an input folder, or repeat another output.

    Paths are compared after resolving symlinks, ``..`` and relative parts (and as the same
    file on disk, for hard links), before anything is loaded or written.
    """
    outs = {name: Path(p) for name, p in outputs.items() if p is not None}
    ins = {name: Path(p) for name, p in inputs.items() if p is not None}
    seen: dict[Path, str] = {}
    for name, path in outs.items():
        resolved = path.resolve()
        candidates = (resolved, resolved.with_name(resolved.name + PARTIAL_SUFFIX))  # the file and its .partial
        for candidate in candidates:
            if candidate in seen:
                raise GradwatchError(f"{name} and {seen[candidate]} are the same file ({resolved}); give each output its own path")
        seen[resolved] = name
        for what, source in ins.items():
            src = source.resolve()
            for candidate in candidates:
                clash = candidate == src or _same_file(candidate, src)
                inside = src.is_dir() and src in candidate.parents
                if clash or inside:
                    where = "is" if clash else "is inside"
                    raise GradwatchError(
                        f"{name} {path} {where} the {what} ({src}): gradwatch never writes over its inputs; "
                        f"give {name} a path outside it"
                    )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def write_stdout(text: str) -> None:
    """Write text to standard output and flush: a closed pipe raises :class:`BrokenPipe`, any
    other failure (a full disk behind ``> file``) :class:`OutputError`."""
    with stdout_errors():  # which flushes
        sys.stdout.write(text)


@contextmanager
def stdout_errors():
    """Turn OS errors while writing standard output into :class:`BrokenPipe` / :class:`OutputError`."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        raise BrokenPipe() from None
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise BrokenPipe() from None
        raise OutputError(f"cannot write to standard output: {exc.strerror or exc}") from None


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


def rows_to_json(rows: list[dict], columns: list[str], findings: list[dict] | None = None) -> str:
    """The rows as a JSON list; with ``findings``, ``{"rows": [...], "findings": [...]}``."""
    records = [{c: _json_value(r[c]) for c in columns} for r in rows]
    return json.dumps(records if findings is None else {"rows": records, "findings": findings}, indent=1)


