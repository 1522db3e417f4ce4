"""Keras models with several outputs, trained as `fit` trains them: one target per output (an
.npz array named after each output, --y-key a,b in output order, a tf.data folder or API data
of (x, {output: y})), the compiled per-output losses and loss_weights (Keras' compute_loss), or
one --loss for every output, summed, as compile(loss=NAME) applies it. Keras' train_on_batch is
the reference."""

from __future__ import annotations

import numpy as np
import pytest

from test_keras_parity import RTOL, compiled_as_saved, gradwatch_rows, keras_train


@pytest.fixture(scope="session")
def two_heads(models_dir, data_dir):
    """A shared trunk with a regression head and a 3-class head, returned as a dict (names that
    are not the layers' names), compiled with per-output losses, loss_weights, an L2 penalty and
    SGD with momentum; and the same trunk with its heads as a list (value_head, class_head: not in
    alphabetical order), not compiled and compiled with a list of losses."""
    import keras

    keras.utils.set_random_seed(31)
    x_in = keras.Input((6,), name="features")
    trunk = keras.layers.Dense(8, activation="tanh", kernel_regularizer=keras.regularizers.L2(1e-3))(x_in)
    amount, kind = keras.layers.Dense(1, name="value_head")(trunk), keras.layers.Dense(3, name="class_head")(trunk)
    model = keras.Model(x_in, {"amount": amount, "kind": kind})
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss={"amount": "mse", "kind": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
                  loss_weights={"amount": 1.0, "kind": 0.5})
    path = models_dir / "two_heads.keras"
    model.save(path)
    listed = keras.Model(x_in, [amount, kind])
    listed.save(models_dir / "two_heads_list.keras")  # not compiled
    listed.compile(optimizer=keras.optimizers.Adam(0.01), loss_weights=[0.3, 1.0],
                   loss=["mse", keras.losses.SparseCategoricalCrossentropy(from_logits=True)])
    listed.save(models_dir / "two_heads_list_compiled.keras")
    rng = np.random.default_rng(31)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = {"amount": (3 * x[:, :1] + x[:, 1:2]).astype(np.float32), "kind": rng.integers(0, 3, size=64)}
    data = data_dir / "two_heads.npz"
    np.savez(data, x=x, **y)  # uncompressed: --stream reads its rows
    return path, models_dir / "two_heads_list.keras", data, x, y


@pytest.mark.parametrize("stream", ["--no-stream", "--stream"])
def test_per_output_losses_and_weights_equal_keras_with_global_clipnorm(cli, two_heads, tmp_path, stream):
    path, _, data, x, y = two_heads
    rows, out, err = gradwatch_rows(cli, path, data, tmp_path, 8, 6, "--clip", "global", "--norm", 1.0, stream)
    want = keras_train(compiled_as_saved(path, "global_clipnorm", 1.0), x, y, 8, 6)
    np.testing.assert_allclose(rows["loss"], want, rtol=RTOL)
    assert rows["clipped"].any() and (rows["reg_loss"] > 0).all()
    assert (rows["loss_fn"] == "the model's compiled loss").all()


def test_a_streamed_tf_data_folder_carries_one_target_per_output(cli, two_heads, tmp_path):
    """A tf.data folder of (x, {output: y}), of (x, (y per output in output order)) and of
    (x, {output: y}, sample_weight), read as a stream: Keras' own training of the same batches."""
    import tensorflow as tf

    path, _, _, x, y = two_heads
    w = np.linspace(0, 2, 64).astype(np.float32)
    cases = {"named": ((x, y), None), "in output order": ((x, (y["amount"], y["kind"])), None),
             "weighted": ((x, y, w), w)}
    for name, (elements, weights) in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        tf.data.Dataset.from_tensor_slices(elements).batch(16).save(str(folder))
        rows, _, err = gradwatch_rows(cli, path, folder, tmp_path, 8, 6, "--clip", "global", "--norm", 1.0, "--stream")
        want = keras_train(compiled_as_saved(path, "global_clipnorm", 1.0), x, y, 8, 6, weights)
        np.testing.assert_allclose(rows["loss"], want, rtol=RTOL, err_msg=name)
    assert (rows["loss_fn"] == "the model's compiled loss, each row weighted by the data's sample_weight").all()


def test_a_list_of_outputs_gets_its_targets_in_its_order(cli, two_heads, tmp_path):
    """Targets named after the output layers, which Keras' compiled loss takes as a list in the
    model's order (value_head, class_head), not in the names' sorted order."""
    _, listed, _, x, y = two_heads
    path = listed.with_name("two_heads_list_compiled.keras")
    data = tmp_path / "by_layer_name.npz"
    np.savez(data, x=x, class_head=y["kind"], value_head=y["amount"])
    rows, _, _ = gradwatch_rows(cli, path, data, tmp_path, 8, 5)
    want = keras_train(compiled_as_saved(path), x, {"value_head": y["amount"], "class_head": y["kind"]}, 8, 5)
    np.testing.assert_allclose(rows["loss"], want, rtol=RTOL)


def test_one_loss_by_name_is_every_outputs_and_sample_weights_weigh_each(cli, two_heads, tmp_path):
    """A list-output model: --loss mse on both heads, summed (Keras' compile(loss="mse")), the
    targets by --y-key in output order, one sample_weight for every output's loss."""
    import keras

    import gradwatch

    _, listed, _, x, y = two_heads
    targets = {"value_head": y["amount"], "class_head": np.eye(3, dtype=np.float32)[y["kind"]]}
    w = np.linspace(0, 2, 64).astype(np.float32)
    data = tmp_path / "renamed.npz"
    np.savez(data, x=x, t1=targets["value_head"], t2=targets["class_head"], sample_weight=w)
    rows, _, err = gradwatch_rows(cli, listed, data, tmp_path, 8, 5, "--y-key", "t1,t2", "--loss", "mse",
                                  "--optimizer", "sgd", "--lr", 0.1, "--clip", "norm", "--norm", 0.2)
    model = keras.saving.load_model(str(listed))
    model.compile(optimizer=keras.optimizers.SGD(0.1, clipnorm=0.2), loss="mse", run_eagerly=True)
    want = keras_train(model, x, targets, 8, 5, w)
    np.testing.assert_allclose(rows["loss"], want, rtol=RTOL)
    assert "loss: mean_squared_error (--loss) on each of the 2 outputs, summed, each row weighted" in err
    # the Python API takes (x, [y per output], w) and a tf.data.Dataset of (x, {output: y})
    frame = gradwatch.run(listed, (x, [targets["value_head"], targets["class_head"]], w), loss="mse",
                          optimizer="sgd", lr=0.1, clip="norm", norm=0.2, steps=5, batch_size=8, shuffle=False)
    np.testing.assert_allclose(frame["loss"], want, rtol=RTOL)
    import tensorflow as tf

    folder = tmp_path / "heads_tfdata"
    tf.data.Dataset.from_tensor_slices((x, targets)).save(str(folder))
    rows, _, _ = gradwatch_rows(cli, listed, folder, tmp_path, 8, 3, "--loss", "mse", "--optimizer", "sgd", "--lr",
                                0.1, "--clip", "norm", "--norm", 0.2)
    np.testing.assert_allclose(rows["loss"], keras_train(model_again(listed), x, targets, 8, 3), rtol=RTOL)


def model_again(listed):
    import keras

    model = keras.saving.load_model(str(listed))
    model.compile(optimizer=keras.optimizers.SGD(0.1, clipnorm=0.2), loss="mse", run_eagerly=True)
    return model


def test_targets_that_do_not_fit_the_outputs_are_one_line_errors(cli, two_heads, tmp_path):
    path, _, _, x, y = two_heads
    cases = [
        ({"x": x, "y": y["amount"]}, [], "the model has 2 outputs (amount, kind) but"),
        ({"x": x, "amount": y["amount"]}, [], "has no array 'y' (it has: x, amount); name its arrays after the "
                                              "model's outputs (amount, kind) or pass --y-key a,b in output order"),
        ({"x": x, "amount": y["amount"], "kind": np.where(np.arange(64) == 5, 3, y["kind"])}, [],
         "class id(s) outside [0, 3) (the model's last output dimension is 3), the first y['kind'][5] = 3"),
        ({"x": x, "amount": np.repeat(y["amount"], 3, axis=1), "kind": y["kind"]}, [],
         "the targets y['amount'] of shape (64, 3) against output 'amount' with 1 output unit(s)"),
        ({"x": x, "a": y["amount"], "b": y["kind"], "c": y["kind"]}, ["--y-key", "a,b,c"],
         "holds 3 target arrays but the model has 2 outputs (amount, kind)"),
    ]
    for k, (arrays, extra, expected) in enumerate(cases):
        bad = tmp_path / f"bad{k}.npz"
        np.savez(bad, **arrays)
        code, _, err = cli("run", path, "--data", bad, "--steps", 1, *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
        if len(arrays) == 3 and not extra and "amount" in arrays:  # the same targets streamed, checked in the pass
            import tensorflow as tf                                  # that counts them, against their own outputs

            folder = tmp_path / f"bad{k}_tfdata"
            tf.data.Dataset.from_tensor_slices((x, {"amount": arrays["amount"], "kind": arrays["kind"]})).save(str(folder))
            code, _, err = cli("run", path, "--data", folder, "--stream", "--steps", 1)
            assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
