"""`gradwatch run` end to end, against a hand-written eager TF loop that shares no code with it."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from conftest import read_csv, tree_digest

RTOL = 1e-5


def reference_loop(forward, variables, x, y, loss_fn, batch_size, steps, lr, global_clip=None):
    """Plain SGD in eager TF: consecutive batches in file order, dense gradients, NumPy norms."""
    import tensorflow as tf

    per_epoch = len(x) // batch_size
    out = []
    for step in range(steps):
        k = step % per_epoch
        xb, yb = x[k * batch_size : (k + 1) * batch_size], y[k * batch_size : (k + 1) * batch_size]
        with tf.GradientTape() as tape:
            loss = loss_fn(tf.constant(yb), forward(tf.constant(xb)))
        grads = [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, variables)]
        norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
        scale = min(1.0, global_clip / norm) if global_clip else 1.0
        for v, g in zip(variables, grads):
            v.assign_sub(lr * scale * g)
        out.append((float(loss), norm, norm * scale))
    return out


def assert_rows_match(csv_path, reference, clipped=False):
    frame = read_csv(csv_path)
    assert len(frame) == len(reference)
    np.testing.assert_allclose(frame["loss"], [r[0] for r in reference], rtol=RTOL)
    np.testing.assert_allclose(frame["grad_norm"], [r[1] for r in reference], rtol=RTOL)
    np.testing.assert_allclose(frame["clipped_norm"], [r[2] for r in reference], rtol=RTOL)
    assert list(frame["step"]) == list(range(1, len(reference) + 1))


def test_tf_module_savedmodel_matches_reference(cli, module_model, regression_npz, tmp_path):
    import keras
    import tensorflow as tf

    before = tree_digest(module_model)
    csv = tmp_path / "steps.csv"
    code, out, err = cli("run", module_model, "--data", regression_npz, "--loss", "mse", "--no-shuffle",
                         "--batch-size", 16, "--steps", 8, "--lr", 0.05, "--csv", csv, "--quiet")
    assert code == 0, err
    obj = tf.saved_model.load(str(module_model))
    with np.load(regression_npz) as archive:
        x, y = archive["x"].astype(np.float32), archive["y"].astype(np.float32)
    ref = reference_loop(obj, [obj.w, obj.b], x, y, keras.losses.MeanSquaredError(), 16, 8, 0.05)
    assert_rows_match(csv, ref)
    assert tree_digest(module_model) == before  # the model files are never written
    assert "Verdict:" in out


def test_keras_export_savedmodel_with_global_clipping_matches_reference(cli, keras_export_model, regression_csv, tmp_path):
    import keras
    import tensorflow as tf

    csv = tmp_path / "steps.csv"
    code, _, err = cli("run", keras_export_model, "--data", regression_csv, "--target", "label", "--loss", "mse",
                       "--no-shuffle", "--batch-size", 10, "--steps", 12, "--lr", 0.1, "--clip", "global", "--norm", 0.5,
                       "--csv", csv, "--quiet")
    assert code == 0, err
    obj = tf.saved_model.load(str(keras_export_model))
    frame = pd.read_csv(regression_csv)
    x, y = frame[["a", "b", "c", "d"]].to_numpy(np.float32), frame["label"].to_numpy(np.float32)
    ref = reference_loop(obj.serve, list(obj.trainable_variables), x, y, keras.losses.MeanSquaredError(), 10, 12, 0.1,
                         global_clip=0.5)
    assert_rows_match(csv, ref)
    rows = read_csv(csv)
    assert rows["clipped"].any()
    assert (rows["clipped_norm"] <= 0.5 * (1 + 1e-6)).all()


def test_keras_signature_savedmodel_matches_reference(cli, keras_saved_model, classes_tfdata, tmp_path):
    import keras
    import tensorflow as tf

    csv = tmp_path / "steps.csv"
    code, _, err = cli("run", keras_saved_model, "--data", classes_tfdata, "--loss", "sparse_categorical_crossentropy",
                       "--from-logits", "--no-shuffle", "--batch-size", 8, "--steps", 10, "--lr", 0.2, "--csv", csv, "-q")
    assert code == 0, err
    obj = tf.saved_model.load(str(keras_saved_model))  # keep it: the signature's variables live on it
    sig = obj.signatures["serving_default"]
    (key,) = sig.structured_input_signature[1]
    (out_key,) = sig.structured_outputs
    pairs = list(tf.data.Dataset.load(str(classes_tfdata)).as_numpy_iterator())
    x, y = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    ref = reference_loop(lambda t: sig(**{key: t})[out_key], list(sig.trainable_variables), x, y,
                         keras.losses.SparseCategoricalCrossentropy(from_logits=True), 8, 10, 0.2)
    assert_rows_match(csv, ref)


def test_keras_file_with_embedding_matches_reference(cli, keras_file_model, ids_big_npz, tmp_path):
    """Embedding gradients arrive as IndexedSlices with repeated rows: the norm must be that of
    the summed (dense) gradient, which the reference computes by densifying."""
    import keras

    before = tree_digest(keras_file_model)
    csv = tmp_path / "steps.csv"
    code, _, err = cli("run", keras_file_model, "--data", ids_big_npz, "--loss", "mse", "--no-shuffle",
                       "--batch-size", 16, "--steps", 8, "--lr", 0.1, "--csv", csv, "-q")
    assert code == 0, err
    model = keras.saving.load_model(str(keras_file_model))
    with np.load(ids_big_npz) as archive:
        x, y = archive["x"], archive["y"]
    ref = reference_loop(lambda t: model(t, training=True), model.trainable_variables, x, y,
                         keras.losses.MeanSquaredError(), 16, 8, 0.1)
    assert_rows_match(csv, ref)
    assert tree_digest(keras_file_model) == before


def test_embedding_module_with_own_loss_matches_reference(cli, embedding_module_model, ids_npz, tmp_path):
    """The model's own loss(inputs, targets) is used without --loss; a variable the loss never
    reaches is named in a warning and left out."""
    import tensorflow as tf

    csv = tmp_path / "steps.csv"
    code, _, err = cli("run", embedding_module_model, "--data", ids_npz, "--no-shuffle", "--batch-size", 16,
                       "--steps", 8, "--lr", 0.05, "--clip", "global", "--norm", 2.0, "--csv", csv, "-q")
    assert code == 0, err
    assert "unused" in err and err.count("warning") == 1
    obj = tf.saved_model.load(str(embedding_module_model))
    with np.load(ids_npz) as archive:
        x, y = archive["x"], archive["y"]
    mse = lambda yt, yp: tf.reduce_mean(tf.square(yp - yt))  # noqa: E731 (the model's loss, written out)
    ref = reference_loop(obj, [obj.table, obj.out], x, y, mse, 16, 8, 0.05, global_clip=2.0)
    assert_rows_match(csv, ref)


def test_tf_global_norm_counts_repeated_rows_but_gradwatch_does_not():
    """Why the deduplication matters: TF's global_norm over raw IndexedSlices is wrong."""
    import tensorflow as tf

    from gradwatch.clip import dedupe, global_norm

    table = tf.Variable(tf.ones([5, 2]))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.nn.embedding_lookup(table, [1, 1, 1, 3]))
    (grad,) = tape.gradient(loss, [table])
    assert isinstance(grad, tf.IndexedSlices)
    dense = tf.convert_to_tensor(grad).numpy()
    true_norm = float(np.sqrt(np.sum(dense**2)))  # rows [3,3] and [1,1]: sqrt(20)
    assert true_norm == pytest.approx(math.sqrt(20))
    assert float(tf.linalg.global_norm([grad])) == pytest.approx(math.sqrt(8))  # counts rows apart
    assert float(global_norm([dedupe(grad)])) == pytest.approx(true_norm)


def test_same_seed_gives_same_numbers(cli, keras_export_model, regression_npz, tmp_path):
    runs = []
    for name in ("a.csv", "b.csv"):
        code, _, err = cli("run", keras_export_model, "--data", regression_npz, "--loss", "mse", "--shuffle",
                           "--seed", 7, "--batch-size", 16, "--epochs", 2, "--clip", "norm", "--norm", 1.0,
                           "--csv", tmp_path / name, "-q")
        assert code == 0, err
        runs.append(read_csv(tmp_path / name).drop(columns=["time_ms"]))
    pd.testing.assert_frame_equal(runs[0], runs[1])
    assert list(runs[0]["epoch"]) == [1] * 6 + [2] * 6
    # and a different seed gives a different order
    cli("run", keras_export_model, "--data", regression_npz, "--loss", "mse", "--shuffle", "--seed", 8,
        "--batch-size", 16, "--epochs", 2, "--clip", "norm", "--norm", 1.0, "--csv", tmp_path / "c.csv", "-q")
    assert not np.allclose(read_csv(tmp_path / "c.csv")["loss"], runs[0]["loss"])


def test_nonfinite_step_is_marked_and_skipped(module_model, data_dir):
    """A NaN in a batch: the row is marked, the weights stay as they were, the run goes on."""
    from gradwatch import Clipping, RunSpec, prepare, resolve

    x = np.ones((8, 4), np.float32)
    x[4] = np.nan  # second batch of 4
    path = data_dir / "with_nan.npz"
    np.savez(path, x=x, y=np.ones((8, 1), np.float32))
    trainer = prepare(resolve(RunSpec(model=str(module_model), data=str(path), loss="mse", batch_size=4, steps=3,
                                      shuffle=False, lr=0.1, fetch_every=1, allow_nonfinite_data=True)))
    seen = []

    def snapshot(rows):
        seen.append((rows[-1]["step"], [v.numpy().copy() for v in trainer.used]))

    result = trainer.run(Clipping("global", 1.0), on_rows=snapshot)
    flags = [r["nonfinite"] for r in result.rows]
    assert flags == [False, True, False]
    assert [r["nonfinite_input"] for r in result.rows] == flags  # the data, not the training
    assert not result.rows[1]["loss_spike"]  # counted once: as non-finite, not also as a spike
    after_1, after_2 = seen[0][1], seen[1][1]
    for a, b in zip(after_1, after_2):
        np.testing.assert_array_equal(a, b)  # step 2 changed nothing
    assert math.isfinite(result.rows[2]["loss"])  # the run went on


def test_on_nonfinite_stop_writes_rows_and_exits_nonzero(cli, module_model, data_dir, tmp_path):
    x = np.ones((12, 4), np.float32)
    x[8] = np.inf
    path = data_dir / "with_inf.npz"
    np.savez(path, x=x, y=np.ones((12, 1), np.float32))
    csv = tmp_path / "steps.csv"
    code, _, err = cli("run", module_model, "--data", path, "--loss", "mse", "--batch-size", 4, "--no-shuffle",
                       "--on-nonfinite", "stop", "--csv", csv, "-q", "--allow-nonfinite-data")
    assert code == 3
    assert err.strip().count("\n") == 0 and "not finite" in err
    rows = read_csv(csv)
    assert list(rows["nonfinite"]) == [False, False, True]


def test_lr_decay_follows_the_ptb_schedule(cli, module_model, regression_npz, tmp_path):
    csv = tmp_path / "steps.csv"
    code, _, err = cli("run", module_model, "--data", regression_npz, "--loss", "mse", "--batch-size", 32,
                       "--epochs", 4, "--lr", 1.0, "--lr-decay", 0.5, "--decay-after-epoch", 2, "--csv", csv, "-q")
    assert code == 0, err
    rows = read_csv(csv)
    by_epoch = rows.groupby("epoch")["lr"].unique()
    assert [list(v) for v in by_epoch] == [[1.0], [1.0], [0.5], [0.25]]


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_format_writes_rows_to_stdout(cli, module_model, regression_npz, fmt):
    import io
    import json

    code, out, err = cli("run", module_model, "--data", regression_npz, "--loss", "mse", "--steps", 3,
                         "--clip", "global", "--norm", 0.5, "--format", fmt, "-q")
    assert code == 0, err
    if fmt == "csv":
        rows = pd.read_csv(io.StringIO(out))
    else:
        records = json.loads(out)["rows"]
        # 3 steps: too few for the spike rule to judge one (too_short), unless the run broke down
        assert json.loads(out)["findings"][0]["code"] in ("too_short", "nonfinite", "diverged")
        assert records[0]["param"] == 0.5 and records[0]["threshold"] == 0.5  # numbers, not text
        assert records[0]["reg_loss"] is None  # NaN (unknown for a SavedModel) is null in JSON
        rows = pd.DataFrame(records)
    assert len(rows) == 3 and "grad_norm" in rows.columns
    assert list(rows.columns[:3]) == ["clip", "param", "step"] and list(rows.columns[-5:]) == [
        "model", "data", "optimizer", "loss_fn", "sparse_norm"]
    assert rows["clip"].tolist() == ["global"] * 3 and rows["optimizer"][0] == "SGD(learning_rate=0.01)"
    assert err == ""  # quiet: nothing on stderr
