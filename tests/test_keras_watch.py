"""Issue 13, part 2: GradientWatch inside the user's own model.fit. Keras itself is the
reference: the same fit with the optimizer's global_clipnorm / clipnorm / clipvalue."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import read_csv

BATCH, EPOCHS = 16, 2


def data(spike_batch=None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1)) + 0.1).astype("float32")
    if spike_batch is not None:
        x[spike_batch * BATCH:(spike_batch + 1) * BATCH] *= 30
        y[spike_batch * BATCH:(spike_batch + 1) * BATCH] *= 30
    return x, y


def model_and_weights(seed=3):
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(12, activation="tanh"), keras.layers.Dense(1)])
    return model, [w.copy() for w in model.get_weights()]


def fit(optimizer, callbacks=(), steps_per_execution=1, jit_compile=False, x_y=None):
    model, _ = model_and_weights()
    model.compile(optimizer=optimizer, loss="mse", steps_per_execution=steps_per_execution, jit_compile=jit_compile)
    x, y = x_y or data()
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=list(callbacks))
    return model


@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_weights_equal_keras_global_clipnorm_and_rows_are_one_per_step(steps_per_execution, tmp_path):
    import keras
    import tensorflow as tf

    from gradwatch.keras import GradientWatch

    reference = fit(keras.optimizers.SGD(0.2, global_clipnorm=0.5), steps_per_execution=steps_per_execution)
    watch = GradientWatch(clip="global", norm=0.5, csv=tmp_path / "run.csv")
    watched = fit(watch.wrap(keras.optimizers.SGD(0.2)), [watch], steps_per_execution=steps_per_execution)
    for a, b in zip(watched.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    rows = watch.rows
    assert len(rows) == EPOCHS * 160 // BATCH and rows["step"].tolist() == list(range(1, len(rows) + 1))
    assert rows["epoch"].tolist() == [1] * 10 + [2] * 10
    # step 1 against a plain tape on the initial weights and the first batch
    model, _ = model_and_weights()
    x, y = data()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x[:BATCH], training=True) - y[:BATCH]))
    grads = tape.gradient(loss, model.trainable_variables)
    assert rows["grad_norm"][0] == pytest.approx(float(tf.linalg.global_norm(grads)), rel=1e-6)
    assert rows["loss"][0] == pytest.approx(float(loss), rel=1e-6)
    assert rows["clipped_norm"][0] == pytest.approx(min(0.5, rows["grad_norm"][0]), rel=1e-6)
    assert (rows["lr"] == np.float32(0.2)).all() and (rows["threshold"] == 0.5).all()
    assert (rows["optimizer"] == "SGD(learning_rate=0.2), the wrapped optimizer of model.fit").all()
    on_disk = read_csv(tmp_path / "run.csv")
    assert on_disk.drop(columns="time_ms").equals(rows.drop(columns="time_ms"))


@pytest.mark.parametrize("clip, option, keras_name", [("norm", "norm", "clipnorm"), ("value", "value", "clipvalue")])
def test_per_tensor_strategies_equal_keras_own_options(clip, option, keras_name):
    import keras

    from gradwatch.keras import GradientWatch

    reference = fit(keras.optimizers.Adam(0.05, **{keras_name: 0.05}))
    watch = GradientWatch(clip=clip, **{option: 0.05})
    watched = fit(watch.wrap(keras.optimizers.Adam(0.05)), [watch])
    for a, b in zip(watched.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert watch.rows["clipped"].any()


def test_jit_compile_and_an_adaptive_strategy_and_a_spike_in_the_summary(tmp_path):
    import keras

    from gradwatch.keras import GradientWatch

    csv = tmp_path / "watched.csv"
    watch = GradientWatch(clip="autoclip", percentile=50, csv=csv)
    fit(watch.wrap(keras.optimizers.SGD(0.05)), [watch], jit_compile=True, x_y=data(spike_batch=6))
    rows = watch.rows
    assert len(rows) == 20 and np.isfinite(rows["threshold"]).all()
    assert (rows["clipped_norm"] <= rows["grad_norm"] * (1 + 1e-6)).all()
    summary = watch.summary()
    assert "Loss is jumping" in summary.verdict[0] and "first at step 7" in summary.verdict[0]
    spikes = rows.loc[rows["loss_spike"], "step"].tolist()
    found = {f["code"]: f for f in summary.findings}
    assert found["loss_spikes"]["steps"] == spikes and found["loss_spikes"]["variant"] == "autoclip 50"
    # the CLI reads the same rows to the same findings: one rule, written once
    import json

    from gradwatch.cli import main

    out = tmp_path / "findings.json"
    assert main(["report", str(csv), "--findings", str(out)]) == 0
    assert json.loads(out.read_text()) == summary.findings


def test_misuse_gets_a_clear_error():
    import keras

    from gradwatch.errors import GradwatchError
    from gradwatch.keras import GradientWatch

    watch = GradientWatch(clip="global", norm=1.0)
    with pytest.raises(GradwatchError, match="clips by itself"):
        watch.wrap(keras.optimizers.SGD(0.1, global_clipnorm=1.0))
    with pytest.raises(GradwatchError, match="watch.wrap"):
        fit(keras.optimizers.SGD(0.1), [watch])
    with pytest.raises(GradwatchError, match="no step recorded"):
        watch.summary()
    for given, expected in [({"norm": "1"}, "`norm` must be a number"), ({"spike_window": 2.5}, "`spike_window` must be an integer"),
                            ({"capacity": 0}, "`capacity` must be >= 1"),
                            ({"csv": ""}, "`csv` is empty; give it a value or leave it out"),
                            ({"tensorboard": " "}, "`tensorboard` is only spaces")]:
        with pytest.raises(GradwatchError, match=expected):
            GradientWatch(clip="global", **{"norm": 1.0, **given})


def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    """The README's "Use it from Python" block, run as a user would paste it."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = text.split("## Use it from Python / inside model.fit", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "final_loss" in out and "grad_norm" in out and "Loss is jumping" in out
    assert (tmp_path / "fit_steps.csv").is_file()


def test_tensorboard_events_of_a_watched_fit(tmp_path):
    import keras
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gradwatch.keras import GradientWatch

    watch = GradientWatch(clip="zclip", z=2.5, tensorboard=tmp_path / "logs")
    fit(watch.wrap(keras.optimizers.SGD(0.05)), [watch], steps_per_execution=4)
    events = EventAccumulator(str(tmp_path / "logs" / "zclip_2.5"), size_guidance={"tensors": 0})
    events.Reload()
    rows = watch.rows
    for tag in ("loss", "grad_norm", "clipped_norm"):
        got = events.Tensors(tag)
        assert [e.step for e in got] == rows["step"].tolist()
        np.testing.assert_allclose([float(tf.make_ndarray(e.tensor_proto)) for e in got], rows[tag], rtol=1e-6)


DISTRIBUTED = r'''
import pickle, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from gradwatch.keras import GradientWatch

rng = np.random.default_rng(0)
x = rng.normal(size=(160, 6)).astype("float32")
y = (x @ rng.normal(size=(6, 1))).astype("float32")
out = {}
for case in sys.argv[2].split(","):
    mirrored, watched = case.startswith("mirrored"), case.endswith("watch")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]) if mirrored else tf.distribute.get_strategy()
    with strategy.scope():
        keras.utils.set_random_seed(3)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(12, activation="tanh"),
                                  keras.layers.Dense(1, kernel_regularizer=keras.regularizers.L2(1e-2))])
        watch = GradientWatch(clip="global", norm=0.5) if watched else None
        optimizer = watch.wrap(keras.optimizers.SGD(0.2)) if watched else keras.optimizers.SGD(0.2, global_clipnorm=0.5)
        model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[watch] if watched else [])
    out[case] = (model.get_weights(), watch.rows if watched else None)
pickle.dump(out, open(sys.argv[1], "wb"))
'''


def test_under_a_mirrored_strategy_the_global_gradient_is_clipped(tmp_path):
    """Two logical CPU devices: GradientWatch all-reduces before its norms and clipping, so the
    rows and weights equal one device's on the same global batch. Keras' own global_clipnorm
    clips each replica's gradient to its own norm: its weights differ (the documented trap)."""
    import pickle
    import subprocess
    import sys

    results = {}
    for k, cases in enumerate(["single_watch,single_keras", "mirrored_watch", "mirrored_keras"]):
        path = tmp_path / f"{k}.pkl"  # one MirroredStrategy per process: their collectives must not meet
        done = subprocess.run([sys.executable, "-c", DISTRIBUTED, str(path), cases], capture_output=True, text=True,
                              timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        results.update(pickle.loads(path.read_bytes()))
    one, two = results["single_watch"], results["mirrored_watch"]
    for a, b in zip(one[0], two[0]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    for column in ("loss", "reg_loss", "grad_norm", "clipped_norm", "clip_ratio", "threshold", "lr"):
        np.testing.assert_allclose(two[1][column], one[1][column], rtol=1e-5, err_msg=column)
    assert (one[1]["reg_loss"] > 0).all()
    assert (two[1]["clipped"] == one[1]["clipped"]).all() and len(two[1]) == 20
    for a, b in zip(one[0], results["single_keras"][0]):  # one device: Keras' global_clipnorm agrees
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    trap = max(float(np.max(np.abs(a - b))) for a, b in zip(results["mirrored_keras"][0], one[0]))
    assert trap > 1e-2  # per-replica clipping: a different update, not rounding


def test_the_optimizer_column_names_it_as_the_cli_does_schedule_and_weight_decay(tmp_path):
    """The rows of a watched fit say which optimizer trained, in the words of the CLI's start line
    (its class, a schedule as a schedule, weight decay and betas), not only its current rate."""
    import keras

    from gradwatch.keras import GradientWatch

    schedule = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=5, decay_rate=0.5)
    watch = GradientWatch(clip="global", norm=1.0)
    fit(watch.wrap(keras.optimizers.AdamW(schedule, weight_decay=0.004, beta_1=0.8)), [watch])
    assert set(watch.rows["optimizer"]) == {
        "AdamW(learning_rate=schedule ExponentialDecay, weight_decay=0.004, beta_1=0.8, beta_2=0.999), "
        "the wrapped optimizer of model.fit"}
    np.testing.assert_allclose(watch.rows["lr"], [0.02 * 0.5 ** (k / 5) for k in range(20)], rtol=1e-6)


def test_the_regularization_part_is_recorded_as_gradwatch_records_it():
    """reg_loss inside fit: model.losses (a weight and an activity regularizer) of each step, equal
    to gradwatch's own training of the same model and batches, and at step 1 to Keras' own
    model.losses after a forward pass on the first batch."""
    import keras

    import gradwatch
    from gradwatch.keras import GradientWatch

    rng = np.random.default_rng(21)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=64)

    def model():
        keras.utils.set_random_seed(21)
        return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh",
                                                                       kernel_regularizer=keras.regularizers.L2(1e-2)),
                                 keras.layers.Dense(3, activity_regularizer=keras.regularizers.L2(1e-2))])

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    first = model()
    first(x[:8], training=True)
    step_one = float(sum(float(v) for v in first.losses))
    watch = GradientWatch(clip="global", norm=0.5)
    watched = model()
    watched.compile(optimizer=watch.wrap(keras.optimizers.SGD(0.1)), loss=loss)
    watched.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[watch])
    own = model()
    own.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    rows = gradwatch.run(own, (x, y), batch_size=8, steps=8, shuffle=False, clip="global", norm=0.5)
    assert watch.rows["reg_loss"][0] == pytest.approx(step_one, rel=1e-6)
    np.testing.assert_allclose(watch.rows["reg_loss"], rows["reg_loss"], rtol=1e-5)
    np.testing.assert_allclose(watch.rows["loss"], rows["loss"], rtol=1e-5)
    assert watch.rows["reg_loss"].nunique() > 1  # it follows the weights


def test_the_loss_fn_column_says_when_fit_weighed_the_rows():
    """fit's sample_weight and class_weight (which Keras turns into sample weights) reach
    compute_loss: the rows' loss_fn says so, as the CLI's says a data set's sample_weight."""
    import keras

    from gradwatch.keras import GradientWatch

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 6)).astype("float32"), rng.integers(0, 2, 64)
    plain = "the model's compiled loss (model.fit)"
    labels = {}
    for case in ("none", "sample_weight", "class_weight", "both fits"):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
        watch = GradientWatch(clip="none")
        model.compile(optimizer=watch.wrap(keras.optimizers.SGD(0.1)),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        weights = {"sample_weight": {"sample_weight": rng.uniform(0, 2, 64)},
                   "class_weight": {"class_weight": {0: 1.0, 1: 3.0}}}.get(case, {})
        if case == "both fits":
            model.fit(x, y, batch_size=8, verbose=0, callbacks=[watch])
            weights = {"class_weight": {0: 1.0, 1: 3.0}}
        model.fit(x, y, batch_size=8, verbose=0, callbacks=[watch], validation_data=(x, y), **weights)
        labels[case] = set(watch.rows["loss_fn"])
    weighted = plain + ", each row weighted by fit's sample_weight (or class_weight)"
    assert labels == {"none": {plain}, "sample_weight": {weighted}, "class_weight": {weighted},
                      "both fits": {plain + ", in some fits weighted by their sample_weight (or class_weight)"}}


def own_train_step_models():
    """Two model classes with their own train_step, as Keras' guide "Customizing what happens in
    fit()" writes one: with self.compute_loss, and with a loss computed by hand."""
    import keras
    import tensorflow as tf

    class GuideStep(keras.Sequential):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = self.compute_loss(y=y, y_pred=self(x, training=True))
            self.optimizer.apply(tape.gradient(loss, self.trainable_variables), self.trainable_variables)
            return {"loss": loss}

    class HandLoss(keras.Sequential):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(self(x, training=True) - y))
            self.optimizer.apply(tape.gradient(loss, self.trainable_variables), self.trainable_variables)
            return {"loss": loss}

    return GuideStep, HandLoss


@pytest.mark.parametrize("which", ["compute_loss", "by_hand"])
def test_a_train_step_of_ones_own_is_recorded_as_it_trains(which):
    """The weights equal the same train_step with global_clipnorm; the loss is each batch's (what
    the train_step returns), never a validation loss; a loss the watch cannot see is NaN, skips
    nothing, and the verdict says it was not recorded instead of judging it."""
    import keras

    from gradwatch.keras import GradientWatch

    cls = dict(zip(["compute_loss", "by_hand"], own_train_step_models()))[which]
    x, y = data()

    def trained(optimizer, callbacks):
        keras.utils.set_random_seed(3)
        model = cls([keras.Input((6,)), keras.layers.Dense(12, activation="tanh"), keras.layers.Dense(1)])
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=callbacks,
                  validation_data=(x[:32] * 50, y[:32] * 50))  # a validation loss far from the training's
        return model

    losses = []
    batch_loss = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: losses.append(logs["loss"]))
    reference = trained(keras.optimizers.SGD(0.2, global_clipnorm=0.5), [batch_loss])
    watch = GradientWatch(clip="global", norm=0.5)
    watched = trained(watch.wrap(keras.optimizers.SGD(0.2)), [watch])
    for a, b in zip(watched.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    rows, verdict = watch.rows, watch.summary().verdict
    assert len(rows) == 20 and not rows["nonfinite"].any() and rows["clipped"].any()
    assert "compute_loss" not in vars(watched)  # the model's own method is back
    if which == "compute_loss":
        np.testing.assert_allclose(rows["loss"], losses, rtol=1e-6)
        assert (rows["reg_loss"] == 0).all()  # no regularizers: compute_loss saw none
        assert not any("[loss_not_recorded]" in line for line in verdict)
    else:
        assert rows["loss"].isna().all() and rows["reg_loss"].isna().all()
        assert verdict[0].startswith("No loss was recorded (the model's train_step calls neither "
                                     "self.compute_loss(...) nor self.optimizer.scale_loss(...))")
        assert not any(code in line for line in verdict for code in ("[stable]", "[diverged]", "[nonfinite]"))
    assert verdict[-1] == ('Without an unclipped run this cannot say whether clipping helps; fit the same model '
                           'again from the same weights and seed with GradientWatch(clip="none") for the unclipped '
                           'baseline. [no_baseline]')


def test_gradwatch_run_refuses_a_model_with_its_own_train_step(cli, regression_npz, tmp_path):
    import keras

    guide_step, _ = own_train_step_models()
    registered = keras.saving.register_keras_serializable(package="gradwatch_tests")(guide_step)
    model = registered([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.save(tmp_path / "own_step.keras")
    code, out, err = cli("run", tmp_path / "own_step.keras", "--data", regression_npz, "--steps", 1)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "GuideStep has its own train_step(), which gradwatch's step would not follow" in err
    assert "callbacks=[watch]) with watch = gradwatch.keras.GradientWatch(...)" in err
