"""A deep, narrow tanh MLP whose loss spikes at a high learning rate.

Twelve dense tanh layers regress a smooth function of 8 inputs. With plain SGD at a high
learning rate, a few steps with large gradients throw the weights far away and the loss jumps
(the "cliff" of Pascanu et al. 2013 in a feed-forward net); clipping the global norm keeps the
steps bounded. The data (a table of 8 features and a target) is made here, deterministically,
and written as a .csv file, so the sample also exercises gradwatch's CSV loader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def run_defaults(config: str) -> dict:
    return {"loss": "mse", "optimizer": "sgd", "lr": 0.2, "batch_size": 32, "shuffle": True, "target": "target"}


def make_table(n: int, seed: int):
    import pandas as pd

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    target = np.sin(x[:, 0] * x[:, 1]) + 0.5 * x[:, 2] ** 2 - x[:, 3] * x[:, 4] + 0.1 * rng.normal(size=n)
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(8)])
    frame["target"] = target.astype(np.float32)
    return frame


def make_module(depth: int, width: int, gain: float, seed: int):
    import tensorflow as tf

    class DeepMLP(tf.Module):
        def __init__(self):
            super().__init__(name="deep_mlp")
            sizes = [8] + [width] * depth + [1]
            self.kernels, self.biases = [], []
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
                init = tf.random.stateless_normal([a, b], seed=[seed, i], stddev=gain / np.sqrt(a))
                self.kernels.append(tf.Variable(init, name=f"dense_{i}/kernel"))
                self.biases.append(tf.Variable(tf.zeros([b]), name=f"dense_{i}/bias"))

        @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32, name="features")])
        def __call__(self, x):
            for k, b in zip(self.kernels[:-1], self.biases[:-1]):
                x = tf.tanh(tf.matmul(x, k) + b)
            return tf.matmul(x, self.kernels[-1]) + self.biases[-1]

    return DeepMLP()


def build(out: Path, config: str = "default", depth: int = 12, width: int = 32, gain: float = 1.6,
          n: int = 4096, seed: int = 0) -> dict:
    import tensorflow as tf

    out.mkdir(parents=True, exist_ok=True)
    make_table(n, seed).to_csv(out / "table.csv", index=False)
    tf.saved_model.save(make_module(depth, width, gain, seed), str(out / "model"))
    return {"model": "model", "data": "table.csv"}
