"""The strategy contract and the gradient helpers every strategy uses.

Every strategy is a small object with two methods, in the manner of Optax's gradient
transformations:

* ``init(variables) -> state`` builds the strategy's explicit state (a tuple, empty for the
  stateless TensorFlow clippers);
* ``apply(grads, param, variables, state) -> ClipResult`` returns the clipped gradients,
  a boolean "did this change anything", the new state, the threshold it used this step
  (``param`` is the strategy's one parameter, N, V, λ, p or Z, a tensor in the gradients' dtype:
  float32 for most models) and, for a strategy that multiplies whole gradients by a factor, that
  factor (``scale``).

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
    # What each gradient was multiplied by: a scalar for all of them (global, AutoClip, ZClip, none)
    # or one per gradient (norm, avg-norm); None where the strategy does not scale whole gradients
    # (value, AGC). The step takes the clipped norms from it (scaled_norms), not from the clipped gradients.
    scale: Any = None


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


def scaled_norms(grad_norm, grad_norms, scale):
    """(global, per-gradient) norms, in float64, of gradients whose norms were ``grad_norm`` and
    ``grad_norms`` once each was multiplied by ``scale`` (a scalar for all, or one per gradient):
    ‖s·g‖ = s·‖g‖. No second pass over the gradients, and no float32 squares to underflow: clipped
    to 1e-25, gradients have the norm 1e-25, where squaring their elements in float32 gives 0.
    Where every factor is 1 the norms are the ones given, unchanged."""
    import tensorflow as tf

    total, each = tf.cast(grad_norm, tf.float64), tf.cast(grad_norms, tf.float64)
    factor = tf.cast(scale, tf.float64)
    if factor.shape.rank == 0:
        return total * factor, each * factor
    scaled = each * factor
    unchanged = tf.reduce_all(tf.equal(factor, 1.0))
    return tf.where(unchanged, total, tf.sqrt(tf.reduce_sum(tf.square(scaled)))), scaled


def norms64(grads):
    """:func:`norms` computed in float64, so that small clipped values do not underflow when squared."""
    import tensorflow as tf

    return norms([tf.cast(values_of(g), tf.float64) for g in grads])


def global_norm(grads):
    """L2 norm of all gradients together (after :func:`dedupe`, the true norm)."""
    import tensorflow as tf

    return tf.linalg.global_norm([values_of(g) for g in grads])


def _any(flags):
    import tensorflow as tf

    return tf.reduce_any(tf.stack(flags)) if flags else tf.constant(False)


