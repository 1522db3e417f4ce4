"""--tensorboard DIR: the recorded values as TensorBoard event files, written with tf.summary.

One sub-folder per run (``DIR/none``, ``DIR/global_5``), so ``tensorboard --logdir DIR``
overlays a comparison's variants. Every step: the run's scalars (``SCALARS``) and each
variable's norms (``variables/grad_norm/NAME`` ...); every ``histogram_every`` steps and at the
last step: a histogram of each variable's raw gradient (``gradients/NAME``), bucketed by
``tf.summary.histogram`` itself.
"""

from __future__ import annotations


import re
from pathlib import Path

from ..errors import GradwatchError, OutputError

SCALARS = ("loss", "grad_norm", "clipped_norm", "clip_ratio", "lr", "threshold")
PER_VARIABLE_TAGS = ("grad_norm", "clipped_norm", "weight_norm", "update_norm")
HISTOGRAM_EVERY = 100


def run_folder(strategy: str, param) -> str:
    """The sub-folder of one run: ``none``, ``global_5``, ``agc_0.01``."""
    name = strategy if param is None else f"{strategy}_{param:g}"
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def check_logdir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise GradwatchError(f"--tensorboard {path} is a file; give a folder (it is created if missing)")
    if not path.parent.is_dir():
        raise GradwatchError(f"cannot write {path}: folder {path.parent} does not exist; create it first")


class TensorBoardSink:
    """Event files of one run under ``logdir/run_folder(...)``."""

    def __init__(self, logdir: Path, strategy: str, param, variables: list[str]):
        import tensorflow as tf

        self.path = Path(logdir) / run_folder(strategy, param)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror}") from None
        self.variables = list(variables)
        self._writer = tf.summary.create_file_writer(str(self.path))
        names = list(SCALARS) + [f"variables/{tag}/{v}" for tag in PER_VARIABLE_TAGS for v in self.variables]
        writer = self._writer

        @tf.function(autograph=False)
        def write(step, values):  # one call per step: every scalar of that step
            with writer.as_default(step=step):
                for k, name in enumerate(names):
                    tf.summary.scalar(name, values[k])
            return tf.constant(True)

        self._write = write
        self._scalars = len(SCALARS)

    def write(self, rows: list[dict], norms=None) -> None:
        """One block's rows, and its (n, 4, V) per-variable norms."""
        import numpy as np
        import tensorflow as tf

        width = self._scalars + 4 * len(self.variables)
        for k, row in enumerate(rows):
            values = np.full(width, np.nan, dtype=np.float64)
            values[: self._scalars] = [float(row[name]) for name in SCALARS]
            if norms is not None:
                values[self._scalars:] = np.asarray(norms[k], dtype=np.float64).reshape(-1)
            self._write(tf.constant(int(row["step"]), tf.int64), tf.constant(values))

    def histograms(self, step: int, grads) -> None:
        """Each variable's gradient at ``step`` (NumPy arrays, in the order of ``variables``)."""
        import tensorflow as tf

        with self._writer.as_default(step=step):
            for name, grad in zip(self.variables, grads):
                tf.summary.histogram(f"gradients/{name}", grad)

    def close(self) -> None:
        try:
            self._writer.flush()
            self._writer.close()
        except Exception as exc:  # tf raises its own errors for a full disk
            raise OutputError(f"cannot write {self.path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None


def wants_histogram(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)





class TensorBoardOutput:
    """--tensorboard DIR for a whole command: one TensorBoardSink per run, opened on its first
    rows, closed by commit() or discard() (what was written stays: event files are appended)."""

    def __init__(self, logdir: Path):
        check_logdir(Path(logdir))
        self.logdir = Path(logdir)
        self.kept = None
        self._sinks: dict = {}

    def sink(self, clipping, variables: list[str]) -> TensorBoardSink:
        key = (clipping.strategy, clipping.param)
        if key not in self._sinks:
            self._sinks[key] = TensorBoardSink(self.logdir, clipping.strategy, clipping.param, variables)
        return self._sinks[key]

    def commit(self) -> None:
        for sink in self._sinks.values():
            sink.close()
        self._sinks.clear()

    discard = commit
