"""Issue 23: continue the user's training where it stands. Keras' own train step, written out,
is the reference: Adam on a warm-up + cosine schedule with a global clip, saved at step N."""

from __future__ import annotations

import numpy as np
import pytest

BATCH, ROWS, SAVED_AT, MORE = 16, 160, 23, 12  # 10 batches an epoch: step 23 is inside epoch 3


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, 6)).astype("float32")
    y = (np.tanh(x @ rng.normal(size=(6, 1))) + 0.1).astype("float32")
    return x, y


def build():
    import keras

    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="tanh"),
                              keras.layers.BatchNormalization(), keras.layers.Dense(1)])
    schedule = keras.optimizers.schedules.CosineDecay(0.0, decay_steps=200, warmup_target=0.02, warmup_steps=30)
    model.compile(optimizer=keras.optimizers.Adam(schedule, global_clipnorm=0.5), loss="mse")
    return model


def keras_steps(model, x, y, first: int, count: int):
    """Keras' train step written out for steps first+1 .. first+count, batches in file order."""
    import tensorflow as tf

    per = ROWS // BATCH
    losses, rates = [], []
    for step in range(first, first + count):
        k = step % per
        xb, yb = x[k * BATCH:(k + 1) * BATCH], y[k * BATCH:(k + 1) * BATCH]
        rates.append(float(np.float32(model.optimizer.learning_rate.numpy())))
        with tf.GradientTape() as tape:
            y_pred = model(xb, training=True)
            loss = model.compute_loss(x=xb, y=yb, y_pred=y_pred, training=True)
        model.optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        losses.append(float(loss))
    return np.array(losses), np.array(rates)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    x, y = data()
    model = build()
    keras_steps(model, x, y, 0, SAVED_AT)
    path = tmp_path_factory.mktemp("resume") / "at23.keras"
    model.save(str(path))
    losses, rates = keras_steps(model, x, y, SAVED_AT, MORE)  # what the user's training did next
    return path, (x, y), losses, rates


def test_a_saved_file_continues_as_keras_does_step_by_step(saved):
    import gradwatch

    path, xy, losses, rates = saved
    rows = gradwatch.run(path, xy, clip="global", norm=0.5, batch_size=BATCH, steps=MORE, shuffle=False,
                         start_step=SAVED_AT)
    assert rows["step"].tolist() == list(range(SAVED_AT + 1, SAVED_AT + MORE + 1))
    assert rows["epoch"].tolist() == [(s - 1) // 10 + 1 for s in rows["step"]]
    np.testing.assert_allclose(rows["lr"], rates, rtol=1e-5)
    np.testing.assert_allclose(rows["loss"], losses, rtol=1e-5)
    fresh = gradwatch.run(path, xy, clip="global", norm=0.5, batch_size=BATCH, steps=MORE, shuffle=False,
                          start_step=SAVED_AT, fresh_optimizer=True)
    assert fresh["lr"][0] == 0.0  # the warm-up starts over
    assert abs(fresh["loss"][3] - losses[3]) > 1e-3


def test_every_compare_variant_starts_from_the_saved_state(saved):
    import gradwatch

    path, xy, losses, rates = saved
    long = gradwatch.compare(path, xy, variants=["none", "global:0.5", "global:0.05"], batch_size=BATCH, steps=MORE,
                             shuffle=False, start_step=SAVED_AT)
    for clip, param in (("none", None), ("global", 0.5), ("global", 0.05)):
        part = long[(long["clip"] == clip) & ((long["param"] == param) if param else long["param"].isna())]
        assert part["step"].iloc[0] == SAVED_AT + 1
        assert part["loss"].iloc[0] == pytest.approx(losses[0], rel=1e-5)
        assert part["lr"].iloc[0] == pytest.approx(rates[0], rel=1e-5)
    same = long[(long["clip"] == "global") & (long["param"] == 0.5)]
    np.testing.assert_allclose(same["loss"], losses, rtol=1e-5)


def test_the_start_line_says_what_was_restored(cli, saved, tmp_path):
    path, (x, y), _, _ = saved
    np.savez(tmp_path / "d.npz", x=x, y=y)
    code, out, err = cli("run", path, "--data", tmp_path / "d.npz", "--batch-size", BATCH, "--no-shuffle", "--steps", 2,
                         "--start-step", 20, "--clip", "global", "--norm", 0.5)
    assert code == 0, err
    assert "optimizer state restored from the model (iteration 23)" in err
    assert "give --start-step 23" in err
    code, out, err = cli("run", path, "--data", tmp_path / "d.npz", "--steps", 2, "--fresh-optimizer")
    assert code == 0 and "fresh optimizer state (--fresh-optimizer; the model's is at iteration 23)" in err
    code, out, err = cli("suggest", path, "--data", tmp_path / "d.npz", "--batch-size", BATCH, "--no-shuffle",
                         "--steps", 24, "--start-step", SAVED_AT)
    assert code == 0, err
    assert "optimizer state restored from the model (iteration 23)" in err  # the probe starts there too
    assert "--start-step 23" in out.strip().splitlines()[-1]


# --- tf.train.Checkpoint: a custom loop's, and gradwatch's own -------------------------------


def test_a_custom_loop_checkpoint_continues_on_the_savedmodel(cli, tmp_path, module_model, regression_npz):
    """A tf.Module trained by a hand-written loop with Keras' Adam (built over its variables in
    another order than gradwatch's), checkpointed at step 7: gradwatch continues it step by step."""
    import keras
    import pandas as pd
    import tensorflow as tf

    with np.load(regression_npz) as archive:
        x, y = archive["x"].astype("float32"), archive["y"].astype("float32")
    module = tf.saved_model.load(str(module_model))
    optimizer = keras.optimizers.Adam(0.05)
    variables = [module.b, module.w]  # not the order the SavedModel's function captures them in

    def step(k):
        xb, yb = x[(k % 3) * 32:(k % 3 + 1) * 32], y[(k % 3) * 32:(k % 3 + 1) * 32]
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(module(xb) - yb))
        optimizer.apply(tape.gradient(loss, variables), variables)
        return float(loss)

    for k in range(7):
        step(k)
    prefix = tf.train.Checkpoint(model=module, optimizer=optimizer).write(str(tmp_path / "loop" / "ckpt-7"))
    expected = [step(k) for k in range(7, 13)]
    code, out, err = cli("run", module_model, "--data", regression_npz, "--loss", "mse", "--optimizer", "adam",
                         "--lr", 0.05, "--no-shuffle", "--checkpoint", prefix, "--start-step", 7, "--steps", 6,
                         "--format", "csv")
    assert code == 0, err
    assert "restored from the checkpoint" in err and "(iteration 7)" in err
    rows = pd.read_csv(__import__("io").StringIO(out))
    assert rows["step"].tolist() == list(range(8, 14))
    np.testing.assert_allclose(rows["loss"], expected, rtol=1e-5)

    other = tf.Module()
    other.v = tf.Variable(tf.zeros([3, 3]))
    adam = keras.optimizers.Adam()
    adam.build([other.v])
    wrong = tf.train.Checkpoint(model=other, optimizer=adam).write(str(tmp_path / "other" / "ckpt"))
    code, out, err = cli("run", module_model, "--data", regression_npz, "--loss", "mse", "--optimizer", "adam",
                         "--checkpoint", wrong, "--steps", 2)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "does not match this model" in err, err
    code, out, err = cli("run", module_model, "--data", regression_npz, "--loss", "mse", "--checkpoint",
                         tmp_path / "nothing-here", "--steps", 2)
    assert code == 2 and "cannot read the checkpoint" in err, err


@pytest.mark.parametrize("read", ["--no-stream", "--stream"])
def test_a_window_around_a_spike_replays_the_long_run_exactly(cli, tmp_path, module_model, regression_npz, read):
    """The recipe of the README: a long run writes checkpoints; the window before a step replays
    from the nearest one with per-variable records, row for row as the long run had them -- in
    memory and with the rows read where they lie; step 20 is the third batch of the seventh
    shuffled epoch (3 batches an epoch), which the window reaches without making the six before."""
    from conftest import read_csv

    common = ["run", module_model, "--data", regression_npz, "--loss", "mse", "--optimizer", "adam", "--lr", 0.05,
              "--clip", "global", "--norm", 2.0, "-q", read]
    code, _, err = cli(*common, "--steps", 30, "--csv", tmp_path / "long.csv", "--save-checkpoints", tmp_path / "ck",
                       "--checkpoint-every", 10)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "ck").glob("*.index")) == ["step-10.index", "step-20.index",
                                                                         "step-30.index"]
    code, _, err = cli(*common, "--checkpoint", tmp_path / "ck" / "step-20", "--start-step", 20, "--steps", 10,
                       "--csv", tmp_path / "window.csv", "--layers-csv", tmp_path / "layers.csv")
    assert code == 0, err
    long, window = read_csv(tmp_path / "long.csv"), read_csv(tmp_path / "window.csv")
    tail = long[long["step"] > 20].reset_index(drop=True)
    assert window["step"].tolist() == list(range(21, 31))
    for column in ("loss", "grad_norm", "clipped_norm", "lr"):
        np.testing.assert_allclose(window[column], tail[column], rtol=1e-6, err_msg=column)
    assert set(read_csv(tmp_path / "layers.csv")["step"]) == set(range(21, 31))


def test_a_model_object_continues_from_its_own_optimizer_and_keeps_it(saved):
    """gradwatch.run(model): the compiled optimizer's state is where training goes on from, and
    the object's weights and optimizer state are as they were afterwards."""
    import keras

    import gradwatch

    path, xy, losses, rates = saved
    model = keras.saving.load_model(str(path))
    weights = [w.copy() for w in model.get_weights()]
    state = [v.numpy().copy() for v in model.optimizer.variables]
    rows = gradwatch.run(model, xy, clip="global", norm=0.5, batch_size=BATCH, steps=MORE, shuffle=False,
                         start_step=SAVED_AT)
    np.testing.assert_allclose(rows["loss"], losses, rtol=1e-5)
    np.testing.assert_allclose(rows["lr"], rates, rtol=1e-5)
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    for v, before in zip(model.optimizer.variables, state):
        np.testing.assert_array_equal(v.numpy(), before)


def test_a_loss_scale_optimizer_goes_on_at_its_saved_scale(tmp_path):
    """mixed_float16: the saved LossScaleOptimizer's dynamic scale (halved by Keras on overflowing
    steps) is the scale gradwatch's first step uses, not a fresh 2**15."""
    import keras

    import gradwatch

    x, y = data()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(4)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(1e-4), loss="mse")
        model.fit(x, y * 300.0, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)  # overflows at 2**15
        scale = float(model.optimizer.dynamic_scale.numpy())
        model.save(str(tmp_path / "mixed.keras"))
        rows = gradwatch.run(str(tmp_path / "mixed.keras"), (x, y * 300.0), batch_size=BATCH, steps=3, shuffle=False,
                             start_step=10)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert scale < 2.0**15
    assert rows["loss_scale"][0] == scale
