"""Shared by the benchmark runners: the two models, their data, and how each is trained.

Everything here is built once into a work folder by ``bench.py``; the runners
(``gradwatch run``, ``fit_keras.py``, ``floor.py``) then load the same ``.keras`` file and the
same ``.npz`` batches, so the three ways train the same model on the same data.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np

# name -> what the model is and how it is trained (the same for all three ways)
MODELS = {
    "ptb-small": {
        "what": "word LSTM LM, PTB small shape: vocab 10000, 2 x LSTM 200, 20 x 20 batches",
        "loss": "sparse_categorical_crossentropy",
        "from_logits": True,
        "batch_size": 20,
        "lr": 1.0,
        "clip_norm": 5.0,
    },
    "conv": {
        "what": "conv net with BatchNorm: 16x16x3 -> 2 x (Conv 3x3, BatchNorm, ReLU) -> 10 classes, batches of 32",
        "loss": "sparse_categorical_crossentropy",
        "from_logits": True,
        "batch_size": 32,
        "lr": 0.05,
        "clip_norm": 1.0,
    },
    "dense": {
        "what": "dense regression net: 32 -> 64 -> 64 -> 1 (tanh), batches of 32",
        "loss": "mse",
        "from_logits": False,
        "batch_size": 32,
        "lr": 0.01,
        "clip_norm": 1.0,
    },
}
VOCAB = 10000
HIDDEN = 200
NUM_STEPS = 20


def ptb_ids(text: Path) -> np.ndarray:
    """Word ids of a PTB split, as ``ptb_word_lm``'s reader makes them (<eos> per line)."""
    words = text.read_text(encoding="utf-8").replace("\n", " <eos> ").split()
    counts = collections.Counter(words)
    order = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = {w: i for i, w in enumerate(order)}
    return np.asarray([vocab[w] for w in words], dtype=np.int32)


def ptb_windows(ids: np.ndarray, batch_size: int, num_steps: int):
    """``ptb_producer``'s batches, row-major per step: batch i is windows [i*B, (i+1)*B)."""
    batch_len = len(ids) // batch_size
    data = ids[: batch_size * batch_len].reshape(batch_size, batch_len)
    epoch_size = (batch_len - 1) // num_steps
    x = np.stack([data[:, i * num_steps : (i + 1) * num_steps] for i in range(epoch_size)])
    y = np.stack([data[:, i * num_steps + 1 : (i + 1) * num_steps + 1] for i in range(epoch_size)])
    return x.reshape(-1, num_steps), y.reshape(-1, num_steps)


def build(workdir: Path, ptb_text: Path) -> dict:
    """Write ``<name>.keras`` and ``<name>.npz`` for every model into ``workdir``."""
    import keras

    workdir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)
    init = keras.initializers.RandomUniform(-0.1, 0.1, seed=0)

    ids = ptb_ids(ptb_text)
    x, y = ptb_windows(ids, MODELS["ptb-small"]["batch_size"], NUM_STEPS)
    np.savez(workdir / "ptb-small.npz", x=x, y=y)
    inputs = keras.Input((NUM_STEPS,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, HIDDEN, embeddings_initializer=init)(inputs)
    for _ in range(2):
        h = keras.layers.LSTM(
            HIDDEN, return_sequences=True, kernel_initializer=init, recurrent_initializer=init
        )(h)
    logits = keras.layers.Dense(VOCAB, kernel_initializer=init)(h)
    keras.Model(inputs, logits).save(workdir / "ptb-small.keras")

    rng = np.random.default_rng(0)
    xd = rng.normal(size=(8192, 32)).astype(np.float32)
    yd = (np.sin(xd[:, :4]).sum(axis=1, keepdims=True) + 0.1 * rng.normal(size=(8192, 1))).astype(np.float32)
    np.savez(workdir / "dense.npz", x=xd, y=yd)
    inputs = keras.Input((32,))
    h = keras.layers.Dense(64, activation="tanh")(inputs)
    h = keras.layers.Dense(64, activation="tanh")(h)
    keras.Model(inputs, keras.layers.Dense(1)(h)).save(workdir / "dense.keras")

    xc = rng.normal(size=(4096, 16, 16, 3)).astype(np.float32)
    yc = (xc[:, :8, :8, 0].mean(axis=(1, 2)) * 10).astype(np.int64) % 10
    np.savez(workdir / "conv.npz", x=xc, y=yc)
    inputs = keras.Input((16, 16, 3))
    h = inputs
    for filters, stride in ((16, 1), (32, 2)):
        h = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(h)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    keras.Model(inputs, keras.layers.Dense(10)(h)).save(workdir / "conv.keras")

    info = {"ptb_tokens": int(len(ids)), "ptb_batches_per_epoch": int(len(x) // MODELS["ptb-small"]["batch_size"])}
    (workdir / "built.json").write_text(json.dumps(info))
    return info


def main(argv: list[str]) -> None:
    """``python common.py WORKDIR PTB_TEXT``: build in a child process, so that the benchmark's
    own process never imports TensorFlow (a child's peak RSS counts the parent's pages at fork)."""
    info = build(Path(argv[0]), Path(argv[1]))
    print(json.dumps(info))


def load(workdir: Path, name: str):
    """The Keras model (safe_mode on), its data and the loss object of ``name``."""
    import keras

    cfg = MODELS[name]
    model = keras.saving.load_model(workdir / f"{name}.keras", safe_mode=True)
    with np.load(workdir / f"{name}.npz") as arrays:
        x, y = arrays["x"], arrays["y"]
    if cfg["loss"] == "mse":
        loss = keras.losses.MeanSquaredError()
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=cfg["from_logits"])
    return model, x, y, loss


def bare_step(model, loss_fn, optimizer, clip_norm):
    """The floor: a ``tf.function`` step with ``tf.clip_by_global_norm``, nothing recorded."""
    import tensorflow as tf

    variables = model.trainable_variables

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads, _ = tf.clip_by_global_norm(tape.gradient(loss, variables), clip_norm)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    return step


def batches(x, y, batch_size: int, steps: int):
    """The batches every way trains on: file order, last partial batch dropped, repeated."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size, drop_remainder=True)
    return ds.repeat().take(steps).prefetch(tf.data.AUTOTUNE)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
