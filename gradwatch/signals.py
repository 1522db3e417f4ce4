"""Ctrl-C, SIGTERM and SIGHUP: deferred to the end of a training block, unwound like Ctrl-C elsewhere.

Both keep every recorded row: a signal during a block lets the block finish (its rows are
written); outside a block the CLI unwinds so its outputs are committed or cleaned up. The exit
code is 128 + the signal's number.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from .errors import Signalled

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # what a user, `timeout`, a scheduler or a closed terminal send
_NAMES = {2: "Ctrl-C", 15: "SIGTERM", 1: "SIGHUP"}


def signal_name(signum: int) -> str:
    """How gradwatch names a stop signal in what it prints: Ctrl-C, SIGTERM, SIGHUP."""
    return _NAMES.get(signum, f"signal {signum}")


def _heeded(names) -> list[int]:
    """The signals among ``names`` that this process does not ignore.

    A signal ignored when gradwatch starts stays ignored: ``nohup`` ignores SIGHUP so that a
    closed terminal does not end the run, and a shell starts background jobs with SIGINT
    ignored so that Ctrl-C reaches only the foreground one.
    """
    numbers = [getattr(signal, name) for name in names if hasattr(signal, name)]
    return [n for n in numbers if signal.getsignal(n) is not signal.SIG_IGN]


@contextmanager
def deferred_interrupt():
    """Ctrl-C, SIGTERM or SIGHUP during a block sets a flag instead of raising inside TensorFlow's call.

    The block then finishes, its rows are recorded, and the loop stops with
    :class:`Interrupted` carrying the signal: nothing that was computed is lost. The flag
    reads as the signal's number (0: none). Outside the main thread (where signal handlers
    cannot be set) signals act as usual, and a signal the process ignores stays ignored.
    """
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return
    previous = {n: signal.signal(n, lambda signum, frame: seen.append(signum)) for n in _heeded(STOP_SIGNALS)}
    try:
        yield lambda: seen[0] if seen else 0
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


received: list[int] = []  # the stop signals received while the CLI ran (stop_signals_unwind)


def first_received() -> int | None:
    """The first stop signal the running command received, if any: libraries on the way (typer,
    TensorFlow's import) turn the exception it raised into exceptions or exit codes of their own."""
    return received[0] if received else None


class stop_signals_unwind:
    """While the CLI runs, SIGTERM and SIGHUP unwind like Ctrl-C (so outputs are kept or
    cleaned up) instead of killing the process on the spot. Training blocks defer them further
    (:func:`deferred_interrupt`). A signal the process ignores (``nohup``) stays ignored."""

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is not threading.main_thread():
            return self

        received.clear()

        def unwind(signum, frame):
            received.append(signum)
            raise Signalled(signum)

        def interrupt(signum, frame):
            received.append(signum)
            raise KeyboardInterrupt

        for number in _heeded(STOP_SIGNALS):
            self.previous[number] = signal.signal(number, interrupt if number == signal.SIGINT else unwind)
        return self

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        return False


class PendingInterrupt:
    """Ctrl-C, SIGTERM or SIGHUP inside someone else's loop (a Keras ``fit`` that GradientWatch
    watches): noted by the handler, acted on by the loop's own code at its next safe point
    (:meth:`raise_if_pending`), after ``before(signum)`` has kept what was recorded.

    Ctrl-C then raises KeyboardInterrupt. Python's own handler raises it wherever the main
    thread happens to be; inside ``fit`` that was once in 40 tries somewhere that swallowed it,
    and training went on. Noted instead, it cannot be lost. SIGTERM and SIGHUP then do what
    they would have done: their default action ends the process (exit status 128 + N), only
    after the rows are kept instead of before. A second signal, or one that comes when
    ``running(frame)`` says the loop is no longer on the stack (it ended by an error before it
    could uninstall this), acts at once. Installed only in the main thread and only over
    Python's defaults (``default_int_handler`` for SIGINT, ``SIG_DFL`` for the others): a handler
    someone else set, or a signal the process ignores, is left alone.
    """

    def __init__(self, running):
        self.running = running  # running(frame) -> bool: is the loop on the interrupted stack?
        self.seen = 0  # the signal noted and not yet acted on (0: none)
        self._installed: dict[int, object] = {}  # signal -> the default handler put back on uninstall

    def install(self) -> None:
        self.seen = 0
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        for number in _heeded(STOP_SIGNALS):
            default = signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL
            if signal.getsignal(number) is default:
                signal.signal(number, self._handler)
                self._installed[number] = default

    def uninstall(self) -> None:
        installed, self._installed = self._installed, {}
        for number, default in installed.items():
            if signal.getsignal(number) == self._handler:
                signal.signal(number, default)

    def _handler(self, signum, frame):
        if self.seen or not self.running(frame):
            self.uninstall()
            _as_without_us(signum)
        self.seen = signum

    def raise_if_pending(self, before=None) -> None:
        """If a signal was noted: uninstall, call ``before(signum)`` (keep what was recorded), then
        raise KeyboardInterrupt (Ctrl-C) or end the process by the signal's default action."""
        if self.seen:
            signum, self.seen = self.seen, 0
            self.uninstall()
            if before is not None:
                before(signum)
            _as_without_us(signum)


def _as_without_us(signum: int) -> None:
    """What a stop signal does where Python's defaults are in place: Ctrl-C raises
    KeyboardInterrupt; SIGTERM and SIGHUP end the process (their default action is back)."""
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    signal.raise_signal(signum)
