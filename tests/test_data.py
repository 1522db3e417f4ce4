"""Data loaders and the batch order, against hand-written references."""

from __future__ import annotations

import numpy as np
import pytest

from gradwatch.load import data, streams
from gradwatch.errors import DataError

OPTS = data.DataOptions()


def ptb_producer_reference(raw, batch_size, num_steps):
    """The tutorial's reader, step by step: (x, y) of every batch of an epoch."""
    raw = np.array(raw, dtype=np.int32)
    batch_len = len(raw) // batch_size
    d = raw[: batch_size * batch_len].reshape([batch_size, batch_len])
    epoch_size = (batch_len - 1) // num_steps
    return [(d[:, i * num_steps:(i + 1) * num_steps], d[:, i * num_steps + 1:(i + 1) * num_steps + 1])
            for i in range(epoch_size)]


def test_text_windows_equal_the_ptb_reader(tmp_path):
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(20)]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    rng = np.random.default_rng(0)
    lines = [" ".join(f"w{j}" for j in rng.integers(0, 25, size=rng.integers(3, 12))) for _ in range(60)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    ds = data.load(str(corpus), data.DataOptions(vocab=str(tmp_path / "vocab.txt"), num_steps=5, batch_size=4))
    # ids as the PTB reader reads them: every line's words then <eos>; w20..w24 are unknown
    index = {w: i for i, w in enumerate(words)}
    ids = [index.get(w, 0) for line in lines for w in line.split() + ["<eos>"]]
    reference = ptb_producer_reference(ids, 4, 5)
    got = list(data.batches(ds, 4, len(reference), shuffle=False, seed=0))
    assert len(got) == len(reference)
    for (epoch, x, y), (rx, ry) in zip(got, reference):
        np.testing.assert_array_equal(x, rx)
        np.testing.assert_array_equal(y, ry)
    assert (ds.x == 0).any()  # unknown words map to <unk>


def test_text_needs_vocab_with_unk(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c\n")
    with pytest.raises(DataError, match="--vocab"):
        data.load(str(corpus), data.DataOptions(num_steps=2))
    (tmp_path / "v.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match="<unk>"):
        data.load(str(corpus), data.DataOptions(vocab=str(tmp_path / "v.txt"), num_steps=2))


def test_npz_keys_and_pickle(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, inputs=np.ones((4, 2)), labels=np.zeros(4))
    with pytest.raises(DataError, match="--x-key"):
        data.load(str(path), OPTS)
    ds = data.load(str(path), data.DataOptions(x_key="inputs", y_key="labels"))
    assert ds.x.shape == (4, 2)
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    with pytest.raises(DataError, match="pickle"):
        data.load(str(tmp_path / "obj.npz"), OPTS)


def test_csv_target_default_is_last_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b,y\n1,2,0\n3,4,1\n")
    ds = data.load(str(path), OPTS)
    np.testing.assert_array_equal(ds.y, [0, 1])
    np.testing.assert_array_equal(ds.x, [[1, 2], [3, 4]])
    ds = data.load(str(path), data.DataOptions(target="a"))
    np.testing.assert_array_equal(ds.y, [1, 3])
    with pytest.raises(DataError, match="no column 'z'"):
        data.load(str(path), data.DataOptions(target="z"))
    weighted = tmp_path / "w.csv"  # a weight column at the end weighs the rows; the target is the last before it
    weighted.write_text("a,b,y,sample_weight\n1,2,0,0.5\n3,4,1,2\n")
    ds = data.load(str(weighted), OPTS)
    np.testing.assert_array_equal(ds.y, [0, 1])
    np.testing.assert_array_equal(ds.x, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(ds.w, [0.5, 2])
    assert streams.default_target(["x", "y", "sample_weight"]) == "y"  # a TFRecord's --features likewise
    (tmp_path / "s.csv").write_text("a,b,y\nx,2,0\n")
    with pytest.raises(DataError, match="not numeric"):
        data.load(str(tmp_path / "s.csv"), OPTS)
    for name, sep, word in (("semi.csv", ";", "semicolons"), ("tabs.csv", "\t", "tabs")):
        (tmp_path / name).write_text(f"a{sep}b{sep}y\n1{sep}2{sep}0\n")
        with pytest.raises(DataError) as caught:
            data.load(str(tmp_path / name), OPTS)
        assert str(caught.value).endswith(f"has 1 column(s); its header {f'a{sep}b{sep}y'!r} looks separated by "
                                          f"{word}: gradwatch reads comma-separated files, so save it with commas")


def test_the_start_line_names_a_csv_target_it_chose(cli, keras_export_model, regression_csv):
    args = ["run", keras_export_model, "--data", regression_csv, "--loss", "mse", "--steps", 1]
    code, _, err = cli(*args)
    assert code == 0, err
    assert "; target: column 'label' (by default the last but sample_weight; --target NAME picks another)" in \
        err.splitlines()[0]
    code, _, err = cli(*args, "--target", "label")
    assert code == 0 and "target: column" not in err, err


def test_tf_data_folder_batched_or_not(tmp_path):
    import tensorflow as tf

    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    y = np.arange(6)
    tf.data.Dataset.from_tensor_slices((x, y)).batch(4).save(str(tmp_path / "batched"))
    ds = data.load(str(tmp_path / "batched"), OPTS)
    np.testing.assert_array_equal(ds.x, x)
    np.testing.assert_array_equal(ds.y, y)
    tf.data.Dataset.from_tensor_slices(x).save(str(tmp_path / "single"))
    with pytest.raises(DataError, match=r"\(x, y\) pairs"):
        data.load(str(tmp_path / "single"), OPTS)


def test_unknown_paths(tmp_path):
    with pytest.raises(DataError, match="no such data"):
        data.load(str(tmp_path / "missing.npz"), OPTS)
    (tmp_path / "f.parquet").write_text("x")
    with pytest.raises(DataError, match="cannot tell the kind"):
        data.load(str(tmp_path / "f.parquet"), OPTS)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="tf.data.Dataset.save"):
        data.load(str(tmp_path / "folder"), OPTS)


def test_a_model_given_as_data_is_named_as_a_model(tmp_path, module_model, keras_file_model):
    """`gradwatch run DATA --data MODEL` (or the model twice): the line says which is which."""
    for model, kind in ((module_model, "a SavedModel folder"), (keras_file_model, "a .keras model file")):
        with pytest.raises(DataError) as caught:
            data.load(str(model), OPTS)
        assert str(caught.value) == (f"--data {model} is {kind}, not data; give the model first and the data after "
                                     "--data: gradwatch run MODEL --data DATA")


def test_batch_order_without_and_with_shuffle():
    ds = data.Dataset(np.arange(10)[:, None], np.arange(10), "npz", "mem")
    got = [x[:, 0].tolist() for _, x, _ in data.batches(ds, 3, 5, shuffle=False, seed=0)]
    assert got == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2], [3, 4, 5]]  # remainder dropped
    epochs = [e for e, _, _ in data.batches(ds, 3, 5, shuffle=False, seed=0)]
    assert epochs == [1, 1, 1, 2, 2]
    shuffled = [x[:, 0].tolist() for _, x, _ in data.batches(ds, 3, 3, shuffle=True, seed=4)]
    order = np.random.default_rng([4, 1]).permutation(10)
    assert shuffled == [order[0:3].tolist(), order[3:6].tolist(), order[6:9].tolist()]
    again = [x[:, 0].tolist() for _, x, _ in data.batches(ds, 3, 3, shuffle=True, seed=4)]
    assert again == shuffled


@pytest.mark.parametrize("stream", ["--no-stream", "--stream"])
def test_a_bool_mask_feeds_an_integer_input_as_0_and_1_and_floats_are_refused(cli, keras_file_model, tmp_path, stream):
    """keras-hub's preprocessors give padding_mask as bool to an int32 input, and Keras casts it:
    gradwatch trains on the same 0/1 ids. Float ids are refused (exit 2), not truncated."""
    from conftest import read_csv

    ids = np.random.default_rng(9).integers(0, 2, size=(32, 6))
    y = ids.sum(axis=1, keepdims=True).astype(np.float32)
    rows = {}
    for dtype in (np.int32, np.bool_):
        path, csv = tmp_path / f"{np.dtype(dtype).name}.npz", tmp_path / f"{np.dtype(dtype).name}.csv"
        np.savez(path, x=ids.astype(dtype), y=y)
        code, _, err = cli("run", keras_file_model, "--data", path, "--loss", "mse", "--batch-size", 8, "--steps", 3,
                           stream, "--csv", csv, "-q")
        assert code == 0, err
        rows[dtype] = read_csv(csv)
    assert rows[np.int32]["loss"].tolist() == rows[np.bool_]["loss"].tolist()
    np.savez(tmp_path / "float.npz", x=ids.astype(np.float32) + 0.5, y=y)
    code, _, err = cli("run", keras_file_model, "--data", tmp_path / "float.npz", "--loss", "mse", "--steps", 1, stream)
    assert code == 2 and "expects integer x (int32) but the data has float32" in err, err


@pytest.mark.parametrize("stored, target", [("float64", "float32"), ("float32", "float16"), ("int64", "int32"),
                                            ("int64", "float16"), ("uint64", "int64")])
@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_a_cast_refuses_exactly_the_first_value_numpy_would_lose(stored, target, chunk, monkeypatch):
    """The reference is NumPy's own cast: inf from a finite float, or an integer that does not come back."""
    import warnings

    from gradwatch.load import casts

    monkeypatch.setattr(casts, "CHUNK_VALUES", chunk)
    rng = np.random.default_rng(7)
    for trial in range(20):
        array = rng.integers(0 if stored == "uint64" else -100, 100, size=(30, 4)).astype(stored)
        big = {"float64": 1e39, "float32": 1e5, "int64": 2**40, "uint64": 2**63 + 3}[stored]
        for _ in range(trial % 3):  # none, one or two values out of range, anywhere
            array[rng.integers(30), rng.integers(4)] = big if trial % 2 or stored == "uint64" else -big
        if stored.startswith("float") and trial % 4 == 0:
            array[0, 0] = np.nan  # not a value a cast loses
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            out = array.astype(target)
        if np.dtype(target).kind == "f":
            lost = np.isinf(out) & np.isfinite(array)
        else:  # compared as Python integers: a wrapped value is another number
            lost = out.astype(object) != array.astype(object)
        if not lost.any():
            np.testing.assert_array_equal(casts.cast(array, target, "x"), out)
            continue
        first = tuple(int(i) for i in np.argwhere(lost)[0])
        with pytest.raises(casts.CastError) as caught:
            casts.cast(array, target, "x")
        assert caught.value.index == first and caught.value.value == array[first]
