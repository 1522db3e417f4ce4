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


@contextmanager
def deferred_interrupt():
    """Ctrl-C, SIGTERM or SIGHUP during a block sets a flag instead of raising inside TensorFlow's call.

    The block then finishes, its rows are recorded, and the loop stops with
    :class:`Interrupted` carrying the signal: nothing that was computed is lost. The flag
    reads as the signal's number (0: none). Outside the main thread (where signal handlers
    cannot be set) signals act as usual.
    """
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return
    numbers = [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]
    previous = {n: signal.signal(n, lambda signum, frame: seen.append(signum)) for n in numbers}
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
    (see ``training._deferred_interrupt``)."""

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

        for name in ("SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                number = getattr(signal, name)
                self.previous[number] = signal.signal(number, unwind)
        self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, interrupt)
        return self

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        return False


class PendingInterrupt:
    """Ctrl-C inside someone else's loop (a Keras ``fit`` that GradientWatch watches): noted by the
    handler, raised by the loop's own code at its next safe point (:meth:`raise_if_pending`).

    Python's own handler raises KeyboardInterrupt wherever the main thread happens to be; inside
    ``fit`` that was once in 40 tries somewhere that swallowed it, and training went on. Noted
    instead, it cannot be lost. A second Ctrl-C, or one that comes when ``running(frame)`` says
    the loop is no longer on the stack (it ended by an error before it could uninstall this),
    raises at once as usual. Installed only in the main thread and only over Python's default
    handler (a handler someone else set is left alone).
    """

    def __init__(self, running):
        self.running = running  # running(frame) -> bool: is the loop on the interrupted stack?
        self.seen = False
        self._installed = False

    def install(self) -> None:
        self.seen = False
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return
        signal.signal(signal.SIGINT, self._handler)
        self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            self._installed = False
            if signal.getsignal(signal.SIGINT) == self._handler:
                signal.signal(signal.SIGINT, signal.default_int_handler)

    def _handler(self, signum, frame):
        if self.seen or not self.running(frame):
            self.uninstall()
            raise KeyboardInterrupt
        self.seen = True

    def raise_if_pending(self, before=None) -> None:
        """If a Ctrl-C was noted: uninstall, call ``before()`` (keep what was recorded), raise KeyboardInterrupt."""
        if self.seen:
            self.seen = False
            self.uninstall()
            if before is not None:
                before()
            raise KeyboardInterrupt
