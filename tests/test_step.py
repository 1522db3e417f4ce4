"""Issue 20: one measured step for the trainer and GradientWatch, and the update handed on as
``fit`` hands it. References: Keras' own ``fit`` and Keras' train step written out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

import gradwatch

BATCH = 16


def regression(rows=160, nan_batch=None, spike_batch=None, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1)) + 0.1).astype("float32")
    if spike_batch is not None:  # outlier targets (BatchNorm would undo outlier inputs)
        y[spike_batch * BATCH:(spike_batch + 1) * BATCH] *= 30
    if nan_batch is not None:
        x[nan_batch * BATCH + 3, 2] = np.nan
    return x, y


def bn_mlp(seed=3, dropout=False):
    """Dense -> BatchNorm -> (Dropout) -> Dense, an L2 regularizer on the first kernel."""
    import keras

    keras.utils.set_random_seed(seed)
    layers = [keras.Input((6,)), keras.layers.Dense(12, kernel_regularizer=keras.regularizers.L2(1e-2)),
              keras.layers.BatchNormalization(), keras.layers.Activation("tanh")]
    if dropout:
        layers.append(keras.layers.Dropout(0.3))
    layers.append(keras.layers.Dense(1))
    return keras.Sequential(layers)


def fit_rows(watch, optimizer, x, y, epochs=1, model=None):
    model = model or bn_mlp()
    model.compile(optimizer=watch.wrap(optimizer), loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=[watch])
    return model


def test_gradientwatch_in_fit_equals_gradwatch_run_step_by_step():
    """Adam, BatchNorm and an L2 regularizer: the same loss, grad norm and clipped norm at every step."""
    import keras

    import gradwatch
    from gradwatch.keras import GradientWatch

    x, y = regression()
    model = bn_mlp()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    ours = gradwatch.run(model, (x, y), clip="global", norm=8.0, batch_size=BATCH, epochs=2, shuffle=False)
    watch = GradientWatch(clip="global", norm=8.0)
    fit_rows(watch, keras.optimizers.Adam(0.01), x, y, epochs=2)
    theirs = watch.rows
    assert len(ours) == len(theirs) == 20
    assert ours["clipped"].any() and not ours["clipped"].all()
    for column in ("loss", "grad_norm", "grad_norm_rows", "clipped_norm"):
        np.testing.assert_allclose(theirs[column], ours[column], rtol=1e-5, err_msg=column)


def _variables(model):
    return [(v.path, v.numpy()) for v in model.variables if "seed_generator" not in v.path]


@pytest.mark.parametrize("clip, param", [("zclip", {"z": 2.0}), ("autoclip", {"percentile": 50})])
def test_a_nan_batch_in_fit_is_skipped_whole_and_later_spikes_are_still_clipped(clip, param):
    """Skipping the NaN batch leaves everything as it was: the fit equals the same fit without that
    batch (weights, Adam's slots and iterations, BatchNorm's moving statistics, the strategy's state)."""
    import keras

    from gradwatch.keras import GradientWatch

    nan_batch, spike_batch = 30, 36  # ZClip's warm-up is 25 steps: the NaN comes after it
    x, y = regression(rows=40 * BATCH, nan_batch=nan_batch, spike_batch=spike_batch)
    keep = np.r_[0:nan_batch * BATCH, (nan_batch + 1) * BATCH:len(x)]
    watched = GradientWatch(clip=clip, **param)
    with_nan = fit_rows(watched, keras.optimizers.Adam(0.01), x, y)
    reference = GradientWatch(clip=clip, **param)
    without = fit_rows(reference, keras.optimizers.Adam(0.01), x[keep], y[keep])

    rows, ref = watched.rows, reference.rows
    assert rows["nonfinite"].tolist() == [k == nan_batch for k in range(40)]
    assert int(with_nan.optimizer.iterations.numpy()) == 39 == int(without.optimizer.iterations.numpy())
    mine, theirs = _variables(with_nan), _variables(without)
    assert any("moving_mean" in name for name, _ in mine)
    for (name, a), (_, b) in zip(mine, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)
    for a, b in zip(with_nan.optimizer.variables, without.optimizer.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7, err_msg=a.path)
    after = rows[rows["step"] > nan_batch + 1]
    assert np.isfinite(after["threshold"]).all()
    spike = rows.iloc[spike_batch]
    assert spike["clipped"] and spike["clipped_norm"] < spike["grad_norm"] / 5
    same = rows.drop(index=nan_batch).reset_index(drop=True)
    for column in ("loss", "grad_norm", "clipped_norm", "threshold"):
        np.testing.assert_allclose(same[column], ref[column], rtol=1e-5, err_msg=column)


def test_a_nan_batch_in_the_trainer_leaves_batchnorm_and_adam_as_they_were():
    """The CLI/API trainer: the same rule, read back from the trained model's variables."""
    import keras

    from gradwatch import api

    nan_batch = 4
    x, y = regression(rows=10 * BATCH, nan_batch=nan_batch)
    keep = np.r_[0:nan_batch * BATCH, (nan_batch + 1) * BATCH:len(x)]

    def trained(x, y):
        model = bn_mlp()
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        spec = api.make_spec(model, (x, y), batch_size=BATCH, shuffle=False, epochs=1, allow_nonfinite_data=True)
        variant = api.clipping_of("zclip", z=2.0)
        trainer = api.prepare_trainer(spec, [variant])
        (result,) = api.train(trainer, [variant])
        return trainer, result

    with_nan, result = trained(x, y)
    without, _ = trained(x[keep], y[keep])
    assert [r["nonfinite"] for r in result.rows] == [k == nan_batch for k in range(10)]
    for a, b in zip(with_nan.model.variables, without.model.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7, err_msg=a.path)
    for a, b in zip(with_nan.optimizer.variables, without.optimizer.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7, err_msg=a.path)


def test_a_step_with_an_inf_gradient_is_non_finite_and_not_clipped():
    """inf > threshold is true: without the rule the row would say clipped and non-finite at once."""
    import gradwatch

    x, y = regression(rows=6 * BATCH)
    import keras

    x[2 * BATCH + 1, 0] = 3e38  # a finite input whose squared error overflows: an inf loss and gradient
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    rows = gradwatch.run(model, (x, y), clip="global", norm=1.0, batch_size=BATCH, epochs=1, shuffle=False)
    assert rows["nonfinite"].tolist() == [k == 2 for k in range(6)]
    assert not rows["clipped"][2] and rows["clipped"].drop(index=2).all()


def test_on_nonfinite_apply_trains_on_as_keras_does():
    import keras

    from gradwatch.keras import GradientWatch

    x, y = regression(nan_batch=2)
    watch = GradientWatch(clip="global", norm=1.0, on_nonfinite="apply")
    model = fit_rows(watch, keras.optimizers.SGD(0.1), x, y)
    assert watch.rows["nonfinite"].iloc[2]
    assert not np.isfinite(model.layers[0].kernel.numpy()).all()  # the NaN update went in, as in Keras
    with pytest.raises(Exception, match="on_nonfinite"):
        GradientWatch(clip="none", on_nonfinite="ignore")


def test_mixed_float16_measures_and_clips_the_unscaled_gradient():
    """compile() wraps the watched optimizer in a LossScaleOptimizer: the rows are the unscaled
    gradient's; the first steps overflow at 2**15, are skipped and halve the scale, as Keras does."""
    import keras
    import tensorflow as tf

    from gradwatch.keras import GradientWatch

    x, y = regression()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = bn_mlp()
        initial = [w.copy() for w in model.get_weights()]
        watch = GradientWatch(clip="global", norm=1.0)
        fit_rows(watch, keras.optimizers.SGD(0.05), x, y, model=model)
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        rows = watch.rows
        first = int(np.argmin(rows["overflow"].to_numpy()))  # the first step that did not overflow
        reference = bn_mlp()
        reference.set_weights(initial)  # overflowing steps changed nothing, BatchNorm's statistics included
        xb, yb = x[first * BATCH:(first + 1) * BATCH], y[first * BATCH:(first + 1) * BATCH]
        with tf.GradientTape() as tape:
            out = tf.cast(reference(xb, training=True), tf.float32)
            loss = tf.reduce_mean(tf.square(out - yb)) + tf.add_n(reference.losses)
        tape_norm = float(tf.linalg.global_norm(tape.gradient(loss, reference.trainable_variables)))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert first >= 1 and rows["overflow"][:first].all() and not rows["nonfinite"].any()
    assert rows["loss_scale"].tolist()[:first + 1] == [2.0 ** (15 - k) for k in range(first + 1)]
    assert rows["grad_norm"][first] == pytest.approx(tape_norm, rel=2e-3)
    assert rows["clipped_norm"][first] == pytest.approx(1.0, rel=1e-3)  # 1, not 1/32768
    assert tape_norm > 2


def test_autoclip_history_goes_on_across_fits_and_beyond_its_buffer():
    """Percentiles over every norm so far, then over the most recent ``cap`` (a ring), never the smallest."""
    import keras

    from gradwatch.clip.adaptive import AutoClip
    from gradwatch.keras import GradientWatch

    watch = GradientWatch(clip="autoclip", percentile=50)
    watch.impl = AutoClip(cap=16)  # the buffer of 65,536 made small enough to run past
    model = bn_mlp()
    model.compile(optimizer=watch.wrap(keras.optimizers.SGD(0.05)), loss="mse")
    for seed in (0, 1):
        x, y = regression(rows=12 * BATCH, seed=seed)
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[watch])
    rows = watch.rows
    norms = rows["grad_norm"].to_numpy()
    expected = [np.percentile(norms[max(0, k - 15):k + 1], 50) for k in range(len(norms))]
    assert len(rows) == 24
    np.testing.assert_allclose(rows["threshold"], expected, rtol=1e-6)


def test_optimizer_options_that_hide_the_applied_gradient_are_refused(cli, module_model, regression_npz):
    import keras

    from gradwatch.errors import OptionError
    from gradwatch.keras import GradientWatch

    for option in ("gradient_accumulation_steps=2", "loss_scale_factor=8", "use_ema=true"):
        code, out, err = cli("run", module_model, "--data", regression_npz, "--loss", "mse", "--steps", "2",
                             "--optimizer", "adam", "--opt", option)
        name = option.split("=")[0]
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.strip().endswith(f"drop --opt {name}"), err
    with pytest.raises(OptionError, match="gradient_accumulation_steps"):
        GradientWatch(clip="none").wrap(keras.optimizers.Adam(gradient_accumulation_steps=4))


def test_a_compiled_optimizer_with_a_hidden_option_says_how_to_train_anyway(cli, regression_npz, tmp_path):
    """The user cannot 'drop' an option of the optimizer saved in the file: the line says what they can do."""
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01, gradient_accumulation_steps=2), loss="mse")
    path = tmp_path / "accumulating.keras"
    model.save(path)
    code, out, err = cli("run", path, "--data", regression_npz, "--steps", 2, "-q")
    assert code == 2 and out == "" and err.strip().splitlines() == [
        "gradwatch: error: the model's compiled optimizer SGD has gradient_accumulation_steps=2: the optimizer would "
        "apply the mean of several steps' gradients, not the one recorded; gradwatch refuses it: compile the model "
        "without it, or train with another: --optimizer NAME"]
    code, _, err = cli("run", path, "--data", regression_npz, "--steps", 2, "-q", "--optimizer", "sgd")
    assert code == 0, err


def test_a_hidden_option_typed_over_a_compiled_optimizer_is_the_one_to_drop(cli, regression_npz, tmp_path):
    """The model's optimizer is fine; the user's --opt adds the option: the line says to drop that, not to recompile."""
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    path = tmp_path / "adam.keras"
    model.save(path)
    code, out, err = cli("run", path, "--data", regression_npz, "--steps", 2, "-q", "--opt", "use_ema=true")
    assert code == 2 and out == "" and err.strip().splitlines() == [
        "gradwatch: error: the model's compiled optimizer Adam has use_ema=True: the weights would be overwritten by "
        "their moving average behind the recorded updates; gradwatch refuses it: drop --opt use_ema"]



def test_a_loss_the_data_cannot_feed_is_one_data_line(cli, tmp_path):
    """CTC needs (batch, time, classes) predictions: Keras' complaint, traced, is the data's one line."""
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    path = tmp_path / "dense3.keras"
    model.save(path)
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.normal(size=(64, 4)).astype("float32"), y=rng.integers(0, 3, size=(64, 3)).astype("float32"))
    code, out, err = cli("run", path, "--data", data, "--steps", 2, "-q", "--loss", "ctc")
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("gradwatch: error: the model cannot compute the loss on this data: Logits `y_pred` "
                               "are expected to be a tensor of shape `(batch_size, max_length, num_classes)`"), err
    assert lines[0].endswith("; check --loss, --target and the shapes"), err


class _Broken:
    """A strategy with a bug of its own (an error at trace time, after the loss was computed)."""

    name, option, default, upper, summary = "broken", None, None, None, "raises while it is traced"

    def init(self, variables):
        return ()

    def apply(self, grads, threshold, variables, state):
        raise TypeError("a bug in the strategy, not in the data")


def test_an_error_after_the_loss_is_not_blamed_on_the_data(cli, module_model, regression_npz, monkeypatch):
    """Only the loss and its gradient are the data's to fail: a fault in the clipping (ours) says 'please report
    it', not 'check --loss, --target and the shapes' (as a float64 model's threshold once did)."""
    from gradwatch.clip import registry

    monkeypatch.setitem(registry.STRATEGIES, "broken", _Broken())
    code, out, err = cli("run", module_model, "--data", regression_npz, "--loss", "mse", "--steps", 2, "-q",
                         "--clip", "broken")
    assert code == 1 and err.strip().splitlines() == [
        "gradwatch: error: unexpected TypeError: a bug in the strategy, not in the data (set GRADWATCH_DEBUG=1 for the "
        "traceback, and please report it)"], err
    with pytest.raises(TypeError, match="a bug in the strategy"):
        gradwatch.run(module_model, regression_npz, loss="mse", steps=2, clip="broken")

# --- embeddings: the raw rows go to the optimizer, as in fit -------------------------------


def ids_data(rows=96, length=12, vocab=9, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, size=(rows, length)).astype("int32")  # ids repeat in every batch
    y = (x.sum(axis=1, keepdims=True) % 3).astype("float32")
    return x, y


def embedding_model(seed=5, vocab=9):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((12,), dtype="int32"), keras.layers.Embedding(vocab, 8),
                             keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(1)])


def keras_steps(optimizer, x, y, steps, clip=None):
    """Keras' train step written out: compute_loss, the tape's raw gradients (``clip(grads)``
    first, if given), optimizer.apply."""
    import tensorflow as tf

    model = embedding_model()
    model.compile(optimizer=optimizer, loss="mse")
    losses = []
    for k in range(steps):
        xb, yb = x[k * BATCH:(k + 1) * BATCH], y[k * BATCH:(k + 1) * BATCH]
        with tf.GradientTape() as tape:
            y_pred = model(xb, training=True)
            loss = model.compute_loss(x=xb, y=yb, y_pred=y_pred, training=True)
        grads = tape.gradient(loss, model.trainable_variables)
        assert isinstance(grads[0], tf.IndexedSlices)
        if clip is not None:
            grads = clip(grads)
        model.optimizer.apply(grads, model.trainable_variables)
        losses.append(float(loss))
    return np.array(losses), model


def _tf_global(norm):
    import tensorflow as tf

    return lambda grads: tf.clip_by_global_norm(grads, norm)[0]  # keeps IndexedSlices, as the PTB tutorial's


@pytest.mark.parametrize("keras_option, clip_fn, clip, sparse_norm", [
    ({}, None, {"clip": "none"}, "summed"),
    ({}, _tf_global(0.05), {"clip": "global", "norm": 0.05}, "rows"),
    ({"clipnorm": 0.02}, None, {"clip": "norm", "norm": 0.02}, "rows"),
    ({"clipvalue": 0.002}, None, {"clip": "value", "value": 0.002}, "rows"),
])
def test_repeated_ids_with_adamw_equal_keras_step_by_step(keras_option, clip_fn, clip, sparse_norm):
    import keras

    import gradwatch

    x, y = ids_data()
    steps = len(x) // BATCH
    expected, _ = keras_steps(keras.optimizers.AdamW(0.05, **keras_option), x, y, steps, clip_fn)
    model = embedding_model()
    model.compile(optimizer=keras.optimizers.AdamW(0.05), loss="mse")
    rows = gradwatch.run(model, (x, y), batch_size=BATCH, epochs=1, shuffle=False, sparse_norm=sparse_norm, **clip)
    np.testing.assert_allclose(rows["loss"], expected, rtol=1e-5)
    assert (rows["grad_norm_rows"] != rows["grad_norm"]).all()  # ids repeat: the two norms differ
    if clip["clip"] != "none":
        assert rows["clipped"].all()


def test_rows_thresholds_are_keras_global_clipnorm():
    """Under --sparse-norm rows the threshold is Keras' global_clipnorm's (with SGD, whose update
    is the same whether Keras hands it the clipped gradient sparse or, as it does, densified)."""
    import keras

    import gradwatch

    x, y = ids_data()
    expected, _ = keras_steps(keras.optimizers.SGD(0.5, global_clipnorm=0.05), x, y, len(x) // BATCH)
    model = embedding_model()
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    rows = gradwatch.run(model, (x, y), clip="global", norm=0.05, batch_size=BATCH, epochs=1, shuffle=False,
                         sparse_norm="rows")
    np.testing.assert_allclose(rows["loss"], expected, rtol=1e-5)
    summed = gradwatch.run(model, (x, y), clip="global", norm=0.05, batch_size=BATCH, epochs=1, shuffle=False)
    assert np.abs(summed["loss"] - expected).max() > 1e-4  # the default measures another norm


def test_what_keras_global_clipnorm_changes_for_adam_is_the_second_moment():
    """The README's one difference from Keras, as Keras does it: global_clipnorm (not clipnorm or
    clipvalue) hands Adam the embedding gradient densified, each id's rows summed. Adam's first
    moment is the same either way; its second moment then holds the square of the sum where the
    raw rows give the sum of the squares."""
    import keras
    import tensorflow as tf

    raw = tf.IndexedSlices(tf.constant([[3.0, 4.0], [3.0, 4.0]]), tf.constant([1, 1]), tf.constant([3, 2]))
    for option in ({"clipnorm": 100.0}, {"clipvalue": 100.0}):
        assert isinstance(keras.optimizers.Adam(**option)._clip_gradients([raw])[0], tf.IndexedSlices)
    densified = keras.optimizers.Adam(global_clipnorm=100.0)._clip_gradients([raw])[0]
    assert not isinstance(densified, tf.IndexedSlices)
    np.testing.assert_allclose(np.asarray(densified), np.asarray(tf.convert_to_tensor(raw)))  # not clipped, yet dense
    moments = []
    for grad in (raw, densified):
        weights = keras.Variable(np.ones((3, 2), "float32"))
        adam = keras.optimizers.Adam(0.1)
        adam.apply([grad], [weights])
        moments.append((adam._momentums[0].numpy(), adam._velocities[0].numpy()))
    (m_raw, v_raw), (m_dense, v_dense) = moments
    np.testing.assert_allclose(m_raw, m_dense)
    np.testing.assert_allclose(v_raw[1], 0.001 * (2 * np.array([3.0, 4.0]) ** 2), rtol=1e-6)  # (1 - beta_2) Σ raw²
    np.testing.assert_allclose(v_dense[1], 0.001 * (2 * np.array([3.0, 4.0])) ** 2, rtol=1e-6)  # (1 - beta_2) (Σ raw)²


def test_gradientwatch_hands_the_raw_rows_on_too():
    import keras

    from gradwatch.keras import GradientWatch

    x, y = ids_data()
    steps = len(x) // BATCH
    expected, reference = keras_steps(keras.optimizers.AdamW(0.05, clipnorm=0.02), x, y, steps)
    watch = GradientWatch(clip="norm", norm=0.02, sparse_norm="rows")
    model = embedding_model()
    model.compile(optimizer=watch.wrap(keras.optimizers.AdamW(0.05)), loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[watch])
    np.testing.assert_allclose(watch.rows["loss"], expected, rtol=1e-5)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_summed_clipping_scales_each_raw_row_by_its_summed_rows_factor():
    """Under the default, the applied raw rows add up to the clipped summed gradient."""
    import tensorflow as tf

    from gradwatch.clip import STRATEGIES, dedupe
    from gradwatch.train.step import measured_step

    raw = tf.IndexedSlices(tf.constant([[3.0, -1.0], [1.0, 4.0], [2.0, 0.0]]), tf.constant([1, 0, 1]), tf.constant([3, 2]))
    table = tf.Variable(tf.zeros([3, 2]))
    for name, param in (("global", 2.0), ("value", 2.5), ("agc", 0.5), ("norm", 1.0)):
        m = measured_step([raw], [table], STRATEGIES[name], tf.constant(param), (), tf.constant(1.0))
        summed = dedupe(m.apply[0])
        clipped = STRATEGIES[name].apply([dedupe(raw)], tf.constant(param), [table], ()).grads[0]
        np.testing.assert_allclose(tf.convert_to_tensor(summed), tf.convert_to_tensor(clipped), rtol=1e-6, err_msg=name)
        assert m.apply[0].values.shape[0] == 3  # still the raw rows
    assert float(m.grad_norm) == pytest.approx(np.linalg.norm([[5, -1], [1, 4]]))
    assert float(m.grad_norm_rows) == pytest.approx(np.linalg.norm([[3, -1], [1, 4], [2, 0]]))


# --- compare: every variant from the same state -------------------------------------------


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_every_compare_variant_equals_its_solo_run(optimizer):
    """Adam / SGD momentum, BatchNorm, Dropout, ZClip's and AutoClip's state: reset between variants."""
    import gradwatch

    x, y = regression(rows=40 * BATCH, spike_batch=33)
    model = bn_mlp(dropout=True)
    model.compile(optimizer="sgd", loss="mse")
    variants = ["none", "global:0.5", "zclip:2", "autoclip:50"]
    options = dict(batch_size=BATCH, steps=40, optimizer=optimizer, lr=0.01, seed=7)
    long = gradwatch.compare(model, (x, y), variants=variants, **options)
    for variant in variants:
        name, _, value = variant.partition(":")
        option = {"global": "norm", "zclip": "z", "autoclip": "percentile"}.get(name)
        solo = gradwatch.run(model, (x, y), clip=name, **({option: float(value)} if option else {}), **options)
        part = long[long["clip"] == name].reset_index(drop=True)
        assert len(part) == 40
        for column in ("loss", "grad_norm", "clipped_norm", "threshold", "clipped"):
            np.testing.assert_array_equal(part[column], solo[column], err_msg=f"{variant} {column}")


def test_on_nonfinite_stop_prints_the_recorded_rows(cli, tmp_path, module_model):
    import pandas as pd
    from io import StringIO

    x, y = regression(rows=8 * BATCH, nan_batch=3)
    path = tmp_path / "nan.npz"
    np.savez(path, x=x[:, :4], y=y)
    for fmt in ("csv", "json"):
        code, out, err = cli("run", module_model, "--data", path, "--loss", "mse", "--no-shuffle", "--batch-size", BATCH,
                             "--allow-nonfinite-data", "--on-nonfinite", "stop", "--format", fmt, "-q")
        assert code == 3, err
        rows = pd.read_csv(StringIO(out)) if fmt == "csv" else pd.DataFrame(json.loads(out)["rows"])
        assert rows["step"].tolist() == [1, 2, 3, 4] and rows["nonfinite"].tolist() == [False, False, False, True]


# --- thresholds in the form the user types into Keras --------------------------------------


def test_suggest_gives_the_keras_form_of_its_threshold_when_the_norms_differ(cli, keras_file_model, ids_npz, module_model,
                                                                             regression_npz):
    import re

    import gradwatch
    from gradwatch.diagnose import suggest_threshold

    code, out, err = cli("suggest", keras_file_model, "--data", ids_npz, "--loss", "mse", "--steps", 30, "-q")
    assert code == 0, err
    proposed = float(re.search(r"--norm (\S+)\s*$", out.strip()).group(1))
    keras = float(re.search(r"global_clipnorm=([0-9.e+-]+)\)", out).group(1))
    rows = gradwatch.run(keras_file_model, ids_npz, loss="mse", steps=30)
    found = suggest_threshold(rows.to_dict("records"))
    assert found.threshold == proposed
    calm = rows["step"] < (found.first_spike or 10**9)
    ratio = np.median(rows["grad_norm_rows"][calm] / rows["grad_norm"][calm])
    assert abs(ratio - 1) > 0.01 and keras == pytest.approx(proposed * ratio, rel=0.05)
    code, out, _ = cli("suggest", module_model, "--data", regression_npz, "--loss", "mse", "--steps", 30, "-q")
    assert code == 0 and "global_clipnorm" not in out  # dense gradients: one norm, one number
    code, out, _ = cli("suggest", keras_file_model, "--data", ids_npz, "--loss", "mse", "--steps", 30, "-q",
                       "--sparse-norm", "rows")
    assert code == 0 and "global_clipnorm" not in out and "--sparse-norm rows" in out.strip().splitlines()[-1]


# --- the clipped norms: of what is applied, at any threshold the options accept --------------

# Each strategy with parameters from the bottom of the accepted range (PARAM_RANGE) to values
# that clip nothing; the adaptive ones get a history that makes the last step clip.
CLIPPED_NORM_CASES = [
    ("global", 1e-30), ("global", 1e-25), ("global", 3.0), ("global", 1e30),
    ("norm", 1e-25), ("norm", 3.0), ("norm", 1e30),
    ("avg-norm", 1e-25), ("avg-norm", 0.05), ("avg-norm", 1e30),
    ("value", 1e-25), ("value", 0.5), ("value", 1e30),
    ("agc", 1e-25), ("agc", 0.01), ("agc", 1e30),
    ("autoclip", 10.0), ("autoclip", 100.0), ("zclip", 2.5), ("none", None),
]


@pytest.mark.parametrize("sparse_norm", ["summed", "rows"])
@pytest.mark.parametrize("name, param", CLIPPED_NORM_CASES)
def test_clipped_norms_are_those_of_the_applied_gradient_in_float64_numpy(name, param, sparse_norm):
    """The recorded clipped norms against NumPy's float64 norm of what the step hands the
    optimizer (an embedding's raw rows summed as the optimizer sums them): the scaling
    strategies take them from their factor, value and AGC measure them; at a threshold of 1e-25
    both give 1e-25-sized norms (squaring such values in float32 gives 0, and a row saying
    clip ratio 0 would claim that nothing was applied)."""
    import tensorflow as tf

    from gradwatch.clip import STRATEGIES
    from gradwatch.train.step import measured_step

    rng = np.random.default_rng(7)
    kernel = tf.Variable(rng.normal(size=(5, 3)).astype("float32"))
    table = tf.Variable(rng.normal(size=(6, 3)).astype("float32"))
    bias = tf.Variable(np.zeros(3, "float32"))
    variables = [kernel, table, bias]
    strategy = STRATEGIES[name]
    state = strategy.init(variables, steps=40) if getattr(strategy, "takes_steps", False) else strategy.init(variables)
    steps = 30 if name == "zclip" else 3  # ZClip clips only after its 25 warm-up steps
    for k in range(steps):
        size = 1.0 if k < steps - 1 else 40.0  # the last step's gradient is a burst
        grads = [tf.constant(size * rng.normal(size=(5, 3)), tf.float32),
                 tf.IndexedSlices(tf.constant(size * rng.normal(size=(4, 3)), tf.float32), tf.constant([2, 0, 2, 5]),
                                  tf.constant([6, 3])),
                 tf.constant(size * rng.normal(size=3), tf.float32)]
        m = measured_step(grads, variables, strategy, tf.constant(param or 0.0, tf.float32), state, tf.constant(1.0),
                          sparse_norm)
        state = m.state
    applied = [tf.convert_to_tensor(g).numpy().astype(np.float64) for g in m.apply]  # the rows summed, densely
    each = np.array([np.linalg.norm(a) for a in applied])
    np.testing.assert_allclose(np.asarray(m.clipped_norms), each, rtol=2e-6, err_msg=name)
    assert float(m.clipped_norm) == pytest.approx(float(np.sqrt(np.sum(each ** 2))), rel=2e-6)
    assert float(m.clipped_norm) > 0
    if (param is not None and param <= 1e-25) or (name, param) in (("autoclip", 10.0), ("zclip", 2.5)):
        assert bool(m.clipped)  # the case clips; a tiny threshold gives a tiny norm, not 0
        assert float(m.clipped_norm) < (1e-20 if param <= 1e-25 else float(m.grad_norm))
    if not bool(m.clipped):  # nothing changed: the same norms, exactly
        assert float(m.clipped_norm) == float(m.grad_norm)


def test_a_tiny_threshold_is_recorded_as_the_norm_it_clipped_to(cli, tmp_path):
    """`--norm 1e-25` is accepted (PARAM_RANGE); the rows and the verdict say what it did."""
    import pandas as pd

    csv = tmp_path / "tiny.csv"
    code, out, err = cli("run", "--sample", "rnn-adding", "--clip", "global", "--norm", "1e-25", "--steps", "3",
                         "--csv", csv)
    assert code == 0, err
    rows = pd.read_csv(csv)
    assert rows["clipped"].all()
    np.testing.assert_allclose(rows["clipped_norm"], 1e-25, rtol=1e-6)
    np.testing.assert_allclose(rows["clip_ratio"], rows["clipped_norm"] / rows["grad_norm"], rtol=1e-9)
    assert (rows["clip_ratio"] > 0).all()
    assert "the learning rate x 0 " not in out and "clip ratio of 0 " not in out
