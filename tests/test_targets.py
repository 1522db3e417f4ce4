"""Issue 21, item 5: targets the loss would silently broadcast or misread are refused before
training, one line, exit 2; the matching cases still train."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def three_units(tmp_path_factory):
    """A .keras model 4 -> 3 (softmax) and data files: one-hot rows, class ids, 3 regression targets."""
    import keras

    folder = tmp_path_factory.mktemp("targets")
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.save(str(folder / "three.keras"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    ids = rng.integers(0, 3, size=(64,))
    np.savez(folder / "onehot.npz", x=x, y=np.eye(3, dtype="float32")[ids])
    np.savez(folder / "ids.npz", x=x, y=ids.astype("int64"))
    np.savez(folder / "three_targets.npz", x=x, y=rng.normal(size=(64, 3)).astype("float32"))
    return folder


@pytest.mark.parametrize("model, data, loss, words", [
    ("module", "three_targets.npz", "mse", "targets of shape (64, 3) against a model with 1 output unit(s)"),
    ("module", "three_targets.npz", "MeanAbsoluteError", "would broadcast them"),
    ("module", "ids.npz", "categorical_crossentropy", "over a model with 1 output unit is 0 for every example"),
    ("three", "onehot.npz", "sparse_categorical_crossentropy", "one-hot rows of 3"),
    ("three", "ids.npz", "categorical_crossentropy", "class ids (one a row)"),
    ("three", "ids.npz", "mse", "targets of shape (64,) against a model with 3 output unit(s)"),
])
def test_targets_that_do_not_fit_the_loss_are_one_line(cli, module_model, three_units, model, data, loss, words):
    path = module_model if model == "module" else three_units / "three.keras"
    code, out, err = cli("run", path, "--data", three_units / data, "--loss", loss, "--steps", 2, "-q")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], err


@pytest.mark.parametrize("data, loss", [("onehot.npz", "categorical_crossentropy"),
                                        ("ids.npz", "sparse_categorical_crossentropy"),
                                        ("three_targets.npz", "mse")])
def test_targets_that_fit_train(cli, three_units, data, loss):
    code, out, err = cli("run", three_units / "three.keras", "--data", three_units / data, "--loss", loss,
                         "--steps", 2, "-q", "--format", "csv")
    assert code == 0, err
    assert "SyntaxWarning" not in err


def test_a_compiled_loss_is_checked_too(cli, tmp_path, three_units):
    import keras

    model = keras.saving.load_model(str(three_units / "three.keras"))
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    model.save(str(tmp_path / "compiled.keras"))
    code, out, err = cli("run", tmp_path / "compiled.keras", "--data", three_units / "ids.npz", "--steps", 2, "-q")
    assert code == 2 and "class ids" in err, err
