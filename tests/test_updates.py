"""Issue 22: the update norm ‖w_after − w_before‖ comes from what the optimizer writes, not from a
copy of every weight; it must equal the change the weights made, measured from outside (NumPy,
the trained variables read after every step), for every Keras optimizer, for sparse embedding
rows, weight decay and constraints, and where it cannot follow the writes it must fall back."""

from __future__ import annotations

import numpy as np
import pytest

STEPS = 3


def _model():
    import keras

    keras.utils.set_random_seed(3)
    ids = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(50, 8, name="embed")(ids)  # sparse (IndexedSlices) gradients
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = keras.layers.Dense(8, activation="tanh", name="hidden",
                           kernel_constraint=keras.constraints.MaxNorm(0.5))(h)  # written by assign
    return keras.Model(ids, keras.layers.Dense(1, name="out")(h))


def _data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, size=(64, 6)).astype("int32")
    x[:, 0] = x[:, 1]  # repeated ids in a row: the embedding's rows repeat within a batch
    return x, rng.normal(size=(64, 1)).astype("float32")


def _measured_and_reference(model, optimizer, follow: bool | None = None, data=None, **opts):
    """Per step: (update norms the trainer recorded, ‖after − before‖ of its variables in NumPy)."""
    from gradwatch.api import clipping_of, make_spec
    from gradwatch.session import prepare

    spec = make_spec(model, data or _data(), loss="mse", optimizer=optimizer, steps=STEPS, batch_size=16, fetch_every=1,
                     lr=0.05, shuffle=False, **opts)
    variant = clipping_of("global", norm=1.0)
    trainer = prepare(spec)
    trainer.per_variable = True
    if follow is not None:
        trainer.follow_writes = follow
    trainer.trace(variant.impl)
    before = [np.array(v.numpy(), np.float64) for v in trainer.used]
    recorded, reference = [], []

    def on_variables(rows, norms):
        nonlocal before
        after = [np.array(v.numpy(), np.float64) for v in trainer.used]
        reference.append([np.linalg.norm(a - b) for a, b in zip(after, before)])
        recorded.append(norms[0, 3].tolist())
        before = after

    trainer.run(variant, on_variables=on_variables)
    return trainer, np.array(recorded), np.array(reference)


OPTIMIZERS = [
    ("sgd", {}),
    ("sgd", {"opt": {"momentum": 0.9, "nesterov": True}}),
    ("adam", {}),
    ("adamw", {"opt": {"weight_decay": 0.5}}),  # weight decay: a dense write beside the embedding's rows
    ("rmsprop", {"opt": {"momentum": 0.5}}),
    ("adagrad", {}),
    ("adadelta", {"opt": {"learning_rate": 1.0}}),
    ("adamax", {}),
    ("nadam", {}),
    ("ftrl", {}),
    ("lion", {}),
    ("lamb", {}),
    ("adafactor", {}),
    ("muon", {}),
    ("schedulefreeadamw", {}),
]


@pytest.mark.parametrize("name,opts", OPTIMIZERS, ids=[f"{n}{'+' if o else ''}" for n, o in OPTIMIZERS])
def test_update_norms_are_the_change_of_the_weights_for_every_keras_optimizer(name, opts):
    trainer, recorded, reference = _measured_and_reference(_model(), name, **opts)
    assert trainer.follow_writes, "a Keras optimizer's update norms come from its writes"
    assert recorded.shape == (STEPS, len(trainer.used)) and np.all(reference[:, 0] > 0)
    np.testing.assert_allclose(recorded, reference, rtol=2e-4, atol=1e-7)


def test_the_copy_route_gives_the_same_norms():
    _, follow, reference = _measured_and_reference(_model(), "adamw", opt={"weight_decay": 0.5})
    trainer, copy, _ = _measured_and_reference(_model(), "adamw", follow=False, opt={"weight_decay": 0.5})
    assert not trainer.follow_writes
    np.testing.assert_allclose(copy, reference, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(follow, copy, rtol=2e-4, atol=1e-7)


def test_an_optimizer_not_defined_by_keras_takes_the_copy_route():
    import keras

    class Halving(keras.optimizers.SGD):  # defined here: its writes could bypass the variables' methods
        pass

    from gradwatch.train import updates

    assert not updates.follows(Halving(0.05), None)
    assert updates.follows(keras.optimizers.SGD(0.05), None)


def test_a_write_inside_the_optimizers_own_cond_falls_back_to_the_copy(monkeypatch):
    """A Keras optimizer writing inside its own tf.cond: the writes cannot leave that branch, so
    the trainer traces again with copies; the norms are still the weights' change."""
    import keras
    import tensorflow as tf

    original = keras.optimizers.SGD.update_step

    def update_step(self, gradient, variable, learning_rate):
        def write():
            original(self, gradient, variable, learning_rate)
            return tf.constant(True)

        tf.cond(tf.constant(True), write, lambda: tf.constant(False))

    monkeypatch.setattr(keras.optimizers.SGD, "update_step", update_step)
    trainer, recorded, reference = _measured_and_reference(_model(), "sgd")
    assert not trainer.follow_writes
    np.testing.assert_allclose(recorded, reference, rtol=2e-4, atol=1e-7)


def test_a_skipped_nonfinite_step_moved_nothing():
    x, y = _data()
    y[16:32] = np.nan  # the second batch: its loss is NaN, the step is skipped
    trainer, recorded, reference = _measured_and_reference(_model(), "adam", data=(x, y), allow_nonfinite_data=True)
    assert trainer.follow_writes
    assert np.all(recorded[1] == 0) and np.all(reference[1] == 0)
    np.testing.assert_allclose(recorded, reference, rtol=2e-4, atol=1e-7)
