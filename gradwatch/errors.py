"""The errors gradwatch raises for bad input; each message says what is wrong and how to fix it."""


class GradwatchError(Exception):
    """A problem with the user's input: the CLI prints the message on one line and exits 2."""

    exit_code = 2


class ModelError(GradwatchError):
    """The model path, its endpoint or its variables cannot be used."""


class DataError(GradwatchError):
    """The data file cannot be read or does not fit the model."""


class OptionError(GradwatchError):
    """An option value is out of range or inconsistent with the others."""


def blank(value) -> str | None:
    """The rule for text that says nothing: 'empty' or 'only spaces', else None. Such text is a
    mistake, never a value (an unset shell variable, a stray pair of quotes)."""
    if isinstance(value, str) and not value.strip():
        return "empty" if value == "" else "only spaces"
    return None


def refuse_blank(name: str, value) -> None:
    """A keyword of the Python API or GradientWatch given as :func:`blank` text (the CLI words the
    same rule for its arguments, cli._refuse_blank)."""
    if blank(value):
        raise OptionError(f"`{name}` is {blank(value)}; give it a value or leave it out")


class NonFiniteStop(GradwatchError):
    """`--on-nonfinite stop` met a non-finite loss or gradient."""

    exit_code = 3


class OutputError(GradwatchError):
    """Writing an output failed (disk full, I/O error, permission): exit 74, sysexits' EX_IOERR.

    Not 2: the input was fine, the machine could not take the output.
    """

    exit_code = 74


class BrokenPipe(Exception):
    """Whoever read standard output stopped reading (``gradwatch ... | head``): end quietly."""


class Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP outside a training block: unwinds like Ctrl-C (exit 128 + signal)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP during training; ``results`` holds every row recorded so far
    (and, raised by :func:`gradwatch.run` or :func:`gradwatch.compare`, ``rows`` the frame of them).

    A KeyboardInterrupt, as Ctrl-C is everywhere in Python: ``except Exception`` does not swallow
    it, ``except KeyboardInterrupt`` catches it. The CLI's exit code is 128 + the signal's
    number (``signum``): 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP.
    """

    def __init__(self, results: list, signum: int = 2):
        super().__init__("interrupted")
        self.results = results
        self.signum = signum
        self.rows = None

    def __str__(self) -> str:
        from .signals import signal_name

        kept = sum(len(r.rows) for r in self.results)
        where = "; they are in this exception's .rows" if self.rows is not None else ""
        return f"interrupted by {signal_name(self.signum)} after {counted(kept, 'recorded step')}{where}"


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``1 row``, ``3 rows``: a count and its noun (the plural with -s unless given), as every
    message writes it."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"


def one_line(message: str) -> str:
    """Fold a message onto one line (error texts from TF and files may contain newlines)."""
    return " ".join(str(message).split())


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), to quote in an error."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
