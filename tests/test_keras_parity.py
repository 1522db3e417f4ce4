"""Real users' Keras models, trained as Keras trains them (issue 10). Keras itself is the reference:
`train_on_batch` with the optimizer's own clipnorm / global_clipnorm / clipvalue, same batches."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import read_csv

RTOL = 1e-5


def keras_losses(path, x, y, batch_size, steps, clip_option, clip_value):
    """Per-step loss of Keras' own training: the saved file, its compiled loss and optimizer with
    the clip option set, train_on_batch over consecutive batches."""
    model = compiled_as_saved(path, clip_option, clip_value)
    return keras_train(model, x, y, batch_size, steps), model


def compiled_as_saved(path, clip_option=None, clip_value=None):
    """The file loaded by Keras and compiled with the file's own compile config (what Keras'
    compile_from_config does, and what its warning asks for where a class overrides compile():
    keras-hub's tasks), the optimizer's clip option set. Eager: the same kernels, without tracing
    a train function for a few steps."""
    import json
    import zipfile

    import keras

    model = keras.saving.load_model(str(path), safe_mode=True)
    with zipfile.ZipFile(path) as archive:
        config = keras.saving.deserialize_keras_object(json.loads(archive.read("config.json"))["compile_config"])
    if clip_option:
        setattr(config["optimizer"], clip_option, clip_value)
    model.compile(**{**config, "run_eagerly": True})
    return model


def keras_train(model, inputs, y, batch_size, steps, sample_weight=None):
    """train_on_batch over consecutive batches: each step's loss (the first entry where metrics follow)."""
    def take(values, rows):  # one array, or {input / output name: array}
        return {name: array[rows] for name, array in values.items()} if isinstance(values, dict) else values[rows]

    out = []
    for k in range(steps):
        rows = slice(k * batch_size, (k + 1) * batch_size)
        got = model.train_on_batch(take(inputs, rows), take(y, rows),
                                   sample_weight=None if sample_weight is None else sample_weight[rows])
        out.append(float(got[0] if isinstance(got, list) else got))
    return out


def gradwatch_rows(cli, path, data, tmp_path, batch_size, steps, *clip):
    csv = tmp_path / "steps.csv"
    code, out, err = cli("run", path, "--data", data, "--no-shuffle", "--batch-size", batch_size, "--steps", steps,
                         *clip, "--csv", csv)
    assert code == 0, err
    return read_csv(csv), out, err


@pytest.fixture(scope="session")
def conv_bn_model(models_dir, data_dir):
    """A small Conv + BatchNorm net with L2/L1 regularizers, compiled with SGD (momentum) and sparse CE."""
    import keras

    keras.utils.set_random_seed(21)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, kernel_regularizer=keras.regularizers.L2(1e-2)),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, kernel_regularizer=keras.regularizers.L1(1e-3), bias_regularizer=keras.regularizers.L2(1e-2)),
    ])
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    path = models_dir / "conv_bn.keras"
    model.save(path)
    rng = np.random.default_rng(21)
    x = rng.normal(size=(64, 8, 8, 1)).astype(np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0).astype(np.int64) + (x[:, 0, 0, 0] > 1).astype(np.int64)
    data = data_dir / "images.npz"
    np.savez(data, x=x, y=y)
    return path, data, x, y


def test_conv_batchnorm_regularizers_equal_keras_with_global_clipnorm(cli, conv_bn_model, tmp_path):
    path, data, x, y = conv_bn_model
    rows, out, err = gradwatch_rows(cli, path, data, tmp_path, 8, 8, "--clip", "global", "--norm", 0.5)
    want, keras_model = keras_losses(path, x, y, 8, 8, "global_clipnorm", 0.5)
    np.testing.assert_allclose(rows["loss"], want, rtol=RTOL)
    assert (rows["reg_loss"] > 0).all() and (rows["reg_loss"] < rows["loss"]).all()
    assert rows["clipped"].any()
    assert "SGD(learning_rate=0.05, momentum=0.9), the model's compiled optimizer" in err
    assert "loss: the model's compiled loss" in err


def test_regularization_is_recorded_apart_and_matches_model_losses(conv_bn_model):
    """Step 1: loss = compiled data loss + sum(model.losses); reg_loss = sum(model.losses)."""
    import keras

    from gradwatch import Clipping, RunSpec, prepare, resolve

    path, data, x, y = conv_bn_model
    trainer = prepare(resolve(RunSpec(model=str(path), data=str(data), batch_size=8, steps=1, shuffle=False)))
    row = trainer.run(Clipping("none")).rows[0]
    model = keras.saving.load_model(str(path))
    logits = model(x[:8], training=True)
    reg = float(sum(float(v) for v in model.losses))
    data_loss = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y[:8], logits))
    assert row["reg_loss"] == pytest.approx(reg, rel=RTOL)
    assert row["loss"] == pytest.approx(data_loss + reg, rel=RTOL)


@pytest.fixture(scope="session")
def lstm_lm(models_dir, data_dir):
    """An Embedding + LSTM language model compiled with Adam and an ExponentialDecay schedule."""
    import keras

    keras.utils.set_random_seed(22)
    model = keras.Sequential([
        keras.Input((10,), dtype="int32"),
        keras.layers.Embedding(100, 8),
        keras.layers.LSTM(16, return_sequences=True),
        keras.layers.Dense(100),
    ])
    schedule = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=3, decay_rate=0.5)
    model.compile(optimizer=keras.optimizers.Adam(schedule, beta_1=0.8),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    path = models_dir / "lstm_lm.keras"
    model.save(path)
    rng = np.random.default_rng(22)
    # No id repeats within a batch of 8 windows: Keras' clipnorm squares repeated embedding rows
    # apart (see test_keras_clipnorm_counts_repeated_embedding_rows_apart), gradwatch sums them first.
    x = np.concatenate([rng.permutation(100)[:80].reshape(8, 10) for _ in range(6)]).astype(np.int32)
    y = rng.integers(0, 100, size=(48, 10)).astype(np.int32)
    data = data_dir / "lm.npz"
    np.savez(data, x=x, y=y)
    return path, data, x, y


def test_embedding_lstm_with_schedule_equals_keras_with_clipnorm(cli, lstm_lm, tmp_path):
    path, data, x, y = lstm_lm
    rows, out, err = gradwatch_rows(cli, path, data, tmp_path, 8, 6, "--clip", "norm", "--norm", 0.05)
    want, keras_model = keras_losses(path, x, y, 8, 6, "clipnorm", 0.05)
    np.testing.assert_allclose(rows["loss"], want, rtol=RTOL)
    assert rows["clipped"].any()
    # the schedule's learning rate of every step: 0.02 * 0.5 ** (step / 3)
    np.testing.assert_allclose(rows["lr"], [0.02 * 0.5 ** (k / 3) for k in range(6)], rtol=1e-6)
    assert "Adam(learning_rate=schedule ExponentialDecay, beta_1=0.8" in err


@pytest.fixture(scope="session")
def attention_block(models_dir, data_dir):
    """A MultiHeadAttention block with LayerNorm and an add_loss on its activations, RMSprop, MSE."""
    import keras

    keras.utils.set_random_seed(23)
    inputs = keras.Input((6, 8))
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(inputs, inputs)
    normed = keras.layers.LayerNormalization()(inputs + attended)
    pooled = keras.layers.GlobalAveragePooling1D()(normed)
    outputs = keras.layers.Dense(1, activity_regularizer=keras.regularizers.L2(1e-2))(pooled)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.RMSprop(0.01), loss="mse")
    path = models_dir / "attention.keras"
    model.save(path)
    rng = np.random.default_rng(23)
    x = rng.normal(size=(40, 6, 8)).astype(np.float32)
    y = x[:, :, 0].sum(axis=1, keepdims=True).astype(np.float32)
    data = data_dir / "sequences.npz"
    np.savez(data, x=x, y=y)
    return path, data, x, y


def test_attention_block_equals_keras_with_clipvalue(cli, attention_block, tmp_path):
    path, data, x, y = attention_block
    rows, out, err = gradwatch_rows(cli, path, data, tmp_path, 8, 5, "--clip", "value", "--value", 0.05)
    want, _ = keras_losses(path, x, y, 8, 5, "clipvalue", 0.05)
    np.testing.assert_allclose(rows["loss"], want, rtol=RTOL)
    assert (rows["reg_loss"] > 0).all()  # the activity regularizer is an add_loss term


@pytest.fixture(scope="session")
def two_input_model(models_dir, data_dir):
    """Numeric features and token ids, compiled with AdamW(weight_decay) and MSE."""
    import keras

    keras.utils.set_random_seed(24)
    numbers = keras.Input((4,), name="numbers")
    ids = keras.Input((5,), dtype="int32", name="ids")
    embedded = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(64, 4)(ids))
    hidden = keras.layers.Dense(8, activation="tanh")(keras.layers.Concatenate()([numbers, embedded]))
    model = keras.Model([numbers, ids], keras.layers.Dense(1)(hidden))  # input order: numbers, ids
    model.compile(optimizer=keras.optimizers.AdamW(0.01, weight_decay=0.05), loss="mse")
    path = models_dir / "two_inputs.keras"
    model.save(path)
    rng = np.random.default_rng(24)
    x = {"numbers": rng.normal(size=(48, 4)).astype(np.float32),  # ids: no repeats within a batch of 8
         "ids": np.concatenate([rng.permutation(64)[:40].reshape(8, 5) for _ in range(6)]).astype(np.int32)}
    y = (x["numbers"].sum(axis=1, keepdims=True) + x["ids"].mean(axis=1, keepdims=True) / 10).astype(np.float32)
    data = data_dir / "two_inputs.npz"
    np.savez(data, numbers=x["numbers"], ids=x["ids"], y=y)
    return path, data, x, y


def test_two_input_model_equals_keras_with_global_clipnorm(cli, two_input_model, tmp_path):
    path, data, x, y = two_input_model
    rows, out, err = gradwatch_rows(cli, path, data, tmp_path, 8, 6, "--clip", "global", "--norm", 0.3)
    want, _ = keras_losses(path, x, y, 8, 6, "global_clipnorm", 0.3)
    np.testing.assert_allclose(rows["loss"], want, rtol=RTOL)
    assert "AdamW(learning_rate=0.01, weight_decay=0.05" in err


def test_two_inputs_by_x_key_and_from_tf_data(cli, two_input_model, tmp_path):
    import tensorflow as tf

    path, _, x, y = two_input_model
    renamed = tmp_path / "renamed.npz"
    np.savez(renamed, a=x["numbers"], b=x["ids"], target=y)
    first, _, err = gradwatch_rows(cli, path, renamed, tmp_path, 8, 4, "--x-key", "a,b", "--y-key", "target")
    folder = tmp_path / "two_inputs_tfdata"
    tf.data.Dataset.from_tensor_slices(({"ids": x["ids"], "numbers": x["numbers"]}, y)).save(str(folder))
    second, _, err = gradwatch_rows(cli, path, folder, tmp_path, 8, 4)
    np.testing.assert_allclose(first["loss"], second["loss"], rtol=1e-6)
    # a tuple of inputs in the model's input order (numbers, ids), in memory and read as a stream
    ordered = tmp_path / "two_inputs_in_order"
    tf.data.Dataset.from_tensor_slices(((x["numbers"], x["ids"]), y)).save(str(ordered))
    for stream in ("--no-stream", "--stream"):
        third, _, err = gradwatch_rows(cli, path, ordered, tmp_path, 8, 4, stream)
        np.testing.assert_allclose(first["loss"], third["loss"], rtol=1e-6, err_msg=stream)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, numbers=x["numbers"], ids=x["ids"][:, :3], y=y)
    code, _, err = cli("run", path, "--data", wrong, "--batch-size", 8, "--steps", 2)
    assert code == 2 and "data for input 'ids' has shape (None, 3)" in err and "(None, 5)" in err


def test_keras_clipnorm_counts_repeated_embedding_rows_apart(lstm_lm):
    """Why the embedding tests avoid repeated ids: Keras' clipnorm measures an IndexedSlices
    gradient by its raw rows, one per occurrence; the gradient applied sums them. gradwatch's
    norm is that of the applied gradient (the dense one)."""
    import tensorflow as tf

    from gradwatch.clip import dedupe, global_norm

    raw = tf.IndexedSlices(tf.constant([[3.0, 4.0], [3.0, 4.0]]), tf.constant([7, 7]), tf.constant([10, 2]))
    assert float(tf.norm(raw.values)) == pytest.approx(50**0.5)  # what clipnorm measures
    assert float(tf.norm(tf.convert_to_tensor(raw))) == pytest.approx(10.0)  # the gradient applied
    assert float(global_norm([dedupe(raw)])) == pytest.approx(10.0)  # what gradwatch reports and clips by


def test_dropout_runs_in_training_mode(models_dir):
    import keras
    import tensorflow as tf

    from gradwatch.load import models

    keras.utils.set_random_seed(25)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dropout(0.5), keras.layers.Dense(4)])
    path = models_dir / "dropout.keras"
    model.save(path)
    loaded = models.load(str(path))
    x = tf.ones((4, 16))
    assert not np.allclose(loaded.forward(x).numpy(), loaded.forward(x).numpy())  # new masks each call


def test_dropout_masks_follow_the_seed(cli, models_dir, data_dir, tmp_path):
    import keras

    keras.utils.set_random_seed(28)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16), keras.layers.Dropout(0.5), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    path = models_dir / "dropout_seed.keras"
    model.save(path)
    data = data_dir / "dropout.npz"
    np.savez(data, x=np.ones((32, 6), np.float32), y=np.ones((32, 1), np.float32))
    runs = [gradwatch_rows(cli, path, data, tmp_path, 8, 4, "--seed", seed)[0]["loss"].tolist() for seed in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_an_inference_mode_export_is_named_with_the_fix(cli, models_dir, data_dir):
    import keras

    keras.utils.set_random_seed(26)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
                              keras.layers.Dense(1)])
    served = models_dir / "bn_served"
    model.export(str(served), verbose=False)
    trained = models_dir / "bn_training"
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("train", lambda x: model(x, training=True),
                         input_signature=[keras.InputSpec(shape=(None, 4), dtype="float32")])
    archive.write_out(str(trained), verbose=False)
    rng = np.random.default_rng(26)
    data = data_dir / "bn.npz"
    np.savez(data, x=rng.normal(size=(32, 4)).astype(np.float32), y=rng.normal(size=(32, 1)).astype(np.float32))
    base = ["--data", data, "--loss", "mse", "--batch-size", 8, "--steps", 4, "-q"]
    code, _, err = cli("run", served, *base)
    assert code == 0 and err.count("inference") == 1 and "--endpoint" in err
    code, _, err = cli("run", trained, *base, "--endpoint", "train")
    assert code == 0 and "inference" not in err, err


def test_batchnorm_statistics_are_restored_between_compare_variants(cli, conv_bn_model, tmp_path):
    path, data, *_ = conv_bn_model
    long_csv = tmp_path / "long.csv"
    code, _, err = cli("compare", path, "--data", data, "--no-shuffle", "--batch-size", 8, "--steps", 4,
                       "--variants", "none,global:0.5,none", "--csv", long_csv, "-q")
    assert code == 0, err
    long = read_csv(long_csv)
    solo, _, _ = gradwatch_rows(cli, path, data, tmp_path, 8, 4, "--clip", "global", "--norm", 0.5)
    part = long[long["clip"] == "global"].reset_index(drop=True)
    np.testing.assert_allclose(part["loss"], solo["loss"], rtol=1e-6)


def test_any_keras_optimizer_and_loss_by_name(cli, module_model, regression_npz, tmp_path):
    csv = tmp_path / "steps.csv"
    code, _, err = cli("run", module_model, "--data", regression_npz, "--loss", "log_cosh", "--optimizer", "lion",
                       "--opt", "beta_1=0.8", "--lr", 1e-3, "--steps", 3, "--csv", csv)
    assert code == 0, err
    assert "Lion(learning_rate=0.001, beta_1=0.8" in err and "loss: log_cosh (--loss)" in err
    for args, expected in [(["--optimizer", "bogus"], "unknown optimizer 'bogus'"),
                           (["--optimizer", "adam", "--opt", "nonsense=1"], "optimizer adam"),
                           (["--opt", "beta_1"], "is not NAME=VALUE"),
                           (["--loss", "nonsense"], "unknown loss 'nonsense'")]:
        code, _, err = cli("run", module_model, "--data", regression_npz, "--loss", "mse", *args, "--steps", 2)
        assert code == 2 and expected in err, (args, err)


@pytest.fixture(scope="session")
def mixed_precision_model(models_dir, data_dir):
    """Dense layers computing in float16 (mixed_float16 policy), a float32 output layer, SGD."""
    import keras

    keras.utils.set_random_seed(27)
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(16, activation="tanh", dtype="mixed_float16"),
        keras.layers.Dense(16, activation="tanh", dtype="mixed_float16"),
        keras.layers.Dense(1, dtype="float32"),
    ])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    path = models_dir / "mixed.keras"
    model.save(path)
    rng = np.random.default_rng(27)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x.sum(axis=1, keepdims=True) * 3).astype(np.float32)
    data = data_dir / "mixed.npz"
    np.savez(data, x=x, y=y)
    return path, data, x, y


def test_mixed_precision_unscales_before_clipping_and_marks_overflow(cli, mixed_precision_model, tmp_path):
    """Reference: Keras' LossScaleOptimizer around SGD with global_clipnorm (clipping the unscaled
    gradient), the same steps; the first steps overflow at scale 2**15 and are skipped by both."""
    import keras

    path, data, x, y = mixed_precision_model
    rows, out, err = gradwatch_rows(cli, path, data, tmp_path, 8, 8, "--clip", "global", "--norm", 1.0)
    model = keras.saving.load_model(str(path))
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05, global_clipnorm=1.0))
    model.compile(optimizer=optimizer, loss="mse")
    want, scales = [], []
    for k in range(8):
        if optimizer.built:
            scales.append(float(optimizer.dynamic_scale.numpy()))
        else:
            scales.append(optimizer.initial_scale)
        want.append(float(model.train_on_batch(x[8 * k : 8 * k + 8], y[8 * k : 8 * k + 8])))
    np.testing.assert_allclose(rows["loss"], want, rtol=1e-3)  # float16 forward: 1e-3, not 1e-5
    np.testing.assert_allclose(rows["loss_scale"], scales)
    assert rows["overflow"].any() and not rows["nonfinite"].any()
    finite = rows[~rows["overflow"]]
    assert (finite["clipped_norm"] <= 1.0 * (1 + 1e-5)).all()  # the unscaled gradient was clipped
    assert "dynamic loss scaling" in err


@pytest.fixture(scope="session")
def float64_model(models_dir, data_dir):
    """Every layer in float64 (a scientific user's model), float32 data in the file, SGD."""
    import keras

    keras.utils.set_random_seed(28)
    model = keras.Sequential([
        keras.Input((4,), dtype="float64"),
        keras.layers.Dense(16, activation="tanh", dtype="float64"),
        keras.layers.Dense(1, dtype="float64"),
    ])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    path = models_dir / "float64.keras"
    model.save(path)
    rng = np.random.default_rng(28)
    x = rng.normal(size=(48, 4)).astype(np.float32)
    y = (x.sum(axis=1, keepdims=True) * 3).astype(np.float32)
    data = data_dir / "float64.npz"
    np.savez(data, x=x, y=y)
    return path, data, x, y


@pytest.mark.parametrize("clip", [("global", "global_clipnorm", 0.3), ("norm", "clipnorm", 0.3),
                                  ("value", "clipvalue", 0.05)], ids=["global", "norm", "value"])
def test_a_float64_model_is_clipped_in_float64_as_keras_clips_it(cli, float64_model, tmp_path, clip):
    """The threshold meets float64 gradients in their own dtype (was: a float32 threshold against
    them, "the model cannot compute the loss on this data" for every strategy but none)."""
    path, data, x, y = float64_model
    strategy, option, threshold = clip
    flag = "--value" if strategy == "value" else "--norm"
    rows, out, err = gradwatch_rows(cli, path, data, tmp_path, 8, 6, "--clip", strategy, flag, threshold)
    want, _ = keras_losses(path, x, y, 8, 6, option, threshold)
    np.testing.assert_allclose(rows["loss"], want, rtol=1e-6)
    assert rows["clipped"].all()
    assert (rows["threshold"] == threshold).all()  # 0.3 itself, not float32's 0.30000001192...
    if strategy == "global":  # N / ‖g‖ times ‖g‖, in float64
        np.testing.assert_allclose(rows["clipped_norm"], threshold, rtol=1e-12)


def test_a_signature_with_several_keyword_inputs(cli, two_input_model, models_dir, tmp_path):
    """tf.saved_model.save(keras_model): serving_default takes one keyword per input; the npz names them."""
    import keras
    import tensorflow as tf

    path, data, x, y = two_input_model
    model = keras.saving.load_model(str(path))
    saved = models_dir / "two_inputs_saved"
    tf.saved_model.save(model, str(saved))
    signature = tf.saved_model.load(str(saved)).signatures["serving_default"]
    specs = signature.structured_input_signature[1]  # keyword -> TensorSpec; the ids take 5 columns
    renamed = tmp_path / "by_signature.npz"
    np.savez(renamed, y=y, **{name: x["ids" if spec.shape[-1] == 5 else "numbers"] for name, spec in specs.items()})
    rows, _, err = gradwatch_rows(cli, saved, renamed, tmp_path, 8, 3, "--loss", "mse", "--lr", 0.01)
    assert len(rows) == 3 and np.isfinite(rows["loss"]).all()
    with tf.GradientTape():
        first = float(keras.losses.MeanSquaredError()(y[:8], model({"numbers": x["numbers"][:8], "ids": x["ids"][:8]})))
    assert rows["loss"][0] == pytest.approx(first, rel=RTOL)


# --- models built by libraries: keras.applications and keras-hub ------------------------------


@pytest.fixture(scope="session")
def mobilenet(models_dir, data_dir):
    """keras.applications.MobileNetV3Small as the library builds it (Rescaling, BatchNorm,
    squeeze-and-excite, hard-swish), no weights downloaded, compiled with SGD + momentum."""
    import keras

    keras.utils.set_random_seed(31)
    model = keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), alpha=0.75, weights=None, classes=4,
                                                dropout_rate=0.0)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="sparse_categorical_crossentropy")
    path = models_dir / "mobilenet_v3_small.keras"
    model.save(path)
    rng = np.random.default_rng(31)
    x = rng.uniform(0, 255, size=(24, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 4, size=24)
    data = data_dir / "pictures.npz"
    np.savez(data, x=x, y=y)
    return path, data, x, y


def test_keras_applications_mobilenet_equals_keras_with_global_clipnorm(cli, mobilenet, tmp_path):
    path, data, x, y = mobilenet
    rows, out, err = gradwatch_rows(cli, path, data, tmp_path, 8, 3, "--clip", "global", "--norm", 1)
    want = keras_train(compiled_as_saved(path, "global_clipnorm", 1.0), x, y, 8, 3)
    np.testing.assert_allclose(rows["loss"], want, rtol=RTOL)
    assert rows["clipped"].all() and "SGD(learning_rate=0.05, momentum=0.9)" in err


@pytest.fixture(scope="session")
def hub_models(models_dir, data_dir):
    """Two keras-hub tasks on tiny random backbones, inputs as keras-hub's preprocessors give them
    (token_ids, a bool padding_mask, segment_ids): GPT2CausalLM (its embedding tied to the output
    projection) compiled with AdamW, and BertTextClassifier compiled with Adam. Both classes
    override compile(), so Keras loads them without their compile config."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(32)
    rng = np.random.default_rng(32)
    vocabulary, length, n = 40, 10, 24
    small = dict(vocabulary_size=vocabulary, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
                 dropout=0.0, max_sequence_length=length)
    gpt2 = keras_hub.models.GPT2CausalLM(backbone=keras_hub.models.GPT2Backbone(**small), preprocessor=None)
    gpt2.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=0.004),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    bert = keras_hub.models.BertTextClassifier(backbone=keras_hub.models.BertBackbone(**small), num_classes=3,
                                               preprocessor=None, dropout=0.0)
    bert.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    tokens = rng.integers(0, vocabulary, size=(n, length + 1)).astype(np.int32)
    mask = np.ones((n, length), bool)
    mask[::3, -3:] = False  # padded tails
    lm = {"token_ids": tokens[:, :-1], "padding_mask": mask}, tokens[:, 1:]
    classify = {"token_ids": tokens[:, 1:], "padding_mask": mask, "segment_ids": np.zeros((n, length), np.int32)}, \
        rng.integers(0, 3, size=n)
    out = {}
    for name, model, (inputs, y) in (("gpt2", gpt2, lm), ("bert", bert, classify)):
        path, data = models_dir / f"hub_{name}.keras", data_dir / f"hub_{name}.npz"
        model.save(path)
        np.savez(data, y=y, **inputs)
        out[name] = path, data, inputs, y
    return out


def test_keras_hub_gpt2_trains_with_its_saved_adamw_and_equals_keras(cli, hub_models, tmp_path):
    """As keras-hub's CausalLM preprocessor gives a batch: (x, y, sample_weight = padding_mask),
    so the padded positions weigh nothing in the loss."""
    path, data, inputs, y = hub_models["gpt2"]
    weights = inputs["padding_mask"].astype(np.float32)
    weighted = tmp_path / "weighted.npz"
    np.savez(weighted, y=y, sample_weight=weights, **inputs)
    rows, out, err = gradwatch_rows(cli, path, weighted, tmp_path, 8, 3, "--clip", "global", "--norm", 0.5)
    want = keras_train(compiled_as_saved(path, "global_clipnorm", 0.5), inputs, y, 8, 3, weights)
    np.testing.assert_allclose(rows["loss"], want, rtol=RTOL)
    unweighted = keras_train(compiled_as_saved(path, "global_clipnorm", 0.5), inputs, y, 8, 1)
    assert abs(rows["loss"][0] - unweighted[0]) > 1e-3  # the weights change the loss: they were used
    # the file's AdamW, not the Adam a bare load gives a keras-hub task; no Keras warning left
    assert "AdamW(learning_rate=0.001, weight_decay=0.004" in err and "compile() was not called" not in err
    assert "loss: the model's compiled loss, each row weighted by the data's sample_weight" in err
    assert rows["clipped"].all()


def test_keras_hub_bert_classifier_equals_keras_with_clipnorm_on_raw_rows(cli, hub_models, tmp_path):
    path, data, inputs, y = hub_models["bert"]
    rows, out, err = gradwatch_rows(cli, path, data, tmp_path, 8, 3, "--clip", "norm", "--norm", 0.05,
                                    "--sparse-norm", "rows")
    want = keras_train(compiled_as_saved(path, "clipnorm", 0.05), inputs, y, 8, 3)
    np.testing.assert_allclose(rows["loss"], want, rtol=RTOL)
    assert rows["clipped"].all() and (rows["grad_norm_rows"] != rows["grad_norm"]).all()  # ids repeat in a batch


@pytest.fixture(scope="session")
def masked_tagger(models_dir, data_dir):
    """A sequence tagger on padded windows: Embedding(mask_zero=True) -> Bidirectional(GRU) ->
    Dense per position. Keras carries the mask to the output, so fit's loss is the mean over the
    positions that are not padding (Keras' apply_mask), not over every position."""
    import keras

    keras.utils.set_random_seed(33)
    vocabulary, length, n = 30, 12, 32
    model = keras.Sequential([
        keras.Input((length,), dtype="int32"),
        keras.layers.Embedding(vocabulary, 8, mask_zero=True),
        keras.layers.Bidirectional(keras.layers.GRU(8, return_sequences=True)),
        keras.layers.Dense(vocabulary),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    path = models_dir / "masked_tagger.keras"
    model.save(path)
    rng = np.random.default_rng(33)
    x = rng.integers(1, vocabulary, size=(n, length)).astype(np.int32)
    for row, kept in zip(x, rng.integers(3, length, size=n)):
        row[kept:] = 0  # padded tails of 1 to 9 positions
    y = rng.integers(0, vocabulary, size=(n, length)).astype(np.int32)
    data = data_dir / "padded.npz"
    np.savez(data, x=x, y=y)
    return path, data, x, y


def test_a_padding_mask_leaves_padded_positions_out_of_the_loss_as_fit_does(cli, masked_tagger, tmp_path):
    import keras

    path, data, x, y = masked_tagger
    # Ids repeat in every batch (the padding most): Keras' clipnorm measures raw rows (--sparse-norm rows)
    # and keeps them apart for Adam, which squares them one by one.
    rows, out, err = gradwatch_rows(cli, path, data, tmp_path, 8, 4, "--clip", "norm", "--norm", 0.02,
                                    "--sparse-norm", "rows")
    want = keras_train(compiled_as_saved(path, "clipnorm", 0.02), x, y, 8, 4)
    np.testing.assert_allclose(rows["loss"], want, rtol=RTOL)
    assert rows["clipped"].any()
    # Step 1 by hand: the mean of the per-position losses where the id is not padding. The mean over
    # every position, padding included (a SavedModel's output carries no mask), is another number.
    model = keras.saving.load_model(str(path))
    every = np.asarray(keras.losses.sparse_categorical_crossentropy(y[:8], model(x[:8]), from_logits=True))
    kept = x[:8] != 0
    assert rows["loss"][0] == pytest.approx(every[kept].mean(), rel=1e-6)
    assert abs(every.mean() - every[kept].mean()) > 1e-4 and not kept.all()
    # The README's warning: exported, the model has no mask, and every position counts.
    served = tmp_path / "tagger_served"
    model.export(str(served), verbose=False)
    exported, _, _ = gradwatch_rows(cli, served, data, tmp_path, 8, 1, "--clip", "none",
                                    "--loss", "sparse_categorical_crossentropy", "--from-logits")
    assert exported["loss"][0] == pytest.approx(every.mean(), rel=1e-6)


# --- sample weights, as fit takes them --------------------------------------------------------


@pytest.fixture(scope="session")
def weighted_classifier(models_dir, data_dir):
    """A compiled classifier with an L2 regularizer and rows weighted 0 to 2 (every fifth 0)."""
    import keras

    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh",
                                                                    kernel_regularizer=keras.regularizers.L2(1e-3)),
                              keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    path = models_dir / "weighted_classifier.keras"
    model.save(path)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=64)
    w = rng.uniform(0, 2, size=64).astype(np.float32)
    w[::5] = 0
    data = data_dir / "weighted.npz"
    np.savez(data, x=x, y=y, sample_weight=w)
    return path, data, x, y, w


@pytest.mark.parametrize("stream", ["--no-stream", "--stream"])
def test_sample_weights_weigh_the_compiled_loss_as_fit_does(cli, weighted_classifier, tmp_path, stream):
    path, data, x, y, w = weighted_classifier
    rows, out, err = gradwatch_rows(cli, path, data, tmp_path, 8, 5, "--clip", "global", "--norm", 0.5, stream)
    want = keras_train(compiled_as_saved(path, "global_clipnorm", 0.5), x, y, 8, 5, w)
    np.testing.assert_allclose(rows["loss"], want, rtol=RTOL)
    assert (rows["loss_fn"] == "the model's compiled loss, each row weighted by the data's sample_weight").all()


def test_a_csv_sample_weight_column_weighs_the_loss_as_fit_does(cli, weighted_classifier, tmp_path):
    """The same rows as a CSV: six feature columns, a sample_weight column, the target last."""
    import pandas as pd

    path, _, x, y, w = weighted_classifier
    table = pd.DataFrame(x, columns=[f"f{k}" for k in range(6)])
    table.insert(3, "sample_weight", w)  # anywhere among the columns: by its name
    table["label"] = y
    table.to_csv(tmp_path / "weighted.csv", index=False)
    rows, out, err = gradwatch_rows(cli, path, tmp_path / "weighted.csv", tmp_path, 8, 5, "--clip", "global", "--norm", 0.5)
    want = keras_train(compiled_as_saved(path, "global_clipnorm", 0.5), x, y, 8, 5, w)
    np.testing.assert_allclose(rows["loss"], want, rtol=RTOL)
    assert (rows["loss_fn"] == "the model's compiled loss, each row weighted by the data's sample_weight").all()
    table.loc[7, "sample_weight"] = -1.0
    table.to_csv(tmp_path / "negative.csv", index=False)
    code, _, err = cli("run", path, "--data", tmp_path / "negative.csv", "--steps", 1)
    assert code == 2 and err.strip().splitlines()[-1].endswith(
        "negative.csv: line 9, column 'sample_weight' is -1; sample weights must be finite and >= 0")


def test_sample_weights_weigh_a_loss_given_by_name_and_the_python_api_takes_them(cli, weighted_classifier, tmp_path):
    import keras

    import gradwatch

    path, data, x, y, w = weighted_classifier
    rows, out, err = gradwatch_rows(cli, path, data, tmp_path, 8, 4, "--loss", "sparse_categorical_crossentropy",
                                    "--from-logits", "--optimizer", "sgd", "--lr", 0.1)
    model = keras.saving.load_model(str(path))
    model.compile(optimizer=keras.optimizers.SGD(0.1), run_eagerly=True,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    np.testing.assert_allclose(rows["loss"], keras_train(model, x, y, 8, 4, w), rtol=RTOL)
    frame = gradwatch.run(keras.saving.load_model(str(path)), (x, y, w), steps=4, batch_size=8, shuffle=False)
    reference = keras_train(compiled_as_saved(path), x, y, 8, 4, w)
    np.testing.assert_allclose(frame["loss"], reference, rtol=RTOL)
    # a tf.data.Dataset.save folder of (x, y, sample_weight), as fit takes a dataset
    import tensorflow as tf

    folder = tmp_path / "weighted_tfdata"
    tf.data.Dataset.from_tensor_slices((x, y, w)).batch(16).save(str(folder))
    for stream in ("--no-stream", "--stream"):
        rows, _, err = gradwatch_rows(cli, path, folder, tmp_path, 8, 4, stream)
        np.testing.assert_allclose(rows["loss"], reference, rtol=RTOL, err_msg=stream)
        assert "each row weighted by the data's sample_weight" in err
    # TFRecord files of tf.train.Example with a feature named sample_weight, streamed
    records = tmp_path / "weighted.tfrecord"
    with tf.io.TFRecordWriter(str(records)) as writer:
        for features, label, weight in zip(x, y, w):
            feature = {"x": tf.train.Feature(float_list=tf.train.FloatList(value=features.tolist())),
                       "sample_weight": tf.train.Feature(float_list=tf.train.FloatList(value=[float(weight)])),
                       "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    rows, _, err = gradwatch_rows(cli, path, records, tmp_path, 8, 4, "--features", "x:float32:6,sample_weight:float32,y:int64")
    np.testing.assert_allclose(rows["loss"], reference, rtol=RTOL)
    assert "each row weighted by the data's sample_weight" in err


def test_streamed_sample_weights_are_checked_as_the_in_memory_ones(cli, weighted_classifier, tmp_path):
    import tensorflow as tf

    path, data, x, y, w = weighted_classifier
    negative = np.where(np.arange(64) == 9, -1.0, w).astype(np.float32)
    folder = tmp_path / "negative_tfdata"
    tf.data.Dataset.from_tensor_slices((x, y, negative)).save(str(folder))
    code, _, err = cli("run", path, "--data", folder, "--stream", "--steps", 1)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "sample_weight[9] is -1; sample weights must be finite and >= 0" in err, err
    wide = tmp_path / "wide_tfdata"
    tf.data.Dataset.from_tensor_slices((x, y, np.ones((64, 2), np.float32))).save(str(wide))
    code, _, err = cli("run", path, "--data", wide, "--stream", "--steps", 1)
    assert code == 2 and "sample_weight has shape (64, 2), which does not weigh y of shape (64,)" in err, err


def test_sample_weights_that_cannot_weigh_are_one_line_errors(cli, weighted_classifier, embedding_module_model,
                                                              tmp_path):
    path, data, x, y, w = weighted_classifier
    for name, weights, expected in [
        ("negative", np.where(np.arange(64) == 9, -1.0, w), "sample_weight[9] is -1; sample weights must be finite and >= 0"),
        ("nan", np.where(np.arange(64) == 3, np.nan, w), "sample_weight[3] is nan"),
        ("shape", np.ones((64, 2), np.float32), "sample_weight has shape (64, 2), which does not weigh y of shape (64,)"),
        ("rows", np.ones(60, np.float32), "sample_weight has 60 rows but y has 64"),
    ]:
        bad = tmp_path / f"{name}.npz"
        np.savez(bad, x=x, y=y, sample_weight=weights)
        code, out, err = cli("run", path, "--data", bad, "--steps", 1, "--allow-nonfinite-data")
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    ids = tmp_path / "ids.npz"  # a SavedModel's own loss(inputs, targets) has no place for them
    np.savez(ids, x=np.arange(64 * 6).reshape(64, 6) % 30, y=x[:, :1], sample_weight=w)
    code, out, err = cli("run", embedding_module_model, "--data", ids, "--steps", 1)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "the model's own loss(inputs, targets) takes no weights; pass --loss NAME" in err, err


# --- a model that takes text ------------------------------------------------------------------


def text_model(rng, rows: int, outputs: int, seed: int):
    """Keras' end-to-end text model: TextVectorization (adapted to ``rows`` random sentences of 2
    to 6 words), Embedding, average pooling, a Dense of ``outputs``; and the sentences."""
    import keras

    vocabulary = ["red", "green", "blue", "cat", "dog", "sat", "ran", "big", "small", "the", "a", "on"]
    texts = np.array([" ".join(rng.choice(vocabulary, size=rng.integers(2, 7))) for _ in range(rows)])
    keras.utils.set_random_seed(seed)
    vectorize = keras.layers.TextVectorization(max_tokens=16, output_sequence_length=6)
    vectorize.adapt(texts)
    inputs = keras.Input((1,), dtype="string")
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(16, 4)(vectorize(inputs)))
    return keras.Model(inputs, keras.layers.Dense(outputs)(pooled)), texts


@pytest.fixture(scope="session")
def text_classifier(models_dir, data_dir):
    """Keras' end-to-end text classifier: a TextVectorization layer inside the model, so it takes
    raw strings (one per row), then Embedding, pooling and logits; SGD and sparse CE."""
    import keras

    rng = np.random.default_rng(34)
    model, texts = text_model(rng, rows=48, outputs=3, seed=34)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    path = models_dir / "text_classifier.keras"
    model.save(path)
    x, y = texts.reshape(-1, 1), rng.integers(0, 3, size=48)
    data = data_dir / "texts.npz"
    np.savez(data, x=x, y=y)
    return path, data, x, y


def test_a_model_that_takes_strings_trains_on_text_as_fit_does(cli, text_classifier, tmp_path):
    """Text in an .npz (NumPy unicode), in a tf.data folder (tf.string, read as bytes), streamed,
    and in TFRecord files of tf.train.Example: each is Keras' own training of the same batches."""
    import tensorflow as tf

    path, data, x, y = text_classifier
    want = keras_train(compiled_as_saved(path, "global_clipnorm", 0.3), x, y, 8, 5)
    folder = tmp_path / "texts_tfdata"
    tf.data.Dataset.from_tensor_slices((x, y)).save(str(folder))
    records = tmp_path / "texts.tfrecord"
    with tf.io.TFRecordWriter(str(records)) as writer:
        for text, label in zip(x[:, 0], y):
            feature = {"x": tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()])),
                       "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    clip = ["--clip", "global", "--norm", 0.3, "--sparse-norm", "rows"]  # ids repeat: Keras measures raw rows
    for source, extra in ((data, []), (folder, []), (folder, ["--stream"]), (records, ["--features", "x:string:1,y:int64"])):
        rows, out, err = gradwatch_rows(cli, path, source, tmp_path, 8, 5, *clip, *extra)
        np.testing.assert_allclose(rows["loss"], want, rtol=RTOL, err_msg=f"{source} {extra}")
    assert rows["clipped"].any()


def test_text_where_numbers_go_and_numbers_where_text_goes_are_one_line_errors(cli, text_classifier, conv_bn_model,
                                                                               data_dir):
    path, _, x, y = text_classifier
    numbers = data_dir / "numbers_for_text.npz"
    np.savez(numbers, x=np.ones((48, 1), np.float32), y=y)
    code, _, err = cli("run", path, "--data", numbers, "--steps", 2)
    assert code == 2 and "the model takes text for x but the data has float32; store strings" in err
    assert len(err.strip().splitlines()) == 1
    image_model = conv_bn_model[0]
    words = data_dir / "words_for_images.npz"
    np.savez(words, x=np.full((8, 8, 8, 1), "a"), y=np.zeros(8, np.int64))
    code, _, err = cli("run", image_model, "--data", words, "--steps", 2)
    assert code == 2 and "the data's x is text (<U1) but the model takes float32 there" in err
    labels = data_dir / "text_labels.npz"
    np.savez(labels, x=x, y=np.array(["a"] * 48))
    code, _, err = cli("run", path, "--data", labels, "--steps", 2)
    assert code == 2 and "y has dtype <U1; store numbers" in err  # targets stay numbers, as Keras' losses need


def test_spikes_from_text_rows_name_the_row_by_its_targets(cli, models_dir, data_dir, tmp_path):
    """Text has no median: a row behind recurring spikes is ranked by its targets alone, and the
    sentence says that its inputs are text (the known cause: row 5's target is 60, the rest N(0, 1))."""
    import json

    import keras

    rng = np.random.default_rng(35)
    model, texts = text_model(rng, rows=64, outputs=1, seed=35)
    y = rng.normal(size=(64, 1)).astype(np.float32)
    y[5] = 60.0
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    path, data = models_dir / "text_regressor.keras", data_dir / "text_outlier.npz"
    model.save(path)
    np.savez(data, x=texts.reshape(-1, 1), y=y)
    findings = tmp_path / "findings.json"
    code, out, err = cli("run", path, "--data", data, "--epochs", 8, "--batch-size", 8, "--findings", findings)
    assert code == 0, err
    found = [f for f in json.loads(findings.read_text()) if f["code"] == "spikes_from_data"]
    assert len(found) == 1 and found[0]["numbers"]["rows"][0]["row"] == 5
    assert found[0]["numbers"]["rows"][0]["input_mads"] is None
    assert "the batches holding row 5 (" in found[0]["message"]
    assert "MADs from the median in its targets; its inputs are text)" in found[0]["message"]
