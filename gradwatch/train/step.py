"""ONE measured step: gradients -> measure -> clip -> measure -> what to apply, the next strategy
state and the finite flag.

The trainer's traced step (and its replica step under ``tf.distribute``) and ``GradientWatch``
inside the user's ``fit`` all call :func:`measured_step`; none has its own copy of these rules:

* **Norms.** The recorded ``grad_norm`` is the norm of the gradient that is applied: an
  embedding's ``tf.IndexedSlices`` has its repeated rows summed first (:func:`summed`).
  ``grad_norm_rows`` is the norm measured row by row, as Keras' ``global_clipnorm`` /
  ``clipnorm`` and ``tf.clip_by_global_norm`` measure IndexedSlices: equal to ``grad_norm``
  unless sparse gradients repeat an index.
* **Clipped norms** are those of what the optimizer gets, in float64: a strategy that scales
  whole gradients gives its factor and they are the gradient norms times it (no second pass
  over the gradients); ``value`` and AGC have them measured (:func:`_clipped_norms`). A
  threshold of 1e-25 records 1e-25, not the 0 of squaring such values in float32.
* **What the strategy clips** (``sparse_norm``): ``"summed"`` (default) gives it the summed
  gradient; ``"rows"`` the raw rows, so a threshold is the number to type into Keras'
  ``compile(global_clipnorm=...)`` and ``value`` clips each raw row as ``clipvalue`` does.
* **What the optimizer gets** is what ``fit`` would hand it: an IndexedSlices keeps its raw
  rows (Adam-family optimizers square the rows one by one), each scaled, element by element,
  by the factor the strategy applied to the summed row (``clipped / summed``), so the raw rows
  still add up to the clipped summed gradient. For every scaling strategy (global, norm,
  avg-norm, AGC, AutoClip, ZClip) that is the strategy's own scale; for ``value`` it is the
  summed row's clip spread over its repeats in proportion.
* **Non-finite** (Optax's ``apply_if_finite``): a step is finite when its loss and its gradient
  norm are. A non-finite step never reaches the strategy's state (the next state is the old
  one), and whoever applies the update skips it unless ``on_nonfinite == "apply"``.

TensorFlow is imported inside the functions, so that importing this module stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..clip.base import map_values, norms, norms64, scaled_norms, summed, values_of

SPARSE_NORMS = ("summed", "rows")
ON_NONFINITE = ("skip", "apply", "stop")


@dataclass
class Measured:
    """What one step measured and what it hands on (tensors)."""

    apply: list  # the gradients to hand the optimizer, in the form fit hands them (raw rows)
    finite: Any  # scalar bool: loss and gradient norm finite
    grads_finite: Any  # scalar bool: the gradient norm alone (dynamic loss scaling reads it)
    grad_norm: Any  # float64: the true (summed) global norm before clipping
    grad_norm_rows: Any  # float64: the global norm measured by raw rows (Keras' and tf.clip_by_global_norm's)
    clipped_norm: Any  # float64: the true global norm of what is applied (see _clipped_norms)
    threshold: Any  # float64: the strategy's threshold this step (NaN: none)
    clipped: Any  # scalar bool: did the strategy change anything
    state: tuple  # the strategy's next state (the old one on a non-finite step)
    grad_norms: Any  # per gradient, the true norms before clipping (same reduction as grad_norm)
    clipped_norms: Any  # and after
    summed: list = field(default_factory=list)  # the summed gradients (histograms look at these)


def unscale(grads, scale):
    """Gradients of a loss multiplied by ``scale`` (dynamic loss scaling), divided by it again."""
    import tensorflow as tf

    return [map_values(g, lambda t: t / tf.cast(scale, t.dtype)) for g in grads]


def measured_step(grads, variables, strategy, param, state, loss, sparse_norm: str = "summed") -> Measured:
    """The one measured step over the gradients of ``variables`` (dense tensors and raw
    ``tf.IndexedSlices``, already all-reduced under a strategy and unscaled under loss scaling).

    ``strategy`` is a clipping strategy (:mod:`gradwatch.clip`), ``param`` its parameter (a
    float64 tensor, cast here to the gradients' dtype), ``state`` its state; ``loss`` the step's
    loss (only its finiteness is read here).
    """
    import tensorflow as tf

    if sparse_norm not in SPARSE_NORMS:
        raise ValueError(f"sparse_norm must be one of {SPARSE_NORMS}, got {sparse_norm!r}")
    pairs = [summed(g) for g in grads]
    true = [s for s, _ in pairs]
    grad_norm, grad_norms = norms(true)
    sparse = any(p is not None for _, p in pairs)
    grad_norm_rows = norms(grads)[0] if sparse else grad_norm
    rows = sparse_norm == "rows"
    # The parameter in the gradients' own dtype, as tf.clip_by_*(grads, 5.0) converts a Python
    # float: float32 for nearly every model, float64 for a model built under a float64 policy.
    param = tf.cast(param, values_of(true[0]).dtype)
    result = strategy.apply(list(grads) if rows else true, param, variables, state)
    if rows:
        applied = list(result.grads)
    else:
        applied = [_hand_on(raw, s, c, p) for raw, (s, p), c in zip(grads, pairs, result.grads)]

    def after():  # the clipped summed gradients
        return [summed(g)[0] for g in applied] if rows else result.grads

    clipped_norm, clipped_norms = _clipped_norms(result, grad_norm, grad_norms, after)
    grads_finite = tf.math.is_finite(grad_norm)
    finite = tf.math.is_finite(tf.cast(loss, tf.float32)) & grads_finite
    # A skipped step leaves the strategy's state as it was: one inf norm must not poison
    # AutoClip's history or ZClip's running mean for the rest of the run.
    next_state = tf.nest.map_structure(lambda new, old: tf.where(finite, new, old), result.state, state)
    threshold = (tf.constant(float("nan"), tf.float64) if result.threshold is None
                 else tf.cast(result.threshold, tf.float64))
    return Measured(
        apply=applied, finite=finite, grads_finite=grads_finite,
        grad_norm=tf.cast(grad_norm, tf.float64), grad_norm_rows=tf.cast(grad_norm_rows, tf.float64),
        # A non-finite step clipped nothing that counts (it is skipped, or applied as it came): never
        # "clipped" beside "nonfinite" in one row.
        clipped_norm=clipped_norm, threshold=threshold, clipped=result.clipped & finite,
        state=next_state, grad_norms=grad_norms, clipped_norms=clipped_norms, summed=true,
    )


def _clipped_norms(result, grad_norm, grad_norms, after):
    """(global, per-gradient) float64 norms of the clipped summed gradients ``after()``.

    A strategy that multiplies whole gradients by a factor says which (``ClipResult.scale``):
    the norms are the gradient norms times it (:func:`~gradwatch.clip.base.scaled_norms`), with
    no pass over the clipped gradients; summing a sparse gradient's rows commutes with scaling
    them, so this holds for either ``sparse_norm``. Any other strategy (value, AGC) has them
    measured, in float64, on a step where it changed something; else they are the gradient norms.
    Either way a small threshold gives the small norm it clipped to, not the 0 that squaring
    its values in float32 would.
    """
    import tensorflow as tf

    if result.scale is not None:
        return scaled_norms(grad_norm, grad_norms, result.scale)
    unchanged = (tf.cast(grad_norm, tf.float64), tf.cast(grad_norms, tf.float64))
    return tf.cond(result.clipped, lambda: norms64(after()), lambda: unchanged)


def _hand_on(raw, summed_grad, clipped, positions):
    """What the optimizer gets of one gradient: the clipped one, or for raw IndexedSlices the
    raw rows scaled by the factor the strategy applied to their summed row."""
    import tensorflow as tf

    if positions is None:
        return clipped
    before, after = summed_grad.values, clipped.values
    zero, one = tf.equal(before, 0), tf.ones_like(before)
    factor = tf.where(zero, one, after / tf.where(zero, one, before))
    return tf.IndexedSlices(raw.values * tf.gather(factor, positions), raw.indices, raw.dense_shape)


def applies(finite, on_nonfinite: str):
    """Does the update go to the optimizer? Only on a finite step, unless asked to apply anyway."""
    import tensorflow as tf

    return tf.constant(True) if on_nonfinite == "apply" else finite


def forward_state(variables) -> list:
    """Of a model's variables, the non-trainable ones its forward pass may update (BatchNorm's
    moving statistics, ...): a skipped step puts them back. Random-seed states are left out:
    the next step draws new dropout masks, as it would after any other step."""
    return [v for v in variables if not getattr(v, "trainable", False) and not _is_seed_state(v)]


def _is_seed_state(variable) -> bool:
    name = getattr(variable, "path", None) or getattr(variable, "name", "")
    return "seed_generator_state" in str(name)


# Dynamic loss scaling, as keras.optimizers.LossScaleOptimizer: start, growth interval.
INITIAL_LOSS_SCALE = 2.0**15
LOSS_SCALE_GROWTH_STEPS = 2000


def next_loss_scale(scale, good_steps, grads_finite):
    """LossScaleOptimizer's rule: halve on non-finite gradients, double after 2000 good steps.
    Returns ``(new scale, new count of good steps)``."""
    import tensorflow as tf

    grow = good_steps >= LOSS_SCALE_GROWTH_STEPS - 1
    factor = tf.where(grads_finite, tf.where(grow, 2.0, 1.0), 0.5)
    good = tf.where(grads_finite & tf.logical_not(grow), good_steps + 1, tf.zeros_like(good_steps))
    return scale * tf.cast(factor, scale.dtype), good


def nonfinite_kinds(finite, grads_finite, loss, scaling: bool):
    """``(overflow, nonfinite)`` of a step, each counted once: under loss scaling a finite loss
    with a non-finite gradient is an overflow (the scale is too high, the step is skipped and
    the scale halved), not a non-finite step."""
    import tensorflow as tf

    if not scaling:
        return tf.constant(False), tf.logical_not(finite)
    overflow = tf.math.is_finite(tf.cast(loss, tf.float32)) & tf.logical_not(grads_finite)
    return overflow, tf.logical_not(finite) & tf.logical_not(overflow)
