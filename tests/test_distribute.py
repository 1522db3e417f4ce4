"""--strategy mirrored over 2 logical CPU devices and --strategy multiworker with 2 worker
processes on localhost: every recorded column equals the single-device run on the same global
batch, and the per-replica clipping trap is shown with plain TensorFlow.

Logical devices must be set before TensorFlow starts, and two strategies in one process would
meet in their collectives: every run here is a process of its own (the real CLI).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import read_csv

VARIANTS = "none,global:0.5,norm:0.3,value:0.05,agc:0.01,autoclip:10,zclip:2.5"
SKIP = {"time_ms"}


def gradwatch(*args, env=None, timeout=300):
    done = subprocess.run([sys.executable, "-m", "gradwatch", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def regularized_mlp(models_dir):
    """A compiled .keras MLP with an L2 regularizer (its loss is in the recorded total)."""
    import keras

    keras.utils.set_random_seed(7)
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(12, activation="tanh", kernel_regularizer=keras.regularizers.L2(1e-3)),
        keras.layers.Dense(1),
    ])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    path = models_dir / "regularized_mlp.keras"
    model.save(str(path))
    return path


def run_both(tmp_path, name, model, data, *options, variants=VARIANTS):
    """The same compare on one device and mirrored over 2 CPU devices: (rows, layers) of each.
    The two processes run at once (most of each is importing TensorFlow and tracing)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(label, extra):
        csv, layers = tmp_path / f"{name}-{label}.csv", tmp_path / f"{name}-{label}-layers.csv"
        gradwatch("compare", model, "--data", data, "--variants", variants, "--steps", 12, "--batch-size", 16,
                  "--no-shuffle", "--csv", csv, "--layers-csv", layers, "--cpu-devices", 2, "--quiet",
                  *options, *extra)
        return read_csv(csv), read_csv(layers)

    runs = {"single": (), "mirrored": ("--strategy", "mirrored")}
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = {label: pool.submit(one, label, extra) for label, extra in runs.items()}
    return {label: future.result() for label, future in futures.items()}


def assert_same_rows(a, b, skip=SKIP):
    """Every column: within 1e-5 relative (1e-6 absolute near zero: float32 sums split over devices)."""
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for column in a.columns:
        if column in skip:
            continue
        if a[column].dtype.kind == "f":
            np.testing.assert_allclose(b[column], a[column], rtol=1e-5, atol=1e-6, err_msg=column)
        else:
            assert (a[column].fillna("") == b[column].fillna("")).all(), column


@pytest.fixture(scope="module")
def mirrored_mlp(tmp_path_factory, regularized_mlp, regression_npz):
    return run_both(tmp_path_factory.mktemp("mirrored"), "mlp", regularized_mlp, regression_npz)


def test_mirrored_equals_one_device_on_every_recorded_column(mirrored_mlp):
    """Loss (with the regularizer), norms before and after clipping, adaptive thresholds, clip
    flags and each variable's four norms: the same on 2 replicas as on one device (1e-5)."""
    (rows, layers), (rows2, layers2) = mirrored_mlp["single"], mirrored_mlp["mirrored"]
    assert len(rows) == 7 * 12 and rows["clipped"].any() and (rows["reg_loss"] > 0).all()
    assert_same_rows(rows, rows2)
    assert_same_rows(layers, layers2)


def test_mirrored_embedding_with_adam(tmp_path, keras_file_model, ids_npz):
    """Sparse (IndexedSlices) gradients and Adam's per-row second moment: the replicas' sum of
    the update must not split one row in halves (see distribute.replica_share)."""
    # one strategy of each way to treat the embedding's rows: none, a scale (global; norm, autoclip
    # and zclip scale too), value's spread of the cut over repeats, agc's units
    got = run_both(tmp_path, "embed", keras_file_model, ids_npz, "--loss", "mse", "--optimizer", "adam", "--lr", "0.05",
                   variants="none,global:0.5,value:0.05,agc:0.01")
    assert_same_rows(*[got[k][0] for k in ("single", "mirrored")])
    assert_same_rows(*[got[k][1] for k in ("single", "mirrored")])


def test_mirrored_marks_a_nonfinite_input_row_in_the_second_replicas_share(tmp_path, regularized_mlp):
    """--allow-nonfinite-data under mirrored: each replica looks at its share of the batch and the
    flags are all-reduced, so rows 9 and 40 (in the second replica's half of batches 1 and 3)
    mark the same steps as on one device, from a streamed tf.data folder."""
    import tensorflow as tf

    x = np.random.default_rng(5).normal(size=(64, 4)).astype(np.float32)
    x[9, 1], x[40, 0] = np.inf, np.nan
    tf.data.Dataset.from_tensor_slices((x, np.zeros((64, 1), np.float32))).save(str(tmp_path / "bad_tfdata"))
    from concurrent.futures import ThreadPoolExecutor

    def one(label, extra):  # both processes at once, as run_both runs them
        csv = tmp_path / f"{label}.csv"
        gradwatch("run", regularized_mlp, "--data", tmp_path / "bad_tfdata", "--stream", "--allow-nonfinite-data",
                  "--no-shuffle", "--batch-size", 16, "--steps", 8, "--cpu-devices", 2, "--csv", csv, "-q", *extra)
        return read_csv(csv)

    runs = {"single": (), "mirrored": ("--strategy", "mirrored")}
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = {label: pool.submit(one, label, extra) for label, extra in runs.items()}
    rows = {label: future.result() for label, future in futures.items()}
    assert rows["single"]["nonfinite_input"].tolist() == [True, False, True, False] * 2
    assert_same_rows(rows["single"], rows["mirrored"])


TRAP = r'''
import json, sys
import numpy as np
import tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
model_path, data_path, clip = sys.argv[1], sys.argv[2], float(sys.argv[3])
with np.load(data_path) as d:
    x, y = d["x"][:16].astype("float32"), d["y"][:16].astype("float32")  # the first batch, --no-shuffle
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = keras.saving.load_model(model_path)

def replica_grads(xs, ys):
    with tf.GradientTape() as tape:  # each replica: mean squared error of its 8 rows + the L2 term
        loss = tf.reduce_mean(tf.square(model(xs) - ys)) + tf.add_n(model.losses)
    return tape.gradient(loss, model.trainable_variables)

shards = strategy.experimental_distribute_values_from_function(
    lambda ctx: (x[8 * ctx.replica_id_in_sync_group:][:8], y[8 * ctx.replica_id_in_sync_group:][:8]))
per_replica = strategy.run(replica_grads, args=shards)
local = [[g.numpy() for g in strategy.experimental_local_results(v)] for v in per_replica]
mean = [np.mean(pair, axis=0) for pair in local]
after = [t.numpy() for t in tf.clip_by_global_norm(mean, clip)[0]]                  # all-reduce, then clip
clipped = [[t.numpy() for t in tf.clip_by_global_norm(list(r), clip)[0]] for r in zip(*local)]
before = [np.mean(pair, axis=0) for pair in zip(*clipped)]                         # clip each replica, then all-reduce
norm = lambda gs: float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in gs)))
print(json.dumps({"grad_norm": norm(mean), "reduce_then_clip": norm(after), "clip_then_reduce": norm(before),
                  "update_gap": max(float(np.max(np.abs(a - b))) for a, b in zip(after, before)),
                  "replica_norms": [norm(r) for r in zip(*local)]}))
'''


def test_per_replica_clipping_trap(mirrored_mlp, regularized_mlp, regression_npz):
    """Clipping each replica's gradient before the all-reduce (Keras' clipnorm under a strategy,
    tensorflow issue 33929) applies a different update than clipping the global gradient; gradwatch
    records (and applies) the latter, which is one device's."""
    done = subprocess.run([sys.executable, "-c", TRAP, str(regularized_mlp), str(regression_npz), "0.5"],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    trap = json.loads(done.stdout.strip().splitlines()[-1])
    rows = mirrored_mlp["mirrored"][0]
    first = rows[(rows["clip"] == "global") & (rows["step"] == 1)].iloc[0]
    np.testing.assert_allclose(first["grad_norm"], trap["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(first["clipped_norm"], trap["reduce_then_clip"], rtol=1e-5)
    assert min(trap["replica_norms"]) > 0.5  # both replicas clip on their own ...
    assert trap["clip_then_reduce"] < 0.5 * (1 - 1e-2)  # ... and their mean is shorter than the threshold
    assert trap["update_gap"] > 1e-3


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multiworker_two_processes_equal_one_device(tmp_path, mirrored_mlp, regularized_mlp, regression_npz):
    """Two worker processes on localhost (TF_CONFIG, free ports): the chief's rows equal the
    single-device run within 1e-5; the other worker prints and writes nothing."""
    workers = [f"localhost:{p}" for p in free_ports(2)]
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                                      "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "gradwatch", "compare", str(regularized_mlp), "--data", str(regression_npz),
             "--variants", VARIANTS, "--steps", "12", "--batch-size", "16", "--no-shuffle", "--strategy", "multiworker",
             "--csv", str(tmp_path / f"worker{index}.csv"), "--layers-csv", str(tmp_path / f"worker{index}-layers.csv")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    (rows, layers) = mirrored_mlp["single"]
    assert_same_rows(rows, read_csv(tmp_path / "worker0.csv"))
    assert_same_rows(layers, read_csv(tmp_path / "worker0-layers.csv"))
    assert "gradwatch compare" in outs[0][0]  # the chief prints the tables
    assert outs[1][0] == "" and not (tmp_path / "worker1.csv").exists() and not (tmp_path / "worker1-layers.csv").exists()
    assert not list(tmp_path.glob("worker1*"))


@pytest.mark.parametrize("args, message", [
    (["--strategy", "mirrored", "--cpu-devices", "2", "--batch-size", "15"], "does not split over 2 replicas"),
    (["--strategy", "multiworker"], "TF_CONFIG"),
    (["--strategy", "ring"], "unknown --strategy"),
    (["--cpu-devices", "0"], "--cpu-devices"),
])
def test_strategy_errors_are_one_line(tmp_path, regularized_mlp, regression_npz, args, message):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    done = subprocess.run([sys.executable, "-m", "gradwatch", "run", str(regularized_mlp), "--data", str(regression_npz),
                           "--steps", "2", *args], capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
