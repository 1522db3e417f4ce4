"""Issue 22, part 2: every promise of the exit-code table under hostile but realistic use.
A real subprocess wherever a signal, a pipe or a second process is involved."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import heed_stop_signals, interrupt_gradwatch, read_csv


def gradwatch(*args, **popen):
    popen.setdefault("preexec_fn", heed_stop_signals)
    return subprocess.Popen([sys.executable, "-m", "gradwatch", *map(str, args)], text=True, **popen)


def rows_in(path: Path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except OSError:
        return 0


def wait_for_rows(path: Path, proc, rows: int = 2, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while rows_in(path) < rows:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no rows in time"
        time.sleep(0.1)


def one_line_error(err: str, *words):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gradwatch: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_a_second_run_on_the_same_csv_is_refused_and_the_first_keeps_its_rows(tmp_path, module_model, regression_npz):
    target = tmp_path / "run.csv"
    args = [module_model, "--data", regression_npz, "--loss", "mse", "--csv", target, "-q", "--fetch-every", 1]

    def second_run(first):
        wait_for_rows(target.with_name("run.csv.partial"), first)
        second = subprocess.run([sys.executable, "-m", "gradwatch", "run", *map(str, args), "--steps", "5"],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        one_line_error(second.stderr, "another gradwatch is writing", str(target))

    code, err = interrupt_gradwatch(["run", *args, "--steps", 100000], second_run)
    assert code == 130, err
    rows = read_csv(target)
    assert rows["step"].tolist() == list(range(1, len(rows) + 1)) and len(rows) > 2  # one run's rows, whole
    assert not target.with_name("run.csv.partial").exists()


def test_a_huge_step_count_starts_at_once_and_stops_on_sigterm(tmp_path, module_model, regression_npz):
    target = tmp_path / "run.csv"
    args = [module_model, "--data", regression_npz, "--loss", "mse", "--csv", target, "--steps", 10**12, "-q",
            "--lr-decay", 0.5]  # a per-epoch schedule over 3e11 epochs: nothing may be made per epoch up front

    def ready(proc):
        wait_for_rows(target.with_name("run.csv.partial"), proc, rows=3, seconds=90)

    code, err = interrupt_gradwatch(["run", *args], ready, signal.SIGTERM)
    assert code == 143, err
    assert "interrupted by SIGTERM" in err and len(read_csv(target)) >= 3
    refused = subprocess.run([sys.executable, "-m", "gradwatch", "run", str(module_model), "--data", str(regression_npz),
                              "--loss", "mse", "--steps", str(10**13)], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "`--steps` must be at most" in refused.stderr


@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGHUP, 129, "SIGHUP")])
def test_a_signal_while_loading_exits_with_its_code_and_says_what_it_stopped(sig, code, name, module_model, regression_npz,
                                                                                tmp_path):
    proc = gradwatch("run", module_model, "--data", regression_npz, "--loss", "mse", "--csv", tmp_path / "x.csv",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.5)  # inside TensorFlow's import: long before the first step
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert f"gradwatch: interrupted by {name} while loading" in err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_a_closed_pipe_ends_quietly_with_141(fmt, module_model, regression_npz):
    proc = gradwatch("run", module_model, "--data", regression_npz, "--loss", "mse", "--steps", 3, "--format", fmt, "-q",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written (`gradwatch ... | true`)
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 141, err
    assert err == ""


def test_report_into_a_closed_pipe(tmp_path, module_model, regression_npz):
    target = tmp_path / "run.csv"
    subprocess.run([sys.executable, "-m", "gradwatch", "run", str(module_model), "--data", str(regression_npz), "--loss",
                    "mse", "--steps", "300", "--csv", str(target), "-q"], check=True, capture_output=True, timeout=120)
    proc = subprocess.Popen([sys.executable, "-m", "gradwatch", "report", str(target)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the report is written (`gradwatch report ... | true`)
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 141 and err == b""


def _truncated(path: Path, out: Path) -> Path:
    out.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return out


def test_bad_input_is_one_line_and_exit_2(cli, tmp_path, module_model, regression_npz, keras_file_model, ids_npz):
    base = ["run", module_model, "--data", regression_npz, "--loss", "mse", "--steps", 2, "-q"]
    cases = [
        (base + ["--seed", -1], "`--seed` must be between 0"),
        (base + ["--seed", 99999999999999999999], "`--seed` must be between 0"),
        (["run", module_model, "--data", _truncated(regression_npz, tmp_path / "cut.npz"), "--loss", "mse"],
         "not a complete .npz"),
        (["run", _truncated(keras_file_model, tmp_path / "cut.keras"), "--data", ids_npz], "not a complete .keras"),
        (base + ["--clip", "global", "--norm", 1e38], "between 1e-30 and 1e+30"),
        (base + ["--clip", "global", "--norm", 1e-45], "between 1e-30 and 1e+30"),
        (["compare", *base[1:], "--thresholds", "none,1e38"], "--thresholds item 1e+38"),
        (["compare", *base[1:], "--variants", "none,global:-1"], "--variants item 'global:-1'"),
        (["compare", *base[1:], "--variants", "global"], "--variants item 'global': global needs a threshold"),
        (base + ["--optimizer", "adam", "--opt", "beta_1=abc"], "--opt beta_1='abc'"),
        # a flag given as text would be a true string (nesterov=no trains Nesterov), a number as a flag 1.0
        (base + ["--optimizer", "sgd", "--opt", "nesterov=no"], "--opt nesterov='no': optimizer sgd's nesterov is true "
                                                                "or false (default false); write --opt nesterov=true or "
                                                                "--opt nesterov=false"),
        (base + ["--optimizer", "sgd", "--opt", "momentum=true"], "--opt momentum=true: optimizer sgd's momentum is a "
                                                                  "number (default 0)"),
    ]
    (tmp_path / "afile").write_text("x")
    cases.append((base + ["--csv", tmp_path / "afile" / "run.csv"], "is a file, not a folder"))
    cases.append((base + ["--csv", "-"], "--csv -: '-' is not standard output here; give a file name such as steps.csv"))
    header_only = tmp_path / "header.csv"
    header_only.write_text("a,b,c,d,y\n")
    cases.append((["run", module_model, "--data", header_only, "--loss", "mse"], "has a header but no rows"))
    nul = tmp_path / "zeros.csv"
    nul.write_bytes(b"\0" * (4 << 20))
    cases.append((["report", nul], "is not a text CSV"))
    ids = np.load(ids_npz)["x"].copy()
    ids[40, 2] = 25  # row 40: batch 6 in file order; the Embedding has 20 rows
    np.savez(tmp_path / "ids25.npz", x=ids, y=np.ones((len(ids), 1), np.float32))
    cases.append((["run", keras_file_model, "--data", tmp_path / "ids25.npz", "--loss", "mse", "--batch-size", 8,
                   "--no-shuffle", "--fetch-every", 1, "-q"], "the data of step 6 holds the id 25, but the model's lookup table"))
    for args, words in cases:
        code, out, err = cli(*args)
        assert code == 2, (args, err)
        one_line_error(err, words)
        assert "unexpected" not in err and "please report" not in err


def test_an_empty_argument_is_refused_before_it_becomes_a_path(cli, tmp_path, module_model, regression_npz,
                                                                monkeypatch):
    """`--csv "$OUT"` with OUT unset: '' would be the folder '.', '  ' a file named by spaces in the cwd."""
    monkeypatch.chdir(tmp_path)
    base = ["run", module_model, "--data", regression_npz, "--loss", "mse", "--steps", 2, "-q"]
    for args, words in [
        (base + ["--csv", ""], "the argument after --csv is empty (an unset shell variable?); give it a value or "
                               "leave it out"),
        (base + ["--csv", "   "], "the argument after --csv is only spaces (an unset shell variable?)"),
        (base + ["--csv="], "the value of --csv is empty"),
        (["run", "", "--data", regression_npz], "the argument after run is empty"),
        (["compare", module_model, "--data", "", "--thresholds", "none,5"], "the argument after --data is empty"),
    ]:
        code, out, err = cli(*args)
        assert code == 2 and out == "", (args, err)
        one_line_error(err, words)
    assert sorted(p.name for p in tmp_path.iterdir()) == []

def test_values_beyond_float32_are_refused_where_they_are_not_trained_as_inf(cli, tmp_path, module_model):
    """float64 data cast to a float32 model: 1e39 would become inf (and train on NaN rows) although the
    file holds a finite number; complex numbers would lose their imaginary part. A float64 model takes 1e39."""
    import keras

    rng = np.random.default_rng(0)
    x, y, w = rng.normal(size=(64, 4)), rng.normal(size=(64, 1)), np.ones(64)
    big_x = x.copy()
    big_x[5, 2] = 1e39
    big_w = w.copy()
    big_w[9] = 1e40
    np.savez(tmp_path / "big_x.npz", x=big_x, y=y)
    np.savez(tmp_path / "big_w.npz", x=x, y=y, sample_weight=big_w)
    np.savez(tmp_path / "complex.npz", x=(x + 1j * x).astype(np.complex64), y=y)
    table = tmp_path / "big.csv"
    rows = [",".join(str(float(v)) for v in (*x[i], y[i, 0])) for i in range(64)]
    rows[40] = "1.0,1e39,3.0,4.0,1.0"
    table.write_text("a,b,c,d,y\n" + "\n".join(rows) + "\n")
    beyond = "is 1e+39, beyond float32's range (at most 3.403e+38), in which the model computes; scale the data"
    base = ["--loss", "mse", "--steps", 2, "-q"]
    for data, extra, words in [
        (tmp_path / "big_x.npz", [], f"big_x.npz: x[5, 2] {beyond}"),
        (tmp_path / "big_x.npz", ["--stream"], f"big_x.npz: x[5, 2] {beyond}"),
        (tmp_path / "big_x.npz", ["--allow-nonfinite-data"], f"big_x.npz: x[5, 2] {beyond}"),
        (tmp_path / "big_w.npz", ["--stream"], "big_w.npz: sample_weight[9] is 1e+40, beyond float32's range"),
        (table, [], f"big.csv: line 42, column 'b' {beyond}"),
        (tmp_path / "complex.npz", [], "complex.npz: x holds complex numbers but the model takes float32; store real "
                                       "numbers"),
    ]:
        code, out, err = cli("run", module_model, "--data", data, *base, *extra)
        assert code == 2 and out == "", (data, extra, err)
        one_line_error(err, words)
        assert "Warning" not in err
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,), dtype="float64"), keras.layers.Dense(1, dtype="float64")])
    model.compile(optimizer="sgd", loss="mse")
    model.save(tmp_path / "float64.keras")
    code, _, err = cli("run", tmp_path / "float64.keras", "--data", tmp_path / "big_x.npz", *base, "--csv",
                       tmp_path / "f64.csv")
    assert code == 0, err  # float64 holds 1e39: trained as given
    # a model of two inputs: the value is named as the non-finite check names it, x['a'][5, 2]
    a, b = keras.Input((4,), name="a"), keras.Input((2,), name="b")
    two = keras.Model([a, b], keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))
    two.compile(optimizer="sgd", loss="mse")
    two.save(tmp_path / "two.keras")
    np.savez(tmp_path / "two.npz", a=big_x, b=x[:, :2], y=y)
    for stream in ("--no-stream", "--stream"):
        code, out, err = cli("run", tmp_path / "two.keras", "--data", tmp_path / "two.npz", *base, stream)
        assert code == 2, err
        one_line_error(err, f"two.npz: x['a'][5, 2] {beyond}")
    # int64 ids for an int32 input: 2**32 + 5 would wrap to the id 5 and train on a row nobody named
    lookup = keras.Sequential([keras.Input((6,), dtype="int32"), keras.layers.Embedding(50, 4),
                               keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(1)])
    lookup.compile(optimizer="sgd", loss="mse")
    lookup.save(tmp_path / "lookup.keras")
    ids = rng.integers(0, 50, size=(64, 6))
    ids[7, 3] = 2**32 + 5
    np.savez(tmp_path / "ids.npz", x=ids, y=y)
    for stream in ("--no-stream", "--stream"):
        code, out, err = cli("run", tmp_path / "lookup.keras", "--data", tmp_path / "ids.npz", *base, stream)
        assert code == 2, err
        one_line_error(err, "ids.npz: x[7, 3] is 4294967301, beyond int32's range (-2147483648 to 2147483647), the "
                            "model's input type; store values it holds")

def write_tfrecord(path, x, y) -> None:
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for xi, yi in zip(x, y):
            yi = np.atleast_1d(yi)
            feature = {"x": tf.train.Feature(float_list=tf.train.FloatList(value=xi)),
                       "y": tf.train.Feature(int64_list=tf.train.Int64List(value=yi)) if yi.dtype.kind == "i"
                       else tf.train.Feature(float_list=tf.train.FloatList(value=yi))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


@pytest.fixture(scope="module")
def one_two_three(tmp_path_factory):
    """Three .keras models on 6 features: 1 unit under mse, 1 sigmoid unit under binary
    crossentropy, 3 logits under sparse categorical crossentropy."""
    import keras

    folder = tmp_path_factory.mktemp("target_models")
    for name, units, loss, activation in [("mse1", 1, "mse", None), ("binary", 1, "binary_crossentropy", "sigmoid"),
                                          ("classes3", 3, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                           None)]:
        keras.utils.set_random_seed(4)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(units, activation=activation)])
        model.compile(optimizer="sgd", loss=loss)
        model.save(folder / f"{name}.keras")
    return folder


def test_a_record_streams_targets_are_checked_before_training_as_arrays_are(cli, tmp_path, one_two_three):
    """Targets that do not fit the loss, in an .npz, a tf.data folder (in memory and streamed) and
    TFRecord files: every form stops before training with the same line (exit 2, nothing
    written). Before, a record stream trained on a (N, 3) target broadcast against 1 unit and on
    binary targets of 2.0, silently. The bad values lie past row 4096, beyond the pass's first
    chunk, so their place is counted across chunks."""
    import tensorflow as tf

    rng = np.random.default_rng(4)
    n = 5000
    x = rng.normal(size=(n, 6)).astype(np.float32)
    binary = rng.integers(0, 2, n).astype(np.float32)
    binary[[4500, 4700]] = [2.0, -1.0]
    ids = rng.integers(0, 3, n)
    ids[[4321, 4800]] = [7, 3]
    cases = [
        ("mse1", rng.normal(size=(n, 3)).astype(np.float32), "float32:3",
         "the targets of shape (5000, 3) against a model with 1 output unit(s): mse would broadcast them"),
        ("binary", binary, "float32",
         "binary_crossentropy needs targets in [0, 1], but 2 are outside, the first y[4500] = 2.0"),
        ("classes3", ids, "int64",
         "2 class id(s) outside [0, 3) (the model's last output dimension is 3), the first y[4321] = 7"),
        ("classes3", np.eye(3, dtype=np.int64)[ids % 3], "int64:3",
         "the targets are one-hot rows of 3 (the model's outputs), but sparse_categorical_crossentropy takes class ids"),
    ]
    for k, (model, y, feature, words) in enumerate(cases):
        np.savez(tmp_path / f"t{k}.npz", x=x, y=y)
        tf.data.Dataset.from_tensor_slices((x, y)).save(str(tmp_path / f"t{k}_tfdata"))
        write_tfrecord(tmp_path / f"t{k}.tfrecord", x, y)
        forms = [(f"t{k}.npz", []), (f"t{k}.npz", ["--stream"]), (f"t{k}_tfdata", []), (f"t{k}_tfdata", ["--stream"]),
                 (f"t{k}.tfrecord", ["--features", f"x:float32:6,y:{feature}"])]
        for data, extra in forms:
            csv = tmp_path / f"{data}.csv"
            code, out, err = cli("run", one_two_three / f"{model}.keras", "--data", tmp_path / data, *extra,
                                 "--steps", 2, "--csv", csv, "-q")
            assert code == 2, (data, extra, err)
            one_line_error(err, f"{tmp_path / data}: {words}")
            assert not csv.exists() and not csv.with_name(csv.name + ".partial").exists()


def test_a_class_id_a_loss_of_the_models_own_meets_stops_at_its_step(cli, tmp_path):
    """A SavedModel's own loss(inputs, targets) is not a loss gradwatch knows by name, so its
    targets are not checked before training: the class id 7 of row 20 (step 3 of batches of 8
    in file order) against 3 classes stops the run there with the words of the check before
    training, not "unexpected ... please report it"; steps 1 and 2 are kept."""
    import tensorflow as tf

    class Classes(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.random.stateless_normal([6, 3], seed=[4, 4]), name="w")

        @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32)])
        def __call__(self, x):
            return tf.matmul(x, self.w)

        @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32), tf.TensorSpec([None], tf.int64)])
        def loss(self, x, y):
            return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=self(x)))

    tf.saved_model.save(Classes(), str(tmp_path / "own_loss"))
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(64, 6)).astype(np.float32), rng.integers(0, 3, size=64)
    y[20] = 7
    tf.data.Dataset.from_tensor_slices((x, y)).save(str(tmp_path / "labels"))
    csv = tmp_path / "run.csv"
    code, out, err = cli("run", tmp_path / "own_loss", "--data", tmp_path / "labels", "--stream",
                         "--no-shuffle", "--batch-size", 8, "--steps", 6, "--fetch-every", 1, "--csv", csv, "-q")
    assert code == 2, err
    assert ("the data of step 3 holds the class id 7, outside [0, 3) (the model's last output dimension is 3); "
            "fix the labels or the model's number of outputs") in err
    assert "unexpected" not in err and "please report" not in err
    kept = read_csv(csv.with_name("run.csv.partial"))
    assert kept["step"].tolist() == [1, 2]


def test_data_cut_short_under_a_running_stream_is_a_data_error_and_keeps_the_rows(tmp_path, module_model):
    """An .npz read where it lies, and a TFRecord file, cut to half while the run reads them (a
    user rewriting the data): exit 2 with one line that names the file and says what happened,
    the rows before it in the .partial (before: "unexpected UnknownError ... please report it")."""
    import tensorflow as tf

    rng = np.random.default_rng(6)
    x = rng.normal(size=(8000, 4)).astype(np.float32)
    y = x[:, :1] * 2.0
    np.savez(tmp_path / "big.npz", x=x, y=y)
    with tf.io.TFRecordWriter(str(tmp_path / "big.tfrecord")) as writer:
        for a, b in zip(x, y):
            writer.write(tf.train.Example(features=tf.train.Features(feature={
                "x": tf.train.Feature(float_list=tf.train.FloatList(value=a)),
                "y": tf.train.Feature(float_list=tf.train.FloatList(value=b))})).SerializeToString())
    cases = [("big.npz", ["--stream"], "big.npz: unexpected end of file reading"),
             ("big.tfrecord", ["--features", "x:float32:4,y:float32:1"], "truncated record at")]
    for name, extra, words in cases:
        target = tmp_path / f"{name}.csv"
        data = tmp_path / name

        def cut(proc):
            wait_for_rows(target.with_name(target.name + ".partial"), proc)
            with open(data, "r+b") as handle:
                handle.truncate(data.stat().st_size // 2 + 30)  # inside a record's data (all are 60 bytes)
            proc.wait(timeout=60)  # it stops by itself; the signal after it goes nowhere

        code, err = interrupt_gradwatch(["run", module_model, "--data", data, *extra, "--loss", "mse", "--csv", target,
                                         "--steps", 10**7, "-q", "--fetch-every", 1], cut)
        assert code == 2, err
        lines = [line for line in err.strip().splitlines() if line.startswith("gradwatch: error: ")]
        assert len(lines) == 1 and "could not be read" in lines[0] and words in lines[0], err
        assert "unexpected" not in lines[0].split("could not be read")[0] and "please report" not in err
        kept = read_csv(target.with_name(target.name + ".partial"))
        assert len(kept) >= 2 and kept["step"].tolist() == list(range(1, len(kept) + 1))


def test_a_folder_removed_under_a_running_csv_says_so(tmp_path, module_model, regression_npz):
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "run.csv"

    def remove_folder(proc):
        wait_for_rows(target.with_name("run.csv.partial"), proc)
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()

    code, err = interrupt_gradwatch(["run", module_model, "--data", regression_npz, "--loss", "mse", "--csv", target,
                                     "--steps", 100000, "-q", "--fetch-every", 1], remove_folder)
    assert code == 74, err
    assert "was removed while the run wrote into it" in err and ".partial" not in err.split("error:")[-1]


@pytest.fixture(scope="module")
def lstm_lm(tmp_path_factory):
    """A word LSTM as a tf.Module SavedModel with dynamic batch and time: XLA cannot compile its gradient."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)

    class LM(tf.Module):
        def __init__(self):
            super().__init__()
            self.emb = tf.Variable(tf.random.stateless_normal([50, 8], seed=[1, 1]) * 0.1)
            self.lstm = keras.layers.LSTM(8, return_sequences=True)
            self.lstm.build((None, None, 8))
            self.out = tf.Variable(tf.random.stateless_normal([8, 50], seed=[2, 2]) * 0.1)

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
        def __call__(self, ids):
            return tf.einsum("btd,dv->btv", self.lstm(tf.nn.embedding_lookup(self.emb, ids)), self.out)

    folder = tmp_path_factory.mktemp("lstm")
    tf.saved_model.save(LM(), str(folder / "lm"))
    ids = np.random.default_rng(0).integers(0, 50, size=(64, 10)).astype("int32")
    np.savez(folder / "ids.npz", x=ids, y=np.roll(ids, -1, axis=1))
    return folder / "lm", folder / "ids.npz"


def test_xla_that_cannot_compile_is_one_line_when_asked_and_a_note_when_automatic(cli, lstm_lm):
    import gradwatch
    from gradwatch import api

    model, ids = lstm_lm
    args = ["run", model, "--data", ids, "--loss", "sparse_categorical_crossentropy", "--from-logits", "--steps", 3, "-q"]
    code, out, err = cli(*args, "--xla")
    assert code == 2, err
    one_line_error(err, "--xla: XLA cannot compile this model's training step", "BroadcastGradientArgs", "drop --xla")
    # The automatic default, as on a machine with a GPU: falls back, says so once, and trains.
    spec = api.make_spec(str(model), str(ids), loss="sparse_categorical_crossentropy", from_logits=True, steps=3)
    variant = api.clipping_of("none")
    trainer = api.prepare_trainer(spec, [variant])
    trainer.xla = True  # what auto decides where a GPU is visible
    (result,) = api.train(trainer, [variant])
    assert len(result.rows) == 3 and not trainer.xla and len(trainer.notes) == 1
    assert "trained without it" in trainer.notes[0]
    plain = gradwatch.run(str(model), str(ids), loss="sparse_categorical_crossentropy", from_logits=True, steps=3)
    np.testing.assert_allclose([r["loss"] for r in result.rows], plain["loss"], rtol=1e-6)
