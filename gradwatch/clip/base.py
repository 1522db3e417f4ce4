"""The strategy contract and the gradient helpers every strategy uses.

Every strategy is a small object with two methods, in the manner of Optax's gradient
transformations:

* ``init(variables) -> state`` builds the strategy's explicit state (a tuple, empty for the
  stateless TensorFlow clippers);
* ``apply(grads, param, variables, state) -> ClipResult`` returns the clipped gradients,
  a boolean "did this change anything", the new state and the threshold it used this step
  (``param`` is the strategy's one parameter, a float32 tensor: N, V, λ, p or Z).

A strategy whose state should be sized to the run sets ``takes_steps = True``; its ``init``
then also gets ``steps=`` (the run's length). Class attributes describe the parameter to the
command line: ``option`` (its name, e.g.
``norm``), ``default`` (None: it must be given) and ``upper`` (an inclusive upper bound, or None).

``grads`` is a list of dense tensors and ``tf.IndexedSlices``. The training step deduplicates
IndexedSlices (see :func:`dedupe`) before a strategy sees them, so ``values`` hold the true
summed gradient rows and every norm below is the norm of the real gradient.

TensorFlow is imported inside the functions so that the CLI's ``--help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ClipResult:
    grads: list
    clipped: Any  # scalar bool tensor: did the strategy change any gradient?
    state: tuple = ()
    threshold: Any = None  # scalar: the threshold the strategy used this step (None: none, recorded as NaN)


def dedupe(grad):
    """Sum the rows of an IndexedSlices that share an index; dense tensors pass through.

    Embedding gradients repeat an index once per occurrence of a token in the batch. TF's
    ``global_norm`` squares those rows separately, which is not the norm of the gradient
    that is applied (the rows are summed). Summing them first gives the true norm without
    densifying the embedding matrix.
    """
    return summed(grad)[0]


def summed(grad):
    """``(dedupe(grad), positions)``: ``positions[i]`` is the summed row that raw row ``i`` of an
    IndexedSlices went into; a dense gradient is itself, with no positions (None)."""
    import tensorflow as tf

    if not isinstance(grad, tf.IndexedSlices):
        return grad, None
    unique, positions = tf.unique(grad.indices)
    values = tf.math.unsorted_segment_sum(grad.values, positions, tf.shape(unique)[0])
    return tf.IndexedSlices(values, unique, grad.dense_shape), positions


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


def norms(grads):
    """(global L2 norm, each gradient's L2 norm) from one reduction: the global norm is computed
    exactly as ``tf.linalg.global_norm`` does (√(2·Σ l2_loss)), the per-gradient norms from the
    same terms (√(2·l2_loss)), so √Σ per-gradient² is the global norm."""
    import tensorflow as tf

    half = tf.stack([tf.nn.l2_loss(values_of(g)) for g in grads])
    return tf.sqrt(tf.reduce_sum(half) * 2.0), tf.sqrt(half * 2.0)


def global_norm(grads):
    """L2 norm of all gradients together (after :func:`dedupe`, the true norm)."""
    import tensorflow as tf

    return tf.linalg.global_norm([values_of(g) for g in grads])


def _any(flags):
    import tensorflow as tf

    return tf.reduce_any(tf.stack(flags)) if flags else tf.constant(False)


