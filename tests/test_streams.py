"""Streamed data (--stream, TFRecord): the same batches as the in-memory path where the order is
the same, a deterministic seeded order where it is not, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import read_csv
from gradwatch.load import data, streams

SKIP = {"time_ms", "data"}


def same_rows(a, b):
    assert len(a) == len(b) and list(a.columns) == list(b.columns)
    for column in a.columns:
        if column not in SKIP:
            assert a[column].fillna(-1).tolist() == b[column].fillna(-1).tolist(), column


def write_tfrecord(path, x, y, y_kind="float"):
    import tensorflow as tf

    def feature(values, kind):
        if kind == "int":
            return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        return tf.train.Feature(float_list=tf.train.FloatList(value=values))

    with tf.io.TFRecordWriter(str(path)) as writer:
        for a, b in zip(x, y):
            example = tf.train.Example(features=tf.train.Features(
                feature={"x": feature(a.ravel(), "float"), "y": feature(np.atleast_1d(b).ravel(), y_kind)}))
            writer.write(example.SerializeToString())


@pytest.fixture(scope="module")
def four_ways(tmp_path_factory):
    """The same 100 rows as an .npz, a tf.data.Dataset.save folder and a TFRecord file."""
    import tensorflow as tf

    folder = tmp_path_factory.mktemp("streams")
    rng = np.random.default_rng(11)
    x = rng.normal(size=(100, 4)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)).astype(np.float32)
    np.savez(folder / "rows.npz", x=x, y=y)
    tf.data.Dataset.from_tensor_slices((x, y)).save(str(folder / "rows_tfdata"))
    write_tfrecord(folder / "rows.tfrecord", x, y)
    return folder


def csv_of(cli, tmp_path, name, model, *args):
    out = tmp_path / f"{name}.csv"
    code, _, err = cli("run", model, "--steps", 20, "--batch-size", 16, "--clip", "global", "--norm", 1,
                       "--csv", out, "--quiet", "--loss", "mse", *args)
    assert code == 0, err
    return read_csv(out)


def test_streamed_npz_trains_on_the_in_memory_batches(cli, tmp_path, four_ways, keras_export_model):
    """Rows read where they lie, in the in-memory path's per-epoch permutation: every column
    equal over 3 shuffled epochs (plus the auto choice, which keeps a small file in memory)."""
    path = four_ways / "rows.npz"
    memory = csv_of(cli, tmp_path, "memory", keras_export_model, "--data", path, "--no-stream")
    streamed = csv_of(cli, tmp_path, "streamed", keras_export_model, "--data", path, "--stream")
    auto = csv_of(cli, tmp_path, "auto", keras_export_model, "--data", path)
    same_rows(memory, streamed)
    same_rows(memory, auto)
    assert memory["epoch"].max() == 4


def test_npz_member_reads_rows_in_any_order(four_ways):
    members = streams.npz_members(four_ways / "rows.npz", ["x", "y"])
    with np.load(four_ways / "rows.npz") as archive:
        x = archive["x"]
    rows = np.array([7, 3, 99, 0, 3, 50])
    np.testing.assert_array_equal(members["x"].read(rows), x[rows])
    np.testing.assert_array_equal(members["x"].read(np.arange(10, 30)), x[10:30])
    chunks = np.concatenate([c for _, c in members["x"].chunks()])
    np.testing.assert_array_equal(chunks, x)
    assert members["x"].astype(np.float64).read([1]).dtype == np.float64


def test_record_streams_in_file_order_equal_in_memory(cli, tmp_path, four_ways, keras_export_model):
    """Without shuffling a tf.data folder and a TFRecord file stream the rows in file order:
    the in-memory run's batches."""
    memory = csv_of(cli, tmp_path, "memory", keras_export_model, "--data", four_ways / "rows.npz", "--no-shuffle")
    saved = csv_of(cli, tmp_path, "saved", keras_export_model, "--data", four_ways / "rows_tfdata", "--stream",
                   "--no-shuffle")
    record = csv_of(cli, tmp_path, "record", keras_export_model, "--data", four_ways / "rows.tfrecord",
                    "--features", "x:float32:4,y:float32:1", "--no-shuffle")
    same_rows(memory, saved)
    same_rows(memory, record)


def test_record_stream_shuffle_is_seeded_and_per_epoch(four_ways):
    """The bounded buffer's order: the same for the same seed, another for another seed or epoch,
    and every epoch a permutation of the rows (buffer >= rows)."""
    import tensorflow as tf

    dataset = data.load(four_ways / "rows_tfdata", data.DataOptions(stream=True, shuffle_buffer=1000))
    assert dataset.streamed and len(dataset) == 100
    with np.load(four_ways / "rows.npz") as archive:
        row_of = {float(v): k for k, v in enumerate(archive["y"][:, 0])}  # the targets are distinct

    def epochs(seed):
        batches = dataset.stream.batches(dataset.x, dataset.y, 2, 10, True, seed, lambda t: t, 2)
        return [row_of[float(v)] for b in batches for v in b[1].numpy()[:, 0]]

    first, again, other = epochs(0), epochs(0), epochs(1)
    assert first == again and first != other
    assert sorted(first[:100]) == list(range(100)) == sorted(first[100:])
    assert first[:100] != first[100:] and first[:100] != list(range(100))
    assert tf.is_tensor(next(iter(dataset.stream.batches(dataset.x, dataset.y, 1, 10, False, 0, lambda t: t, 2)))[0])


def test_stream_errors_are_one_line(cli, tmp_path, four_ways, keras_export_model):
    x = np.ones((40, 4), np.float32)
    np.savez_compressed(tmp_path / "packed.npz", x=x, y=x[:, :1])
    bad = x.copy()
    bad[17, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=bad, y=x[:, :1])
    write_tfrecord(tmp_path / "nan.tfrecord", bad, x[:, :1])
    cases = [
        (["--data", tmp_path / "packed.npz", "--stream"], "is compressed (numpy.savez_compressed)"),
        (["--data", tmp_path / "nan.npz", "--stream"], "x has 1 non-finite value (NaN or inf) in 1 row, the first at x[17, 2]"),
        (["--data", tmp_path / "nan.tfrecord", "--features", "x:float32:4,y:float32:1"], "the first in x of row 17"),
        (["--data", four_ways / "rows.tfrecord"], "needs --features"),
        (["--data", four_ways / "rows.tfrecord", "--features", "x:float32:4,y:complex"], "is not one tf.train.Example holds"),
        (["--data", four_ways / "rows.tfrecord", "--features", "x:float32:4,y:float32:1", "--target", "z"], "is not among --features"),
        (["--data", four_ways / "rows.tfrecord", "--features", "x:float32:5,y:float32:1"], "cannot read it as TFRecord"),
        (["--data", four_ways / "rows.npz", "--features", "x:float32:4,y:float32:1"], "drop it for this data"),
    ]
    for args, message in cases:
        code, out, err = cli("run", keras_export_model, "--steps", 2, "--loss", "mse", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)


def test_a_record_stream_beyond_float32_and_a_dict_of_one_input(cli, tmp_path, keras_export_model, keras_file_model):
    """A tf.data folder of float64: 1e39 is refused where it is, streamed or in memory (the stream casts
    inside its pipeline, so its counting pass keeps the first such value). x as {name: array} for a
    one-input model trains as the array itself in memory; streamed, and with two names, one line says what to do."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)), rng.normal(size=(64, 1))
    big = x.copy()
    big[5, 2] = 1e39
    tf.data.Dataset.from_tensor_slices((big, y)).save(str(tmp_path / "big"))
    tf.data.Dataset.from_tensor_slices((x, y)).save(str(tmp_path / "plain"))
    tf.data.Dataset.from_tensor_slices(({"a": x}, y)).save(str(tmp_path / "dict1"))
    tf.data.Dataset.from_tensor_slices(({"a": x, "b": x}, y)).save(str(tmp_path / "dict2"))
    run = ["run", keras_export_model, "--steps", 3, "--loss", "mse", "-q", "--no-shuffle"]
    for stream in ("--no-stream", "--stream"):
        code, out, err = cli(*run, "--data", tmp_path / "big", stream)
        assert code == 2 and out == "" and err.strip().splitlines() == [
            f"gradwatch: error: {tmp_path / 'big'}: x[5, 2] is 1e+39, beyond float32's range (at most 3.403e+38), in "
            "which the model computes; scale the data"], (stream, err)
    ids = rng.integers(0, 20, size=(64, 6))
    ids[7, 3] = 2**32 + 5  # int64 ids for an int32 input: it would wrap to the id 5
    tf.data.Dataset.from_tensor_slices((ids, y)).save(str(tmp_path / "ids"))
    code, out, err = cli("run", keras_file_model, "--data", tmp_path / "ids", "--stream", *run[2:])
    assert code == 2 and err.strip().splitlines() == [
        f"gradwatch: error: {tmp_path / 'ids'}: x[7, 3] is 4294967301, beyond int32's range (-2147483648 to "
        "2147483647), the model's input type; store values it holds"], err
    assert cli(*run, "--data", tmp_path / "plain", "--csv", tmp_path / "plain.csv")[0] == 0
    assert cli(*run, "--data", tmp_path / "dict1", "--csv", tmp_path / "dict1.csv")[0] == 0
    same_rows(read_csv(tmp_path / "dict1.csv"), read_csv(tmp_path / "plain.csv"))
    for folder, stream, words in [
        ("dict1", "--stream", "holds 1 input (a) in a dict, but the model takes one array; store x as the array itself, "
                              "or read the data into memory (--no-stream)"),
        ("dict2", "--no-stream", "holds 2 inputs (a, b) in a dict, but the model takes one array; keep one of them"),
    ]:
        code, out, err = cli(*run, "--data", tmp_path / folder, stream)
        assert code == 2 and err.strip().splitlines() == [f"gradwatch: error: {tmp_path / folder} {words}"], err

def test_streamed_nonfinite_rows_are_marked_when_allowed(cli, tmp_path, keras_export_model):
    """--allow-nonfinite-data on a streamed .npz marks the same steps as in memory; record streams
    (a tf.data folder, TFRecord) too, in file order the same rows as in memory, and shuffled the
    one bad row in one batch of every epoch."""
    import tensorflow as tf

    x = np.random.default_rng(5).normal(size=(64, 4)).astype(np.float32)
    x[9, 1] = np.inf
    y = x[:, :1].copy()
    y[9] = 0.0
    np.savez(tmp_path / "inf.npz", x=x, y=y)
    runs = [csv_of(cli, tmp_path, f"inf{k}", keras_export_model, "--data", tmp_path / "inf.npz",
                   "--allow-nonfinite-data", flag) for k, flag in enumerate(["--no-stream", "--stream"])]
    same_rows(*runs)
    assert runs[0]["nonfinite_input"].sum() == 5  # one row: one batch an epoch, 5 epochs of 4 steps
    tf.data.Dataset.from_tensor_slices((x, y)).save(str(tmp_path / "inf_tfdata"))
    write_tfrecord(tmp_path / "inf.tfrecord", x, y)
    records = [("tfdata", ["--data", tmp_path / "inf_tfdata", "--stream"]),
               ("tfrecord", ["--data", tmp_path / "inf.tfrecord", "--features", "x:float32:4,y:float32:1"])]
    in_order = csv_of(cli, tmp_path, "inf_memory", keras_export_model, "--data", tmp_path / "inf.npz",
                      "--allow-nonfinite-data", "--no-shuffle")
    assert in_order["nonfinite_input"].tolist() == [(step - 1) % 4 == 0 for step in in_order["step"]]  # row 9: batch 1
    for name, args in records:
        same_rows(csv_of(cli, tmp_path, f"inf_{name}", keras_export_model, *args, "--allow-nonfinite-data",
                         "--no-shuffle"), in_order)
        shuffled = csv_of(cli, tmp_path, f"inf_{name}_shuffled", keras_export_model, *args, "--allow-nonfinite-data")
        marked = shuffled["nonfinite_input"].to_numpy()
        assert marked.sum() == 5 and all(marked[4 * e:4 * e + 4].sum() == 1 for e in range(5))
        assert (shuffled["nonfinite"] == marked).all()  # an inf input gives a non-finite step, and nothing else does
        code, _, err = cli("run", keras_export_model, "--steps", 2, "--loss", "mse", *args)
        assert code == 2 and "1 row holds non-finite values (NaN or inf), the first in x of row 9; clean the data, " \
            "or pass --allow-nonfinite-data to train on it anyway" in err, err


@pytest.mark.parametrize("source,stream", [("rows.npz", False), ("rows.npz", True), ("rows_tfdata", True)])
def test_every_pipeline_is_sized_by_hand_with_autotuning_off(four_ways, keras_export_model, source, stream):
    """tf.data's autotuning thread made an ending run wait out its sleep (seconds, growing with
    the run) when the iterator was dropped; in memory, read where it lies or a record stream, the
    pipeline the step iterates has it off and a fixed prefetch."""
    from gradwatch import RunSpec, prepare, resolve
    from gradwatch.train import pipeline

    spec = RunSpec(model=str(keras_export_model), data=str(four_ways / source), stream=stream, loss="mse", steps=5,
                   batch_size=16)
    trainer = prepare(resolve(spec))
    dataset = trainer.pipeline.dataset()
    assert dataset.options().autotune.enabled is False
    assert len(list(dataset)) == 5 and pipeline.PREFETCH >= 1
