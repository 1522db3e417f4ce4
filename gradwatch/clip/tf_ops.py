"""TensorFlow's clippers as strategies: none, value, norm, avg-norm, global."""

from __future__ import annotations

from .base import ClipResult, _any, map_values, values_of


class NoClip:
    """The unclipped baseline: gradients pass through unchanged."""

    name = "none"
    option = None
    default = None
    upper = None
    summary = "no clipping (the baseline)"

    def init(self, variables):
        return ()

    def apply(self, grads, threshold, variables, state):
        return ClipResult(list(grads), _any([]), state, None, scale=1.0)


class ClipByValue:
    """Element-wise ``tf.clip_by_value(g, -V, V)``.

    After deduplication this equals clipping the dense gradient, whose untouched rows are 0.
    """

    name = "value"
    option = "value"
    default = None
    upper = None
    summary = "tf.clip_by_value(g, -V, V) on every element"

    def init(self, variables):
        return ()

    def apply(self, grads, threshold, variables, state):
        import tensorflow as tf

        clipped = [map_values(g, lambda v: tf.clip_by_value(v, -threshold, threshold)) for g in grads]
        changed = [tf.reduce_any(tf.abs(values_of(g)) > threshold) for g in grads]
        return ClipResult(clipped, _any(changed), state, threshold)


class ClipByNorm:
    """Per tensor, ``tf.clip_by_norm(g, N)``: g * N / ‖g‖ where ‖g‖ > N; below it g itself."""

    name = "norm"
    option = "norm"
    default = None
    upper = None
    summary = "tf.clip_by_norm(g, N) on each tensor separately"

    def init(self, variables):
        return ()

    def apply(self, grads, threshold, variables, state):
        import tensorflow as tf

        clipped, changed, scales = [], [], []
        for g in grads:
            norm = tf.norm(values_of(g))
            over = norm > threshold
            # Below the threshold the gradient is left as it is: clip_by_norm's t * g / t can round,
            # and flushes elements near float32's smallest normal number to zero.
            by_norm = values_of(tf.clip_by_norm(g, threshold))
            clipped.append(map_values(g, lambda v, c=by_norm, o=over: tf.where(o, c, v)))
            changed.append(over)
            scales.append(tf.where(over, tf.cast(threshold / norm, tf.float64), tf.constant(1.0, tf.float64)))
        return ClipResult(clipped, _any(changed), state, threshold, scale=tf.stack(scales))


class ClipByAverageNorm:
    """TF1's ``clip_by_average_norm``: per tensor, g * N * min(size(g) / ‖g‖, 1 / N).

    The average norm is ‖g‖ / size(g), with size the number of elements of the dense
    gradient. TF2 keeps the op only under ``tf.compat.v1``; this is the same formula.
    """

    name = "avg-norm"
    option = "norm"
    default = None
    upper = None
    summary = "TF1 clip_by_average_norm: scale g when ‖g‖ / size(g) > N"

    def init(self, variables):
        return ()

    def apply(self, grads, threshold, variables, state):
        import tensorflow as tf

        clipped, changed, scales = [], [], []
        for g in grads:
            values = values_of(g)
            shape = g.dense_shape if isinstance(g, tf.IndexedSlices) else tf.shape(g)
            size = tf.cast(tf.reduce_prod(shape), values.dtype)
            inv_norm = tf.math.rsqrt(tf.reduce_sum(values * values))
            scale = threshold * tf.minimum(inv_norm * size, 1.0 / threshold)
            clipped.append(map_values(g, lambda v, s=scale: v * s))
            changed.append(tf.norm(values) / size > threshold)
            scales.append(tf.cast(scale, tf.float64))
        return ClipResult(clipped, _any(changed), state, threshold, scale=tf.stack(scales))


class ClipByGlobalNorm:
    """``tf.clip_by_global_norm(grads, N)``: all gradients scaled by N / max(global norm, N).

    The strategy of the PTB LSTM of Zaremba et al. (``max_grad_norm`` 5 or 10), after
    Pascanu et al. 2013, "On the difficulty of training recurrent neural networks".
    """

    name = "global"
    option = "norm"
    default = None
    upper = None
    summary = "tf.clip_by_global_norm(grads, N) on all gradients together"

    def init(self, variables):
        return ()

    def apply(self, grads, threshold, variables, state):
        import tensorflow as tf

        clipped, norm = tf.clip_by_global_norm(grads, threshold)
        # The factor tf.clip_by_global_norm multiplied every gradient by, as it computes it (NaN
        # where the norm is not finite).
        scale = threshold * tf.minimum(1.0 / norm, 1.0 / threshold) + (norm - norm)
        return ClipResult(list(clipped), norm > threshold, state, threshold, scale=scale)
