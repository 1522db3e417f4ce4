"""Clipping strategies: one contract, one registry, TensorFlow's clip ops underneath.

Every strategy is a small object with two methods, in the manner of Optax's gradient
transformations:

* ``init(variables) -> state`` builds the strategy's explicit state (a tuple, empty for the
  stateless TensorFlow clippers);
* ``apply(grads, threshold, variables, state) -> ClipResult`` returns the clipped gradients,
  a boolean "did this change anything" and the new state.

``grads`` is a list of dense tensors and ``tf.IndexedSlices``. The training step deduplicates
IndexedSlices (see :func:`dedupe`) before a strategy sees them, so ``values`` hold the true
summed gradient rows and every norm below is the norm of the real gradient. The loop never
special-cases a strategy: a new one is one class here and one line in ``STRATEGIES``.

TensorFlow is imported inside the functions so that the CLI's ``--help`` stays fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import OptionError


@dataclass(frozen=True)
class ClipResult:
    grads: list
    clipped: Any  # scalar bool tensor: did the strategy change any gradient?
    state: tuple = ()


def dedupe(grad):
    """Sum the rows of an IndexedSlices that share an index; dense tensors pass through.

    Embedding gradients repeat an index once per occurrence of a token in the batch. TF's
    ``global_norm`` squares those rows separately, which is not the norm of the gradient
    that is applied (the rows are summed). Summing them first gives the true norm without
    densifying the embedding matrix.
    """
    import tensorflow as tf

    if not isinstance(grad, tf.IndexedSlices):
        return grad
    unique, position = tf.unique(grad.indices)
    values = tf.math.unsorted_segment_sum(grad.values, position, tf.shape(unique)[0])
    return tf.IndexedSlices(values, unique, grad.dense_shape)


def values_of(grad):
    """The stored numbers of a gradient: the tensor itself, or an IndexedSlices' rows."""
    import tensorflow as tf

    return grad.values if isinstance(grad, tf.IndexedSlices) else grad


def map_values(grad, fn):
    """Apply ``fn`` to a gradient's stored numbers, keeping IndexedSlices sparse."""
    import tensorflow as tf

    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(fn(grad.values), grad.indices, grad.dense_shape)
    return fn(grad)


def global_norm(grads):
    """L2 norm of all gradients together (after :func:`dedupe`, the true norm)."""
    import tensorflow as tf

    return tf.linalg.global_norm([values_of(g) for g in grads])


def _any(flags):
    import tensorflow as tf

    return tf.reduce_any(tf.stack(flags)) if flags else tf.constant(False)


class NoClip:
    """The unclipped baseline: gradients pass through unchanged."""

    name = "none"
    option = None
    summary = "no clipping (the baseline)"

    def init(self, variables):
        return ()

    def apply(self, grads, threshold, variables, state):
        return ClipResult(list(grads), _any([]), state)


class ClipByValue:
    """Element-wise ``tf.clip_by_value(g, -V, V)``.

    After deduplication this equals clipping the dense gradient, whose untouched rows are 0.
    """

    name = "value"
    option = "value"
    summary = "tf.clip_by_value(g, -V, V) on every element"

    def init(self, variables):
        return ()

    def apply(self, grads, threshold, variables, state):
        import tensorflow as tf

        clipped = [map_values(g, lambda v: tf.clip_by_value(v, -threshold, threshold)) for g in grads]
        changed = [tf.reduce_any(tf.abs(values_of(g)) > threshold) for g in grads]
        return ClipResult(clipped, _any(changed), state)


class ClipByNorm:
    """Per tensor, ``tf.clip_by_norm(g, N)``: g * N / max(‖g‖, N)."""

    name = "norm"
    option = "norm"
    summary = "tf.clip_by_norm(g, N) on each tensor separately"

    def init(self, variables):
        return ()

    def apply(self, grads, threshold, variables, state):
        import tensorflow as tf

        clipped = [tf.clip_by_norm(g, threshold) for g in grads]
        changed = [tf.norm(values_of(g)) > threshold for g in grads]
        return ClipResult(clipped, _any(changed), state)


class ClipByAverageNorm:
    """TF1's ``clip_by_average_norm``: per tensor, g * N * min(size(g) / ‖g‖, 1 / N).

    The average norm is ‖g‖ / size(g), with size the number of elements of the dense
    gradient. TF2 keeps the op only under ``tf.compat.v1``; this is the same formula.
    """

    name = "avg-norm"
    option = "norm"
    summary = "TF1 clip_by_average_norm: scale g when ‖g‖ / size(g) > N"

    def init(self, variables):
        return ()

    def apply(self, grads, threshold, variables, state):
        import tensorflow as tf

        clipped, changed = [], []
        for g in grads:
            values = values_of(g)
            shape = g.dense_shape if isinstance(g, tf.IndexedSlices) else tf.shape(g)
            size = tf.cast(tf.reduce_prod(shape), values.dtype)
            inv_norm = tf.math.rsqrt(tf.reduce_sum(values * values))
            scale = threshold * tf.minimum(inv_norm * size, 1.0 / threshold)
            clipped.append(map_values(g, lambda v, s=scale: v * s))
            changed.append(tf.norm(values) / size > threshold)
        return ClipResult(clipped, _any(changed), state)


class ClipByGlobalNorm:
    """``tf.clip_by_global_norm(grads, N)``: all gradients scaled by N / max(global norm, N).

    The strategy of the PTB LSTM of Zaremba et al. (``max_grad_norm`` 5 or 10), after
    Pascanu et al. 2013, "On the difficulty of training recurrent neural networks".
    """

    name = "global"
    option = "norm"
    summary = "tf.clip_by_global_norm(grads, N) on all gradients together"

    def init(self, variables):
        return ()

    def apply(self, grads, threshold, variables, state):
        import tensorflow as tf

        clipped, norm = tf.clip_by_global_norm(grads, threshold)
        return ClipResult(list(clipped), norm > threshold, state)


STRATEGIES = {s.name: s for s in (NoClip(), ClipByValue(), ClipByNorm(), ClipByAverageNorm(), ClipByGlobalNorm())}


@dataclass(frozen=True)
class Clipping:
    """A strategy with its threshold, validated once at construction."""

    strategy: str
    threshold: float | None = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise OptionError(
                f"unknown clipping strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}"
            )
        option = STRATEGIES[self.strategy].option
        if option is None:
            object.__setattr__(self, "threshold", None)
            return
        if self.threshold is None:
            raise OptionError(f"--clip {self.strategy} needs a threshold: add --{option} N (N > 0)")
        value = float(self.threshold)
        if not math.isfinite(value) or value <= 0:
            raise OptionError(f"`--{option}` must be a finite number > 0. Received: {option}={self.threshold}")
        object.__setattr__(self, "threshold", value)

    @property
    def impl(self):
        return STRATEGIES[self.strategy]

    @property
    def label(self) -> str:
        """Short name of the variant, as tables and the CSV show it: 'global 5', 'none'."""
        return "none" if self.threshold is None else f"{self.strategy} {format_threshold(self.threshold)}"


def format_threshold(value: float | None) -> str:
    """How a threshold appears in tables and CSV cells: 'none', '5', '0.25'."""
    if value is None:
        return "none"
    return f"{value:g}"


def parse_variants(strategies: str, thresholds: str, baseline: bool = True) -> list[Clipping]:
    """`compare`'s variants: every strategy x every threshold; 'none' is the unclipped baseline,
    added first unless ``baseline`` is False or the list names it."""
    names = [s.strip() for s in strategies.split(",")]
    items = [t.strip().lower() for t in thresholds.split(",")]
    if any(not n for n in names):
        raise OptionError(f"--clip {strategies!r} has an empty item; write e.g. --clip global,norm")
    if any(not t for t in items):
        raise OptionError(f"--thresholds {thresholds!r} has an empty item; write e.g. --thresholds none,1,5,10")
    for n in names:
        if n not in STRATEGIES or n == "none":
            raise OptionError(f"--clip {n!r} is not a clipping strategy; choose from {', '.join(s for s in STRATEGIES if s != 'none')}")
    values = []
    for t in items:
        if t == "none":
            continue
        try:
            values.append(float(t))
        except ValueError:
            raise OptionError(f"--thresholds item {t!r} is not a number or 'none'; write e.g. --thresholds none,1,5,10") from None
    variants = [Clipping("none")] if baseline or "none" in items else []
    seen = set()
    for n in names:
        for v in values:
            clipping = Clipping(n, v)
            if (n, clipping.threshold) not in seen:
                seen.add((n, clipping.threshold))
                variants.append(clipping)
    if not variants:
        raise OptionError("nothing to compare: give thresholds, or keep the baseline")
    return variants
