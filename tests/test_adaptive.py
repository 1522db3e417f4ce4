"""AGC, AutoClip and ZClip against NumPy ports written from their published descriptions (issue 11),
step by step and end to end, plus their properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from conftest import read_csv
from gradwatch.clip import STRATEGIES, Clipping, dedupe, parse_variant_list
from gradwatch.clip.adaptive import AutoClip, unit_axes
from gradwatch.errors import OptionError

RTOL = 1e-5
ADAPTIVE = ["agc", "autoclip", "zclip"]


# --- NumPy ports, from the descriptions in issue 11 (not from gradwatch's code) ------------------


def np_unit_norm(a, ndim):
    if ndim <= 1:
        return np.sqrt(np.sum(a * a))
    axes = (0,) if ndim in (2, 3) else (0, 1, 2)
    return np.sqrt(np.sum(a * a, axis=axes, keepdims=True))


def np_agc(grads, weights, lam):
    out = []
    for g, w in zip(grads, weights):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        bound = lam * np.maximum(np_unit_norm(w, w.ndim), 1e-3)
        g_norm = np_unit_norm(g, g.ndim)
        out.append(np.where(g_norm < bound, g, g * bound / np.maximum(g_norm, 1e-6)))
    return out


class NpAutoClip:
    def __init__(self, p):
        self.p, self.history = p, []

    def __call__(self, g):
        """-> (scale applied to the gradients, threshold)"""
        self.history.append(g)
        threshold = float(np.percentile(self.history, self.p))
        return threshold / max(g, threshold), threshold


class NpZClip:
    def __init__(self, z, alpha=0.97, warmup=25):
        self.z, self.alpha, self.warmup = z, alpha, warmup
        self.buffer, self.mean, self.var = [], None, None

    def __call__(self, g):
        """-> (scale, threshold: the clip value, else the spike boundary, nan in warm-up)"""
        if self.mean is None:
            self.buffer.append(g)
            if len(self.buffer) == self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((b - self.mean) ** 2 for b in self.buffer) / len(self.buffer)
            return 1.0, math.nan
        std = math.sqrt(self.var)
        zscore = (g - self.mean) / (std + 1e-6)
        if zscore > self.z:
            threshold = self.mean + self.z * std / (zscore / self.z)
            scale, effective, recorded = threshold / (g + 1e-6), threshold, threshold
        else:
            scale, effective, recorded = 1.0, g, self.mean + self.z * (std + 1e-6)
        self.mean = self.alpha * self.mean + (1 - self.alpha) * effective
        self.var = self.alpha * self.var + (1 - self.alpha) * (effective - self.mean) ** 2
        return scale, recorded


def global_norm_np(grads):
    return math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in grads))


# --- strategy level ---------------------------------------------------------------------------


def run_strategy(name, grads_per_step, param, variables=None, strategy=None):
    """Feed gradients step by step through a strategy, carrying its state, as the loop does."""
    import tensorflow as tf

    impl = strategy or STRATEGIES[name]
    variables = variables or [tf.Variable(np.ones_like(g, np.float32)) for g in grads_per_step[0]]
    state = impl.init(variables)
    out = []
    for grads in grads_per_step:
        result = impl.apply([tf.constant(g, tf.float32) for g in grads], tf.constant(param, tf.float32), variables, state)
        state = result.state
        clipped = [np.asarray(tf.convert_to_tensor(g)) for g in result.grads]
        out.append((clipped, bool(result.clipped), float(result.threshold)))
    return out


def spiky_gradients(steps=70, spikes=(30, 31, 47, 60), seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(steps):
        scale = 40.0 if k in spikes else 1.0 + 0.1 * rng.normal()
        out.append([scale * rng.normal(size=(3, 2)), scale * rng.normal(size=(2,))])
    return out


@pytest.mark.parametrize("name, port, param", [("autoclip", NpAutoClip, 10.0), ("autoclip", NpAutoClip, 50.0),
                                                ("zclip", NpZClip, 2.5), ("zclip", NpZClip, 1.0)])
def test_history_strategies_equal_their_numpy_ports_through_spikes(name, port, param):
    steps = spiky_gradients()
    got = run_strategy(name, steps, param)
    reference = port(param)
    clipped_any = False
    for k, (grads, (clipped, flag, threshold)) in enumerate(zip(steps, got), start=1):
        norm = global_norm_np(grads)
        scale, want_threshold = reference(norm)
        if math.isnan(want_threshold):
            assert math.isnan(threshold), k
        else:
            assert threshold == pytest.approx(want_threshold, rel=RTOL), k
        assert global_norm_np(clipped) == pytest.approx(norm * scale, rel=RTOL), k
        assert flag == (scale < 1.0), k
        clipped_any |= flag
    assert clipped_any  # the spikes were caught


def test_autoclip_beyond_its_cap_keeps_the_most_recent_norms():
    steps = spiky_gradients(steps=30, spikes=(3, 4, 20))
    got = run_strategy("autoclip", steps, 50.0, strategy=AutoClip(cap=8))
    norms = [global_norm_np(g) for g in steps]
    for k, (_, _, threshold) in enumerate(got):
        window = norms[max(0, k - 7) : k + 1]
        assert threshold == pytest.approx(float(np.percentile(window, 50.0)), rel=RTOL), k


def test_agc_on_dense_bias_conv_and_embedding_parameters():
    import tensorflow as tf

    rng = np.random.default_rng(1)
    shapes = [(5, 3), (3,), (3, 3, 2, 4), (2, 3, 4), ()]
    weights = [rng.normal(size=s).astype(np.float32) for s in shapes]
    weights[1][:] = 0.0  # a zero bias: its bound is λ × 1e-3
    grads = [(rng.normal(size=s) * rng.choice([0.01, 10.0], size=s)).astype(np.float32) for s in shapes]
    variables = [tf.Variable(w) for w in weights]
    for lam in (0.01, 0.1, 1.0):
        result = STRATEGIES["agc"].apply([tf.constant(g) for g in grads], tf.constant(lam), variables, ())
        want = np_agc(grads, weights, lam)
        for got, ref in zip(result.grads, want):
            np.testing.assert_allclose(np.asarray(got), ref, rtol=RTOL, atol=1e-7)
        assert float(result.threshold) == pytest.approx(lam)
        changed = any(not np.allclose(np.asarray(a), b) for a, b in zip(result.grads, grads))
        assert bool(result.clipped) == changed

    # An embedding: the gradient is IndexedSlices with repeated rows, clipped without densifying.
    table = rng.normal(size=(10, 4)).astype(np.float32)
    sparse = tf.IndexedSlices(tf.constant(rng.normal(size=(6, 4)).astype(np.float32) * 5),
                              tf.constant([1, 7, 1, 3, 7, 7]), tf.constant([10, 4]))
    deduped = dedupe(sparse)
    result = STRATEGIES["agc"].apply([deduped], tf.constant(0.05), [tf.Variable(table)], ())
    assert isinstance(result.grads[0], tf.IndexedSlices)
    want = np_agc([tf.convert_to_tensor(sparse).numpy()], [table], 0.05)[0]
    np.testing.assert_allclose(tf.convert_to_tensor(result.grads[0]).numpy(), want, rtol=RTOL, atol=1e-7)
    assert bool(result.clipped)


def test_agc_unit_axes_follow_optax():
    assert unit_axes(()) is None and unit_axes((7,)) is None
    assert unit_axes((5, 3)) == (0,) and unit_axes((2, 5, 3)) == (0,)
    assert unit_axes((3, 3, 2, 4)) == (0, 1, 2)
    assert unit_axes((1, 6)) is None  # Optax squeezes first: a (1, n) kernel is one vector
    with pytest.raises(ValueError, match="rank-5"):
        unit_axes((2, 2, 2, 2, 2))


# --- properties -------------------------------------------------------------------------------

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
grads_lists = st.lists(arrays(np.float32, st.integers(1, 5), elements=st.floats(-50, 50, width=32)), min_size=1, max_size=3)


@pytest.mark.parametrize("name", ADAPTIVE)
@SETTINGS
@given(grads=grads_lists, param=st.floats(0.01, 100.0), steps=st.integers(1, 30), seed=st.integers(0, 1000))
def test_never_increases_a_norm(name, grads, param, steps, seed):
    if name == "autoclip":
        param = min(param, 100.0)
    rng = np.random.default_rng(seed)
    sequence = [[g * float(rng.uniform(0.1, 30.0)) for g in grads] for _ in range(steps)]
    for before, (after, _, _) in zip(sequence, run_strategy(name, sequence, param)):
        assert global_norm_np(after) <= global_norm_np(before) * (1 + 1e-6) + 1e-30
        for b, a in zip(before, after):
            assert np.linalg.norm(a.astype(np.float64)) <= np.linalg.norm(b.astype(np.float64)) * (1 + 1e-6) + 1e-30


@SETTINGS
@given(grads=grads_lists, weights_scale=st.floats(0.01, 10.0), lam=st.floats(0.001, 1.0))
def test_agc_leaves_a_unit_below_its_bound_unchanged(grads, weights_scale, lam):
    import tensorflow as tf

    weights = [np.full_like(g, weights_scale) for g in grads]
    bounds = [lam * max(float(np.linalg.norm(w)), 1e-3) for w in weights]  # 1-D: one unit each
    small = [g * min(1.0, 0.5 * b / max(float(np.linalg.norm(g)), 1e-30)) for g, b in zip(grads, bounds)]
    result = STRATEGIES["agc"].apply([tf.constant(g) for g in small], tf.constant(lam),
                                     [tf.Variable(w) for w in weights], ())
    for got, want in zip(result.grads, small):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert not bool(result.clipped)


@SETTINGS
@given(seed=st.integers(0, 10_000), steps=st.integers(1, 30))
def test_autoclip_at_100_never_clips(seed, steps):
    sequence = spiky_gradients(steps=steps, spikes=(5, 6, 12), seed=seed)
    for before, (after, clipped, threshold) in zip(sequence, run_strategy("autoclip", sequence, 100.0)):
        assert not clipped
        for a, b in zip(after, before):
            np.testing.assert_allclose(a, b, rtol=1e-6)


@SETTINGS
@given(seed=st.integers(0, 10_000), z=st.floats(0.1, 5.0))
def test_zclip_clips_nothing_during_warmup(seed, z):
    sequence = spiky_gradients(steps=26, spikes=(3, 10, 24), seed=seed)
    out = run_strategy("zclip", sequence, z)
    for before, (after, clipped, threshold) in zip(sequence[:25], out[:25]):
        assert not clipped and math.isnan(threshold)
        for a, b in zip(after, before):
            np.testing.assert_array_equal(a, np.float32(b))


# --- end to end: the CLI's rows against a hand-written eager loop --------------------------------


@pytest.fixture(scope="session")
def spiky_npz(data_dir):
    """Linear-regression data whose batches 30, 31, 47 and 60 (of 4 rows) are scaled x25: gradient spikes."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(280, 4)).astype(np.float32)
    for batch in (30, 31, 47, 60):
        x[4 * (batch - 1) : 4 * batch] *= 25.0
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * rng.normal(size=(280, 1))).astype(np.float32)
    path = data_dir / "spiky.npz"
    np.savez(path, x=x, y=y)
    return path


def reference_run(forward, variables, x, y, steps, lr, clip):
    """Eager SGD, batches of 4 in file order; `clip(grads64, weights64) -> (scale or clipped grads, threshold)`."""
    import keras
    import tensorflow as tf

    loss_fn = keras.losses.MeanSquaredError()
    out = []
    for k in range(steps):
        xb, yb = x[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4]
        with tf.GradientTape() as tape:
            loss = loss_fn(tf.constant(yb), forward(tf.constant(xb)))
        grads = [tf.convert_to_tensor(g).numpy().astype(np.float64) for g in tape.gradient(loss, variables)]
        weights = [v.numpy().astype(np.float64) for v in variables]
        norm = global_norm_np(grads)
        new, threshold = clip(grads, weights, norm)
        for v, g in zip(variables, new):
            v.assign_sub((lr * g).astype(np.float32))
        out.append((float(loss), norm, global_norm_np(new), threshold))
    return out


def scaled(port):
    def clip(grads, weights, norm):
        scale, threshold = port(norm)
        return [g * scale for g in grads], threshold

    return clip


@pytest.mark.parametrize("variant, make_clip", [
    ("autoclip:25", lambda: scaled(NpAutoClip(25.0))),
    ("zclip:2", lambda: scaled(NpZClip(2.0))),
    ("agc:0.05", lambda: (lambda grads, weights, norm: (np_agc(grads, weights, 0.05), 0.05))),
])
def test_cli_rows_equal_a_hand_written_loop(cli, module_model, spiky_npz, tmp_path, variant, make_clip):
    import tensorflow as tf

    name, _, param = variant.partition(":")
    option = {"autoclip": "--percentile", "zclip": "--z", "agc": "--factor"}[name]
    csv = tmp_path / "steps.csv"
    code, out, err = cli("run", module_model, "--data", spiky_npz, "--loss", "mse", "--no-shuffle", "--batch-size", 4,
                         "--steps", 65, "--lr", 0.01, "--clip", name, option, param, "--csv", csv, "-q")
    assert code == 0, err
    obj = tf.saved_model.load(str(module_model))
    with np.load(spiky_npz) as archive:
        x, y = archive["x"], archive["y"]
    reference = reference_run(obj, [obj.w, obj.b], x, y, 65, 0.01, make_clip())
    rows = read_csv(csv)
    for column, index in (("loss", 0), ("grad_norm", 1), ("clipped_norm", 2), ("threshold", 3)):
        np.testing.assert_allclose(rows[column], [r[index] for r in reference], rtol=RTOL, err_msg=column)
    assert rows["clipped"].sum() >= 2  # the injected spikes were clipped
    assert list(rows["clipped"]) == [r[2] < r[1] * (1 - 1e-9) for r in reference]


@pytest.mark.parametrize("name", ["autoclip", "zclip"])
def test_state_survives_blocks_and_is_reset_between_compare_variants(cli, module_model, spiky_npz, tmp_path, name):
    base = ["--data", spiky_npz, "--loss", "mse", "--no-shuffle", "--batch-size", 4, "--steps", 65, "--lr", 0.01, "-q"]
    option = {"autoclip": "--percentile", "zclip": "--z"}[name]
    frames = []
    for fetch in (["--fetch-every", "1"], ["--fetch-every", "7"], []):
        csv = tmp_path / f"run{len(frames)}.csv"
        assert cli("run", module_model, *base, "--clip", name, option, "2", *fetch, "--csv", csv)[0] == 0
        frames.append(read_csv(csv).drop(columns=["time_ms"]))
    for frame in frames[1:]:
        assert frame.equals(frames[0])
    long_csv = tmp_path / "long.csv"
    code, out, err = cli("compare", module_model, *base, "--variants", f"none,{name}:2,global:1,{name}:2.5", "--csv", long_csv)
    assert code == 0, err
    long = read_csv(long_csv)
    assert list(dict.fromkeys(zip(long["clip"], long["param"].fillna(-1)))) == [
        ("none", -1), (name, 2.0), ("global", 1.0), (name, 2.5)]
    again = long[(long["clip"] == name) & (long["param"] == 2.0)].drop(columns=["time_ms"])
    assert again.reset_index(drop=True).equals(frames[0])  # fresh state after the variants before it


def test_threshold_column_shows_the_adaptive_threshold_move(cli, module_model, spiky_npz, tmp_path):
    csv = tmp_path / "steps.csv"
    code, _, err = cli("run", module_model, "--data", spiky_npz, "--loss", "mse", "--no-shuffle", "--batch-size", 4,
                       "--steps", 40, "--lr", 0.01, "--clip", "autoclip", "--csv", csv, "-q")
    assert code == 0, err
    thresholds = read_csv(csv)["threshold"]
    assert thresholds.nunique() > 10  # it moves, step by step
    code, _, err = cli("run", module_model, "--data", spiky_npz, "--loss", "mse", "--steps", 3, "--clip", "global",
                       "--norm", 2, "--csv", csv, "-q")
    assert list(read_csv(csv)["threshold"]) == [2.0, 2.0, 2.0]


def test_parameters_are_validated_with_their_option_names():
    assert Clipping("autoclip").param == 10.0 and Clipping("zclip").param == 2.5 and Clipping("agc").param == 0.01
    for name, bad, option in [("autoclip", 101, "--percentile"), ("autoclip", 0, "--percentile"),
                              ("zclip", -1, "--z"), ("agc", float("nan"), "--factor")]:
        with pytest.raises(OptionError, match=option):
            Clipping(name, bad)
    variants = parse_variant_list("none, global:5 ,agc:0.01,autoclip:10,zclip")
    assert [v.label for v in variants] == ["none", "global 5", "agc 0.01", "autoclip 10", "zclip 2.5"]
    for bad in ["global:x", "bogus:1", "none:3", "global:5,,none", "global"]:
        with pytest.raises(OptionError):
            parse_variant_list(bad)


def test_cli_rejects_a_parameter_of_another_strategy(cli, module_model, regression_npz):
    code, _, err = cli("run", module_model, "--data", regression_npz, "--loss", "mse", "--clip", "zclip", "--norm", 1)
    assert code == 2 and "--clip zclip takes --z, not --norm" in err
    code, _, err = cli("compare", module_model, "--data", regression_npz, "--loss", "mse", "--variants", "zclip",
                       "--clip", "global")
    assert code == 2 and "not both" in err
