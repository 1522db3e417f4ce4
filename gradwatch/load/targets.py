"""Targets against the loss, checked before training: one rule for every kind of data.

TensorFlow fails with a kernel trace on some targets that do not fit the loss (a class id
beyond the model's classes) and silently trains on others (a ``(N, 3)`` target broadcast
against a 1-unit output under ``mse``, binary targets outside [0, 1]). :class:`TargetCheck`
sees them before the first step. It is fed a target a chunk of rows at a time, so the same
rule serves an array in memory (one chunk), an ``.npz`` read where it lies and a record stream
(the chunks of the pass that counts it), and memory does not grow with the data.
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import DataError

SPARSE_CLASS_LOSSES = {"sparse_categorical_crossentropy"}
PROBABILITY_LOSSES = {"binary_crossentropy"}
# Losses that compare targets and outputs element by element: their shapes must agree (Keras
# broadcasts a (N, 3) target against a 1-unit output, or a (N,) one against 3 units, silently).
ELEMENTWISE_LOSSES = {
    "mean_squared_error", "mse", "mean_absolute_error", "mae", "mean_absolute_percentage_error", "mape",
    "mean_squared_logarithmic_error", "msle", "huber", "huber_loss", "log_cosh", "logcosh", "binary_crossentropy",
    "binary_focal_crossentropy", "categorical_crossentropy", "categorical_focal_crossentropy",
    "kl_divergence", "kld", "kullback_leibler_divergence", "poisson", "cosine_similarity", "hinge",
    "squared_hinge", "categorical_hinge", "kldivergence",
}
ONE_HOT_LOSSES = {"categorical_crossentropy", "categorical_focal_crossentropy"}


def loss_key(name: str | None) -> str | None:
    """A Keras loss identifier as one name: ``MeanSquaredError``, ``mean_squared_error`` -> ``mean_squared_error``."""
    if not name:
        return None
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(name).strip()).lower()


def first_true(mask: np.ndarray) -> tuple:
    """Index of the first True of a boolean array (in C order)."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask.reshape(-1))), mask.shape))


def indexed(name: str, index: tuple) -> str:
    """``x[5, 2]``: a value's place as the messages name it."""
    return f"{name}[{', '.join(str(int(i)) for i in index)}]"


def in_whole(start: int, at: tuple) -> tuple:
    """The index in the whole array of ``at``, an index in the chunk that begins at row ``start``."""
    return (start + int(at[0]),) + tuple(int(i) for i in at[1:])


class _Found:
    """How many values break a rule, and the first of them (its index in the whole target, its value)."""

    def __init__(self):
        self.count, self.at, self.value = 0, None, None

    def add(self, start: int, chunk: np.ndarray, bad: np.ndarray) -> None:
        count = int(np.count_nonzero(bad))
        if count and self.at is None:
            at = first_true(bad)
            self.at, self.value = in_whole(start, at), chunk[at]
        self.count += count

    def where(self, name: str) -> str:
        return f"{name}{list(self.at)}"


class TargetCheck:
    """One target (``name``: ``y``, or ``y['kind']`` for output ``output`` of several) against
    its loss and the model's output units (``classes``): :meth:`feed` it every chunk of rows,
    then :meth:`finish` raises the first rule the target breaks, as a DataError in the words of
    the data's ``path``. A loss gradwatch does not know by name checks nothing."""

    def __init__(self, path, name: str, loss: str | None, classes: int | None, output: str | None = None):
        self.path, self.name, self.output = path, name, output
        self.loss, self.classes = loss_key(loss), classes
        self.rows, self.row_shape = 0, None
        self.integral, self.binary_rows = True, True  # every value a whole number; every row one-hot
        self.fractional, self.outside = _Found(), _Found()

    @property
    def active(self) -> bool:
        return self.loss is not None

    def feed(self, start: int, chunk) -> None:
        """The rows of the target that begin at row ``start``."""
        y = np.asarray(chunk)
        if not self.active or not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_):
            return
        self.rows += len(y)
        self.row_shape = y.shape[1:]
        if y.size == 0:
            return
        whole = np.ones(y.shape, bool) if not np.issubdtype(y.dtype, np.floating) else y == np.round(y)
        self.integral = self.integral and bool(whole.all())
        if y.ndim >= 2:
            self.binary_rows = self.binary_rows and bool(np.isin(y, (0, 1)).all() and (y.sum(axis=-1) == 1).all())
        if self.loss in SPARSE_CLASS_LOSSES:
            self.fractional.add(start, y, ~whole)
            bad = y < 0
            if self.classes is not None:
                bad = bad | (y >= self.classes)
            self.outside.add(start, y, bad)
        elif self.loss in PROBABILITY_LOSSES:
            self.outside.add(start, y, (y < 0) | (y > 1))

    def finish(self) -> None:
        """Raise the first rule the target broke: its shape against the loss, then its values."""
        if not self.active or self.row_shape is None:
            return
        self._check_shape()
        path, name, loss = self.path, self.name, self.loss
        if self.loss in SPARSE_CLASS_LOSSES:
            if self.fractional.count:
                raise DataError(
                    f"{path}: {loss} needs whole-number class ids, but {self.fractional.where(name)} is "
                    f"{self.fractional.value}; store class ids as integers (or use categorical_crossentropy for "
                    "one-hot/soft targets)")
            if self.outside.count:
                classes = self.classes
                limit = f"[0, {classes}) (the model's last output dimension is {classes})" if classes else "[0, classes)"
                raise DataError(
                    f"{path}: {self.outside.count} class id(s) outside {limit}, the first "
                    f"{self.outside.where(name)} = {self.outside.value}; fix the labels or the model's number of outputs")
        elif self.loss in PROBABILITY_LOSSES and self.outside.count:
            raise DataError(
                f"{path}: {loss} needs targets in [0, 1], but {self.outside.count} are outside, the first "
                f"{self.outside.where(name)} = {float(self.outside.value)}; rescale the labels or pick another --loss")

    def _check_shape(self) -> None:
        classes, loss, path = self.classes, self.loss, self.path
        if classes is None:
            return
        targets = "the targets" if self.output is None else f"the targets y[{self.output!r}]"
        model = "a model" if self.output is None else f"output {self.output!r}"
        last = self.row_shape[-1] if self.row_shape else 1  # a (N,) target is one value a row, as (N, 1)
        integral = self.rows > 0 and self.integral and int(np.prod(self.row_shape, dtype=np.int64)) > 0
        if loss in ONE_HOT_LOSSES and classes == 1:
            raise DataError(f"{loss} over {model} with 1 output unit is 0 for every example (one class always has "
                            "probability 1): use binary_crossentropy for one probability, or give the model one unit "
                            "per class")
        if loss in SPARSE_CLASS_LOSSES and self.row_shape and last == classes > 1 and integral and self.binary_rows:
            raise DataError(f"{path}: {targets} are one-hot rows of {classes} (the model's outputs), but {loss} takes "
                            "class ids: use --loss categorical_crossentropy, or store y.argmax(axis=-1)")
        if loss not in ELEMENTWISE_LOSSES or last == classes:
            return
        if loss in ONE_HOT_LOSSES and last == 1 and integral:
            raise DataError(f"{path}: {targets} are class ids (one a row) but {loss} takes one-hot rows of {classes}; "
                            "use --loss sparse_categorical_crossentropy")
        shape = str((self.rows,) + tuple(int(d) for d in self.row_shape))  # (64,) for one value a row, as NumPy writes it
        raise DataError(f"{path}: {targets} of shape {shape} against {model} with {classes} output unit(s): {loss} "
                        f"would broadcast them and train on a loss you did not mean; give targets with {classes} "
                        "value(s) a row (--y-key / --target), or the model as many outputs as targets")


def for_target(path, name: str, output: str | None, loss, classes) -> TargetCheck:
    """The TargetCheck of target ``name`` (of output ``output``, None for a model's only one);
    ``loss`` and ``classes`` one value, or {output name: value} for a model with several outputs."""
    return TargetCheck(path, name, loss.get(output) if isinstance(loss, dict) else loss,
                       classes.get(output) if isinstance(classes, dict) else classes, output)
