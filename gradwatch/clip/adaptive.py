"""Adaptive clipping: strategies that choose their threshold from the training itself.

* :class:`AGC` — Adaptive Gradient Clipping (Brock et al. 2021, NFNets; Optax ``adaptive_grad_clip``);
* :class:`AutoClip` — the p-th percentile of every global norm so far (Seetharaman et al. 2020);
* :class:`ZClip` — a z-score spike detector on an EMA of the global norm (Kumar et al. 2025).

Each follows the contract of :mod:`gradwatch.clip.base`; their state is explicit tensors that
the training loop carries across blocks of steps (and leaves untouched on a non-finite step).
All statistics are kept in float64, as the NumPy / Python references compute them.
"""

from __future__ import annotations

from .base import ClipResult, _any, global_norm, map_values, values_of

AGC_EPS = 1e-3  # Optax's `eps`: weights smaller than this count as this (a zero-initialised bias can still move)
AGC_DIV_EPS = 1e-6  # Optax's `div_eps` in unitwise_clip

AUTOCLIP_CAP = 1 << 16  # norms kept exactly; beyond, the most recent AUTOCLIP_CAP (see AutoClip)

ZCLIP_WARMUP = 25
ZCLIP_ALPHA = 0.97
ZCLIP_EPS = 1e-6


def unit_axes(shape) -> tuple | None:
    """Axes of a unit-wise norm for a parameter of this static shape (Optax's ``unitwise_norm``).

    ``None`` means the whole tensor: scalars and vectors (biases), and any tensor that is a
    vector once its size-1 dimensions are squeezed (Optax squeezes before looking at the rank).
    Rank 2 and 3 (Dense kernels in x out, multi-head kernels): over axis 0, one norm per output
    unit. Rank 4 (conv kernels HWIO): over axes (0, 1, 2), one norm per output channel.
    """
    dims = list(shape)
    if sum(1 for d in dims if d != 1) <= 1:
        return None
    if len(dims) in (2, 3):
        return (0,)
    if len(dims) == 4:
        return (0, 1, 2)
    raise ValueError(f"AGC has no unit-wise norm for rank-{len(dims)} parameters (shape {dims})")


def _unit_norm(tensor, axes):
    import tensorflow as tf

    squared = tf.square(tensor)
    if axes is None:
        return tf.sqrt(tf.reduce_sum(squared))
    return tf.sqrt(tf.reduce_sum(squared, axis=axes, keepdims=True))


class AGC:
    """Adaptive Gradient Clipping, unit-wise, as Optax's ``adaptive_grad_clip(λ, eps=1e-3)``.

    For each parameter W with gradient G and unit-wise norms ‖·‖ᵤ (:func:`unit_axes`):
    max = λ · max(‖W‖ᵤ, 1e-3); G ← G where ‖G‖ᵤ < max, else G · max / max(‖G‖ᵤ, 1e-6).
    Embedding gradients (IndexedSlices) are clipped on their stored rows: rows not in the
    batch are zero and add nothing to a norm, so this equals clipping the dense gradient.
    The recorded threshold is λ (the bounds themselves are one per unit).
    """

    name = "agc"
    option = "factor"
    default = 0.01
    upper = None
    summary = "AGC (Brock et al. 2021): scale each unit's gradient to at most λ × its weight norm"

    def init(self, variables):
        for v in variables:
            unit_axes(v.shape)  # fail early, with the shape, on a rank AGC does not define
        return ()

    def apply(self, grads, threshold, variables, state):
        import tensorflow as tf

        clipped, changed = [], []
        for g, v in zip(grads, variables):
            axes = unit_axes(v.shape)
            weight = tf.cast(tf.convert_to_tensor(v), values_of(g).dtype)
            bound = threshold * tf.maximum(_unit_norm(weight, axes), AGC_EPS)
            g_norm = _unit_norm(values_of(g), axes)
            scale = bound / tf.maximum(g_norm, AGC_DIV_EPS)
            keep = g_norm < bound
            clipped.append(map_values(g, lambda vals, k=keep, s=scale: tf.where(k, vals, vals * s)))
            changed.append(tf.reduce_any(g_norm > bound))
        return ClipResult(clipped, _any(changed), state, tf.cast(threshold, tf.float64))


class AutoClip:
    """AutoClip: clip by global norm to the p-th percentile of every global norm so far, the
    current step's included (linear interpolation, as NumPy's default ``np.percentile``).

    The history is state: a sorted buffer of the norms (exact percentiles), as long as the run
    (each step costs a few passes over it). Up to ``AUTOCLIP_CAP`` (65,536) steps the percentile
    is over the whole history, exactly as the paper; a longer run also keeps the norms in step
    order (a ring), and the oldest norm leaves as a new one comes, so the percentile is over the
    most recent 65,536 steps. Memory: at most 1 MB, whatever the run's length.
    """

    name = "autoclip"
    option = "percentile"
    default = 10.0
    upper = 100.0
    summary = "AutoClip (Seetharaman et al. 2020): clip by global norm to the p-th percentile of all norms so far"

    takes_steps = True  # init() gets the run's length: the buffer is no larger than the run

    def __init__(self, cap: int = AUTOCLIP_CAP):
        self.cap = cap

    def init(self, variables, steps: int | None = None):
        import tensorflow as tf

        size = min(self.cap, steps) if steps else self.cap
        sorted_norms = tf.fill([size], tf.constant(float("inf"), tf.float64))  # ascending, +inf where empty
        count = tf.constant(0, tf.int64)  # how many norms were seen
        if steps is not None and steps <= self.cap:
            return (sorted_norms, count)  # the whole run fits: no norm ever leaves
        return (sorted_norms, tf.zeros([size], tf.float64), count)  # + the same norms in step order (a ring)

    def apply(self, grads, threshold, variables, state):
        import tensorflow as tf

        ordered, count = state[0], state[-1]
        ring = state[1] if len(state) == 3 else None
        norm = global_norm(grads)
        g = tf.cast(norm, tf.float64)
        size = ordered.shape[0]
        index = tf.range(size, dtype=tf.int64)
        inf = tf.constant([float("inf")], tf.float64)
        if ring is not None:
            # Full: the oldest norm leaves the sorted buffer (shift left over its place).
            slot = count % size
            oldest = ring[slot]
            at = tf.reduce_sum(tf.cast(ordered < oldest, tf.int64))
            shifted_left = tf.concat([ordered[1:], inf], 0)
            ordered = tf.where((count >= size) & (index >= at), shifted_left, ordered)
            ring = tf.tensor_scatter_nd_update(ring, [[slot]], [g])
        # The new norm goes in at its sorted place (shift right after it).
        at = tf.reduce_sum(tf.cast(ordered < g, tf.int64))
        shifted_right = tf.concat([inf, ordered[:-1]], 0)
        ordered = tf.where(index < at, ordered, tf.where(index == at, g, shifted_right))
        count = count + 1
        n = tf.minimum(count, size)
        limit = _percentile_sorted(ordered, n, tf.cast(threshold, tf.float64))
        # tf.clip_by_global_norm's scale, N / max(g, N), but 1 when nothing exceeds (0 / 0 for zero gradients)
        clip = g > limit
        clipped, factor = _scaled(grads, tf.where(clip, limit / g, tf.constant(1.0, tf.float64)))
        new_state = (ordered, count) if ring is None else (ordered, ring, count)
        return ClipResult(clipped, clip, new_state, limit, scale=factor)


def _scaled(grads, scale):
    """(every gradient times one float64 scale cast to the gradients' dtype, that factor);
    IndexedSlices kept sparse."""
    import tensorflow as tf

    factor = tf.cast(scale, values_of(grads[0]).dtype)
    return [map_values(grad, lambda v: v * factor) for grad in grads], factor


def _percentile_sorted(ordered, n, percentile):
    """``np.percentile(ordered[:n], percentile)`` (method "linear"), for an ascending buffer."""
    import tensorflow as tf

    position = (percentile / 100.0) * tf.cast(n - 1, tf.float64)
    below = tf.floor(position)
    t = position - below
    lo = tf.cast(below, tf.int64)
    hi = tf.minimum(lo + 1, n - 1)
    a, b = ordered[lo], ordered[hi]
    diff = b - a
    # NumPy's _lerp: from the nearer end, so the result is exact at t = 0 and t = 1.
    return tf.where(t >= 0.5, b - diff * (1.0 - t), a + diff * t)


class ZClip:
    """ZClip (Kumar et al. 2025; bluorion-com/ZClip, mode "zscore", clip_option "adaptive_scaling").

    Warm-up: the first 25 steps are not clipped; their global norms give the mean μ and the
    population variance σ². After: z = (g − μ) / (σ + 1e-6); if z > Z the threshold is
    μ + Z·σ / (z / Z) and the gradients are scaled by threshold / (g + 1e-6); else nothing
    changes. Then μ ← α·μ + (1 − α)·e and σ² ← α·σ² + (1 − α)·(e − μ)² with the new μ, where e
    is the threshold when clipped, else g; α = 0.97. The reference's optional extra cap
    (``max_grad_norm``) is not applied: ZClip alone.

    Recorded threshold: when it clips, the norm it clipped to; when not, the norm above which
    it would have (μ + Z·(σ + 1e-6)); during warm-up none (empty).
    """

    name = "zclip"
    option = "z"
    default = 2.5
    upper = None
    summary = "ZClip (Kumar et al. 2025): clip global-norm spikes whose z-score against an EMA exceeds Z"

    def init(self, variables):
        import tensorflow as tf

        zero = tf.constant(0.0, tf.float64)
        return (zero, zero, tf.zeros([ZCLIP_WARMUP], tf.float64), tf.constant(0, tf.int64))

    def apply(self, grads, threshold, variables, state):
        import tensorflow as tf

        mean, var, warmup, count = state
        z_max = tf.cast(threshold, tf.float64)
        norm = global_norm(grads)
        g = tf.cast(norm, tf.float64)
        warming = count < ZCLIP_WARMUP
        # Warm-up: collect the norm; at the last warm-up step, start the statistics from them.
        warmup = tf.where(tf.range(ZCLIP_WARMUP, dtype=tf.int64) == count, g, warmup)
        starts = count == ZCLIP_WARMUP - 1
        first_mean = tf.reduce_mean(warmup)
        first_var = tf.reduce_mean(tf.square(warmup - first_mean))
        # After warm-up: the z-score test and adaptive scaling.
        std = tf.sqrt(var)
        z = (g - mean) / (std + ZCLIP_EPS)
        spike = tf.logical_not(warming) & (z > z_max)
        limit = mean + (z_max * std) / (z / z_max)
        clip = spike & (g > limit)
        scale = tf.where(clip, limit / (g + 1e-6), tf.constant(1.0, tf.float64))
        effective = tf.where(spike, limit, g)
        new_mean = ZCLIP_ALPHA * mean + (1.0 - ZCLIP_ALPHA) * effective
        new_var = ZCLIP_ALPHA * var + (1.0 - ZCLIP_ALPHA) * tf.square(effective - new_mean)
        mean = tf.where(warming, tf.where(starts, first_mean, mean), new_mean)
        var = tf.where(warming, tf.where(starts, first_var, var), new_var)
        clipped, factor = _scaled(grads, scale)
        boundary = state[0] + z_max * (tf.sqrt(state[1]) + ZCLIP_EPS)
        nan = tf.constant(float("nan"), tf.float64)
        recorded = tf.where(warming, nan, tf.where(spike, limit, boundary))
        return ClipResult(clipped, clip, (mean, var, warmup, count + 1), recorded, scale=factor)
