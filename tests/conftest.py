"""Tiny real models of every supported kind, real data files, and the real CLI in-process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

# A private sample cache for the whole test session (never the user's ~/.cache).
_CACHE = tempfile.mkdtemp(prefix="gradwatch-test-cache-")
os.environ["GRADWATCH_CACHE"] = _CACHE
# The CLI takes COLUMNS as the user's terminal width, and piped output is otherwise as wide as its
# content. pytest-xdist sets COLUMNS=80 in its workers; the tests that want a width set it themselves.
os.environ.pop("COLUMNS", None)

from gradwatch.cli import main  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture
def cli(capsys):
    """Run the real gradwatch CLI in this process: returns (exit code, stdout, stderr)."""

    def invoke(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def read_csv(path):
    import pandas as pd

    return pd.read_csv(path)


# --- models ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def module_model(models_dir):
    """tf.saved_model.save of a tf.Module with a tf.function __call__: a 4 -> 1 linear model."""
    import tensorflow as tf

    class Linear(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.random.stateless_normal([4, 1], seed=[1, 2]), name="w")
            self.b = tf.Variable(tf.zeros([1]), name="b")

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def __call__(self, x):
            return tf.matmul(x, self.w) + self.b

    path = models_dir / "module"
    tf.saved_model.save(Linear(), str(path))
    return path


@pytest.fixture(scope="session")
def keras_export_model(models_dir):
    """Keras 3 model.export(): endpoint `serve`, a small tanh MLP 4 -> 8 -> 1."""
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
    path = models_dir / "keras_export"
    model.export(str(path), verbose=False)
    return path


@pytest.fixture(scope="session")
def keras_saved_model(models_dir):
    """tf.saved_model.save(keras_model): only signatures['serving_default'], 3-class logits."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(4)
    inputs = keras.Input((4,), name="features")
    outputs = keras.layers.Dense(3, name="logits")(keras.layers.Dense(6, activation="relu")(inputs))
    path = models_dir / "keras_saved"
    tf.saved_model.save(keras.Model(inputs, outputs), str(path))
    return path


@pytest.fixture(scope="session")
def keras_file_model(models_dir):
    """A Keras 3 .keras file with an Embedding (sparse, repeated-row gradients)."""
    import keras

    keras.utils.set_random_seed(5)
    model = keras.Sequential([
        keras.Input((6,), dtype="int32"),
        keras.layers.Embedding(20, 5),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(1),
    ])
    path = models_dir / "embed.keras"
    model.save(str(path))
    return path


@pytest.fixture(scope="session")
def embedding_module_model(models_dir):
    """A tf.Module SavedModel with tf.nn.embedding_lookup and its own loss(inputs, targets)."""
    import tensorflow as tf

    class Bag(tf.Module):
        def __init__(self):
            super().__init__()
            self.table = tf.Variable(tf.random.stateless_uniform([30, 4], seed=[7, 7], minval=-0.5, maxval=0.5), name="table")
            self.out = tf.Variable(tf.random.stateless_uniform([4, 1], seed=[8, 8], minval=-0.5, maxval=0.5), name="out")
            self.unused = tf.Variable(tf.ones([2]), name="unused")

        @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.int32)])
        def __call__(self, ids):
            frozen = tf.stop_gradient(tf.reduce_sum(self.unused)) * 0.0  # read, but no gradient reaches it
            return tf.matmul(tf.reduce_sum(tf.nn.embedding_lookup(self.table, ids), axis=1), self.out) + frozen

        @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.int32), tf.TensorSpec([None, 1], tf.float32)])
        def loss(self, ids, targets):
            return tf.reduce_mean(tf.square(self(ids) - targets))

    path = models_dir / "bag"
    tf.saved_model.save(Bag(), str(path))
    return path


# --- data -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def regression_npz(data_dir):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 4))  # float64 on purpose: gradwatch casts to the model's float32
    y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * rng.normal(size=(96, 1))
    path = data_dir / "regression.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="session")
def regression_csv(data_dir):
    import pandas as pd

    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 4)).astype(np.float32)
    frame = pd.DataFrame(x, columns=["a", "b", "c", "d"])
    frame["label"] = (x @ np.array([0.5, -1.0, 2.0, 1.0])).astype(np.float32)
    path = data_dir / "regression.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def classes_tfdata(data_dir):
    import tensorflow as tf

    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = np.argmax(x[:, :3], axis=1).astype(np.int64)
    path = data_dir / "classes_tfdata"
    tf.data.Dataset.from_tensor_slices((x, y)).save(str(path))
    return path


@pytest.fixture(scope="session")
def ids_npz(data_dir):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 8, size=(64, 6)).astype(np.int32)  # few ids: many repeats in a batch
    y = (x.sum(axis=1, keepdims=True) / 10.0).astype(np.float32)
    path = data_dir / "ids.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="session")
def ids_big_npz(data_dir):
    rng = np.random.default_rng(4)
    x = rng.integers(0, 20, size=(64, 6)).astype(np.int32)
    y = (x.sum(axis=1, keepdims=True) / 30.0).astype(np.float32)
    path = data_dir / "ids20.npz"
    np.savez(path, x=x, y=y)
    return path


def tree_digest(path: Path) -> dict:
    """Bytes and mtimes of every file under a path: to check gradwatch never writes there."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def heed_stop_signals():
    """``preexec_fn`` for a child that a test signals: SIGINT, SIGTERM and SIGHUP at their
    defaults whatever pytest was started with (a shell's background job ignores SIGINT, nohup
    SIGHUP, and gradwatch keeps a signal ignored that it was started ignoring)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def interrupt_gradwatch(args: list, when_ready, sig=signal.SIGINT, with_stdout=False):
    """Run ``python -m gradwatch ARGS``, call ``when_ready(proc)`` (it waits and checks what it
    needs), send ``sig`` (Ctrl-C's SIGINT by default) and return the exit code and stderr (and
    stdout first, ``with_stdout``); never leaves it running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradwatch", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=heed_stop_signals,
    )
    try:
        when_ready(proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return (proc.returncode, out, err) if with_stdout else (proc.returncode, err)
