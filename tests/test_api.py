"""Issue 13, part 1: the Python API returns the CLI's rows as DataFrames, takes in-memory models
and data, and raises gradwatch's errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import gradwatch
from conftest import read_csv
from gradwatch.errors import DataError, GradwatchError, OptionError

OPTIONS = dict(loss="mse", batch_size=8, steps=12, lr=0.3)
CLI_OPTIONS = ["--loss", "mse", "--batch-size", 8, "--steps", 12, "--lr", 0.3, "-q"]


def same_rows(api: pd.DataFrame, cli: pd.DataFrame) -> None:
    """Every column but the wall time, exactly (the CSV round-trips floats)."""
    api, cli = api.drop(columns="time_ms"), cli.drop(columns="time_ms")
    assert list(api.columns) == list(cli.columns)
    pd.testing.assert_frame_equal(api.reset_index(drop=True), cli, check_dtype=False)


def test_run_returns_the_rows_of_run_csv(cli, module_model, regression_npz, tmp_path):
    rows = gradwatch.run(str(module_model), str(regression_npz), clip="global", norm=0.5, **OPTIONS)
    csv = tmp_path / "run.csv"
    code, _, err = cli("run", module_model, "--data", regression_npz, "--clip", "global", "--norm", 0.5, *CLI_OPTIONS,
                       "--csv", csv)
    assert code == 0, err
    same_rows(rows, read_csv(csv))
    assert len(rows) == 12 and rows["clipped"].dtype == bool


def test_compare_returns_the_long_csv_and_summarize_the_verdict(cli, module_model, regression_npz, tmp_path):
    long = gradwatch.compare(str(module_model), str(regression_npz), variants=["none", "global:0.5", "agc:0.01"], **OPTIONS)
    csv = tmp_path / "long.csv"
    code, out, err = cli("compare", module_model, "--data", regression_npz, "--variants", "none,global:0.5,agc:0.01",
                         *CLI_OPTIONS, "--csv", csv, "--no-per-variable")
    assert code == 0, err
    same_rows(long, read_csv(csv))
    summary = gradwatch.summarize(long)
    assert summary.verdict and all(line in out for line in summary.verdict)  # the CLI's own sentences
    assert list(summary.table["clip"]) == ["none", "global", "agc"]
    assert summary.table["final_loss"][1] == pytest.approx(summary.variants["global 0.5"]["final_loss"])
    assert str(summary).endswith(summary.verdict[-1])
    # clip and thresholds as Python lists (None: the baseline) are the CLI's comma-separated text
    listed = gradwatch.compare(str(module_model), str(regression_npz), clip=["global", "norm"], thresholds=[None, 0.5],
                               **OPTIONS)
    texted = gradwatch.compare(str(module_model), str(regression_npz), clip="global,norm", thresholds="none,0.5",
                               **OPTIONS)
    same_rows(listed, texted)
    assert listed.groupby(["clip", "param"], dropna=False).ngroups == 3
    with pytest.raises(OptionError, match=r"`thresholds` items must be strings or numbers"):
        gradwatch.compare(str(module_model), str(regression_npz), clip="global", thresholds=[{"a": 1}], **OPTIONS)


@pytest.fixture(scope="module")
def keras_mlp(tmp_path_factory):
    import keras

    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    path = tmp_path_factory.mktemp("api") / "mlp.keras"
    model.save(str(path))
    return model, path


def test_in_memory_model_and_data_give_the_rows_of_the_files(keras_mlp, regression_npz):
    import tensorflow as tf

    model, path = keras_mlp
    before = [w.copy() for w in model.get_weights()]
    with np.load(regression_npz) as data:
        x, y = data["x"], data["y"]
    from_files = gradwatch.run(str(path), str(regression_npz), clip="norm", norm=0.2, batch_size=8, steps=10, shuffle=False)
    from_objects = gradwatch.run(model, (x, y), clip="norm", norm=0.2, batch_size=8, steps=10, shuffle=False)
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    from_dataset = gradwatch.run(model, batches, clip="norm", norm=0.2, batch_size=8, steps=10, shuffle=False)
    numbers = [c for c in from_files.columns if c not in ("time_ms", "model", "data")]
    pd.testing.assert_frame_equal(from_objects[numbers], from_files[numbers])
    pd.testing.assert_frame_equal(from_dataset[numbers], from_files[numbers])
    # [x] for a model of one input is that input, as fit reads it (was "holds 1 input arrays but the model takes 1")
    from_list = gradwatch.run(model, ([x], y), clip="norm", norm=0.2, batch_size=8, steps=10, shuffle=False)
    pd.testing.assert_frame_equal(from_list[numbers], from_files[numbers])
    assert from_objects["model"][0] == f"keras.Model {model.name}" and from_objects["data"][0] == f"arrays ({len(y)} rows)"
    assert from_dataset["data"][0] == "tf.data.Dataset"
    # the baseline's command for objects in memory is the API's, not a CLI line naming no file
    hint = {f["code"]: f for f in gradwatch.summarize(from_objects).findings}["no_baseline"]["message"]
    assert hint.endswith('gradwatch.compare(model, data, clip="norm", thresholds="none,0.2") compares them on '
                         'the same batches')
    files = {f["code"]: f for f in gradwatch.summarize(from_files).findings}["no_baseline"]["message"]
    assert f"gradwatch compare {path} --data {regression_npz} --clip norm --thresholds none,0.2" in files
    for w, b in zip(model.get_weights(), before):  # the caller's model is as it was
        np.testing.assert_array_equal(w, b)


def test_keras_objects_for_the_optimizer_and_the_loss_train_as_their_identifiers(keras_mlp, regression_npz):
    """In Python one passes objects: an optimizer object trains as its identifier with the same
    hyperparameters (a copy: the object is not stepped), a schedule inside it gives the rows' lr
    as Keras computes it, a Loss object or a plain function trains as the identifier and a Loss
    object's targets are checked as the identifier's are."""
    import keras
    import tensorflow as tf

    model, _ = keras_mlp
    with np.load(regression_npz) as data:
        x, y = data["x"], data["y"]
    common = dict(batch_size=8, steps=6, shuffle=False)
    numbers = ["step", "loss", "grad_norm", "clipped_norm", "lr"]
    by_name = gradwatch.run(model, (x, y), loss="mse", optimizer="adam", lr=0.003, opt={"beta_1": 0.8}, **common)
    given = keras.optimizers.Adam(0.003, beta_1=0.8)
    by_object = gradwatch.run(model, (x, y), loss=keras.losses.MeanSquaredError(), optimizer=given, **common)
    pd.testing.assert_frame_equal(by_object[numbers], by_name[numbers])
    assert int(given.iterations.numpy()) == 0 and not given.built
    assert by_object["optimizer"][0].endswith("the given Adam (a copy: the object itself is not changed)")
    by_function = gradwatch.run(model, (x, y), loss=lambda t, p: tf.reduce_mean(tf.square(t - p), axis=-1),
                                optimizer=given, **common)
    np.testing.assert_allclose(by_function["loss"], by_name["loss"], rtol=1e-6)
    assert by_function["loss_fn"][0].startswith("lambda")
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)
    decayed = gradwatch.run(model, (x, y), loss="mse", optimizer=keras.optimizers.SGD(schedule), **common)
    np.testing.assert_allclose(decayed["lr"], [float(schedule(k)) for k in range(6)], rtol=1e-6)
    for loss in (keras.losses.MeanSquaredError(), keras.losses.Huber()):  # (N, 3) targets against 1 unit
        with pytest.raises(DataError, match=r"of shape \(\d+, 3\) against a model with 1 output unit"):
            gradwatch.run(model, (x, np.repeat(y, 3, axis=1)), loss=loss, **common)
    with pytest.raises(OptionError, match="`optimizer` must be a Keras optimizer identifier"):
        gradwatch.run(model, (x, y), loss="mse", optimizer=3, **common)


def test_errors_are_gradwatch_errors(module_model, regression_npz):
    with pytest.raises(OptionError, match="unknown option batchsize"):
        gradwatch.run(str(module_model), str(regression_npz), batchsize=8)
    with pytest.raises(OptionError, match="takes --norm, not --value"):
        gradwatch.run(str(module_model), str(regression_npz), clip="global", value=1.0, loss="mse")
    with pytest.raises(DataError, match="x has 5 rows but y has 3"):
        gradwatch.run(str(module_model), (np.zeros((5, 4), np.float32), np.zeros((3, 1), np.float32)), loss="mse")
    with pytest.raises(DataError, match=r"x is a list of 5 items, which Keras reads as one array per input, but the "
                                        r"model takes one input; give its rows as one array \(numpy.asarray\(x\)\)"):
        gradwatch.run(str(module_model), (np.zeros((5, 4)).tolist(), np.zeros((5, 1), np.float32)), loss="mse")
    with pytest.raises(GradwatchError, match="model must be a path or a keras.Model"):
        gradwatch.run(object(), str(regression_npz), loss="mse")


@pytest.mark.parametrize("given, expected", [
    ({"steps": 2.5}, "`steps` must be an integer. Received: steps=2.5 (float)"),  # was "cannot compute the loss"
    ({"steps": True}, "`steps` must be an integer. Received: steps=True (bool)"),  # was one step
    ({"batch_size": "8"}, "`batch_size` must be an integer"),
    ({"lr": "abc"}, "`lr` must be a number"),  # was a bare TypeError
    ({"seed": 1.5}, "`seed` must be an integer"),
    ({"clip": "global", "norm": "5"}, "`norm` must be a number"),  # was a bare ValueError
])
def test_a_keyword_of_the_wrong_type_is_named(module_model, regression_npz, given, expected):
    with pytest.raises(OptionError) as info:
        gradwatch.run(str(module_model), str(regression_npz), loss="mse", **given)
    assert expected in str(info.value)


def test_an_empty_keyword_is_refused_as_the_cli_refuses_an_empty_argument(module_model, regression_npz):
    """loss="" was taken as no loss (the compiled one trained), target="" was ignored."""
    for given, expected in [({"loss": ""}, "`loss` is empty; give it a value or leave it out"),
                            ({"loss": "mse", "optimizer": "  "}, "`optimizer` is only spaces"),
                            ({"loss": "mse", "target": ""}, "`target` is empty")]:
        with pytest.raises(OptionError) as info:
            gradwatch.run(str(module_model), str(regression_npz), steps=1, **given)
        assert str(info.value).startswith(expected), info.value
    with pytest.raises(OptionError, match="`data` is empty"):
        gradwatch.run(str(module_model), "", loss="mse", steps=1)

def test_numpy_scalars_are_welcome_where_numbers_are(module_model, regression_npz):
    rows = gradwatch.run(str(module_model), str(regression_npz), loss="mse", steps=np.int64(3),
                         batch_size=np.int32(16), lr=np.float32(0.01), clip="global", norm=np.float64(5))
    assert rows["step"].tolist() == [1, 2, 3] and (rows["threshold"] == 5.0).all()
