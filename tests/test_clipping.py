"""TensorFlow's clippers against plain tf.clip_by_* / NumPy references, and their properties.

The adaptive strategies have their own references and properties in test_adaptive.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gradwatch.clip import STRATEGIES, Clipping, dedupe, global_norm, parse_variants, values_of
from gradwatch.errors import OptionError

CLIPPERS = [name for name, s in STRATEGIES.items() if type(s).__module__ == "gradwatch.clip.tf_ops" and name != "none"]
NORM_CLIPPERS = [name for name in CLIPPERS if STRATEGIES[name].option == "norm"]


def apply(name, grads, threshold):
    import tensorflow as tf

    tensors = [tf.constant(g, tf.float32) for g in grads]
    result = STRATEGIES[name].apply(tensors, tf.constant(threshold, tf.float32), [], ())
    if name != "none":
        assert float(result.threshold) == pytest.approx(threshold)  # fixed strategies record their constant
    return [np.asarray(tf.convert_to_tensor(g)) for g in result.grads], bool(result.clipped)


def numpy_reference(name, grads, t):
    """The clip formulas written out in float64 NumPy."""
    grads = [np.asarray(g, np.float64) for g in grads]
    if name == "value":
        return [np.clip(g, -t, t) for g in grads]
    if name == "norm":
        return [g * t / max(np.linalg.norm(g), t) for g in grads]
    if name == "avg-norm":
        return [g * t * min(g.size / np.linalg.norm(g), 1 / t) if np.linalg.norm(g) > 0 else g for g in grads]
    if name == "global":
        total = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
        return [g * t / max(total, t) for g in grads]
    raise AssertionError(name)


gradient_lists = st.lists(
    arrays(np.float32, st.integers(1, 6), elements=st.floats(-100, 100, width=32)), min_size=1, max_size=4
)
thresholds = st.floats(0.01, 50.0)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tf_reference(name, grads, t):
    """TensorFlow's own ops, called directly."""
    import tensorflow as tf

    tensors = [tf.constant(g, tf.float32) for g in grads]
    if name == "value":
        return [tf.clip_by_value(g, -t, t).numpy() for g in tensors]
    if name == "norm":
        return [tf.clip_by_norm(g, t).numpy() for g in tensors]
    if name == "global":
        return [g.numpy() for g in tf.clip_by_global_norm(tensors, t)[0]]
    if name == "avg-norm":
        return [tf.compat.v1.clip_by_average_norm(g, t).numpy() for g in tensors]
    raise AssertionError(name)


@pytest.mark.parametrize("name", CLIPPERS)
@SETTINGS
@given(grads=gradient_lists, t=thresholds)
def test_strategy_equals_tensorflow_op_and_numpy(name, grads, t):
    got, _ = apply(name, grads, t)
    for g, ref_tf, ref_np in zip(got, tf_reference(name, grads, t), numpy_reference(name, grads, t)):
        np.testing.assert_allclose(g, ref_tf, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(g, ref_np, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NORM_CLIPPERS)
@SETTINGS
@given(grads=gradient_lists, t=thresholds)
def test_norm_at_most_threshold_after_clipping(name, grads, t):
    got, _ = apply(name, grads, t)
    if name == "global":
        assert math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in got)) <= t * (1 + 1e-5)
    elif name == "norm":
        assert all(np.linalg.norm(g) <= t * (1 + 1e-5) for g in got)
    else:  # avg-norm bounds the average norm ‖g‖ / size
        assert all(np.linalg.norm(g) / g.size <= t * (1 + 1e-5) for g in got)


@pytest.mark.parametrize("name", CLIPPERS)
@SETTINGS
@given(grads=gradient_lists, t=thresholds)
def test_clipping_twice_equals_clipping_once(name, grads, t):
    once, _ = apply(name, grads, t)
    twice, _ = apply(name, once, t)
    for a, b in zip(once, twice):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", CLIPPERS)
@SETTINGS
@given(grads=gradient_lists, t=thresholds)
@example(grads=[np.array([1e-45], np.float32)], t=1.0)  # a denormal: found by hypothesis in CI
@example(grads=[np.array([27.0, 4.484681e-33], np.float32)], t=0.01171875)  # t * g near float32's smallest normal
def test_unchanged_below_threshold(name, grads, t):
    # scale the gradients well below the threshold in the strategy's own measure
    scaled = [np.asarray(g, np.float32) for g in grads]
    if name == "value":
        peak = max(float(np.max(np.abs(g))) for g in scaled)
        measure = peak
    elif name == "avg-norm":
        measure = max(float(np.linalg.norm(g)) / g.size for g in scaled)
    else:
        measure = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in scaled))
    # only ever scale down (a tiny gradient scaled up to t/2 could overflow float32)
    factor = min(1.0, 0.5 * t / measure) if measure > 0 else 1.0
    small = [(g * factor).astype(np.float32) for g in scaled]
    got, clipped = apply(name, small, t)
    assert not clipped
    for a, b in zip(got, small):
        # TF flushes float32 denormals to zero on the CPU: allow the smallest normal number
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=np.finfo(np.float32).tiny)


@pytest.mark.parametrize("name", [n for n in CLIPPERS if n != "value"])
@SETTINGS
@given(grads=gradient_lists, t=thresholds)
def test_direction_is_kept(name, grads, t):
    got, _ = apply(name, grads, t)
    for before, after in zip(grads, got):
        before = before.astype(np.float64)
        n = np.linalg.norm(before)
        if n > 1e-3 and np.linalg.norm(after) > 0:
            cosine = float(np.dot(before, after) / (n * np.linalg.norm(after)))
            assert cosine == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", CLIPPERS)
def test_clipped_flag_says_whether_anything_changed(name):
    big = [np.full(4, 10.0, np.float32), np.full(3, -10.0, np.float32)]
    _, clipped = apply(name, big, 1.0)
    assert clipped
    _, clipped = apply(name, big, 1e6)
    assert not clipped


def test_none_passes_gradients_through():
    grads = [np.arange(5, dtype=np.float32)]
    got, clipped = apply("none", grads, 0.0)
    np.testing.assert_array_equal(got[0], grads[0])
    assert not clipped


@pytest.mark.parametrize("name", CLIPPERS)
def test_indexed_slices_clip_like_their_dense_gradient(name):
    """After dedupe, clipping sparse gradients equals clipping the dense ones (and stays sparse)."""
    import tensorflow as tf

    values = tf.constant([[3.0, -4.0], [1.0, 2.0], [6.0, 0.5]])
    grad = tf.IndexedSlices(values, tf.constant([2, 0, 2]), tf.constant([4, 2]))
    dense_w = tf.constant([[0.5, 0.5]])
    sparse = [dedupe(grad), dense_w]
    dense = [tf.convert_to_tensor(grad), dense_w]
    t = tf.constant(1.5)
    got = STRATEGIES[name].apply(sparse, t, [], ()).grads
    want = STRATEGIES[name].apply(dense, t, [], ()).grads
    assert isinstance(got[0], tf.IndexedSlices)
    np.testing.assert_allclose(tf.convert_to_tensor(got[0]).numpy(), want[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(got[1].numpy(), want[1].numpy(), rtol=1e-6)
    assert float(global_norm(sparse)) == pytest.approx(float(global_norm(dense)), rel=1e-6)


def test_dedupe_sums_repeated_rows():
    import tensorflow as tf

    grad = tf.IndexedSlices(tf.constant([[1.0], [2.0], [4.0]]), tf.constant([5, 1, 5]), tf.constant([6, 1]))
    out = dedupe(grad)
    rows = dict(zip(out.indices.numpy().tolist(), values_of(out).numpy()[:, 0].tolist()))
    assert rows == {5: 5.0, 1: 2.0}


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), None])
def test_bad_threshold_is_rejected_at_construction(bad):
    with pytest.raises(OptionError) as info:
        Clipping("global", bad)
    assert "--norm" in str(info.value)


def test_value_clipping_names_its_option():
    with pytest.raises(OptionError, match="--value"):
        Clipping("value", -2)


def test_parse_variants():
    variants = parse_variants("global,norm", "none,1,5")
    assert [v.label for v in variants] == ["none", "global 1", "global 5", "norm 1", "norm 5"]
    assert [v.label for v in parse_variants("global", "1,5")] == ["none", "global 1", "global 5"]
    assert [v.label for v in parse_variants("global", "1,5", baseline=False)] == ["global 1", "global 5"]
    for clip, thresholds in [("global", "1,,5"), ("global", "1,x"), ("bogus", "1"), ("global", "-1"), ("none", "1")]:
        with pytest.raises(OptionError):
            parse_variants(clip, thresholds)
