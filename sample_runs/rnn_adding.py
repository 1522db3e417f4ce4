"""A vanilla tanh RNN on the adding problem: exploding gradients over long time spans.

Pascanu, Mikolov, Bengio (2013), "On the difficulty of training recurrent neural networks",
use this task (from Hochreiter & Schmidhuber 1997) to show that gradients of a plain RNN
explode when its recurrent weights have a spectral radius above 1, and that clipping the
gradient norm fixes it. Each sequence has ``length`` steps of two channels: a random value in
[0, 1], and a marker that is 1 at exactly two steps (one in each half); the target is the sum of
the two marked values. The recurrent matrix starts as an orthogonal matrix times ``radius``.
The data is made here, deterministically, and written as an .npz file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def run_defaults(config: str) -> dict:
    return {"loss": "mse", "optimizer": "sgd", "lr": 0.05, "batch_size": 20, "shuffle": True}


def make_data(n: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    values = rng.random((n, length)).astype(np.float32)
    markers = np.zeros((n, length), np.float32)
    first = rng.integers(0, length // 2, size=n)
    second = rng.integers(length // 2, length, size=n)
    markers[np.arange(n), first] = 1.0
    markers[np.arange(n), second] = 1.0
    x = np.stack([values, markers], axis=-1)
    y = (values[np.arange(n), first] + values[np.arange(n), second])[:, None].astype(np.float32)
    return x, y


def make_module(length: int, hidden: int, radius: float, seed: int):
    import tensorflow as tf

    class AddingRNN(tf.Module):
        def __init__(self):
            super().__init__(name="adding_rnn")
            q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(hidden, hidden)))
            self.w_rec = tf.Variable((radius * q).astype(np.float32), name="w_rec")
            self.w_in = tf.Variable(tf.random.stateless_normal([2, hidden], seed=[seed, 1], stddev=0.5), name="w_in")
            self.b = tf.Variable(tf.zeros([hidden]), name="b")
            self.w_out = tf.Variable(tf.random.stateless_normal([hidden, 1], seed=[seed, 2], stddev=0.1), name="w_out")
            self.b_out = tf.Variable(tf.zeros([1]), name="b_out")

        @tf.function(input_signature=[tf.TensorSpec([None, length, 2], tf.float32, name="sequences")])
        def __call__(self, x):
            h = tf.zeros([tf.shape(x)[0], hidden])
            for t in range(length):
                h = tf.tanh(tf.matmul(x[:, t], self.w_in) + tf.matmul(h, self.w_rec) + self.b)
            return tf.matmul(h, self.w_out) + self.b_out

    return AddingRNN()


def build(out: Path, config: str = "default", length: int = 60, hidden: int = 48, radius: float = 1.3,
          n: int = 4000, seed: int = 0) -> dict:
    import tensorflow as tf

    out.mkdir(parents=True, exist_ok=True)
    x, y = make_data(n, length, seed)
    np.savez(out / "adding.npz", x=x, y=y)
    tf.saved_model.save(make_module(length, hidden, radius, seed), str(out / "model"))
    return {"model": "model", "data": "adding.npz"}
