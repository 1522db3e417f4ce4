"""The CLI's contract: one-line errors with exit 2, fast help, python -m, and Ctrl-C keeping rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import interrupt_gradwatch, read_csv, tree_digest


def one_line_error(code, out, err):
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gradwatch: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_bad_inputs_give_one_line_and_exit_2(cli, module_model, regression_npz, tmp_path):
    m, d = str(module_model), str(regression_npz)
    (tmp_path / "plain").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    cases = {
        "no such model": ["run", tmp_path / "missing", "--data", d, "--loss", "mse"],
        "not a SavedModel": ["run", tmp_path / "plain", "--data", d, "--loss", "mse"],
        "not a .keras model": ["run", tmp_path / "notes.txt", "--data", d, "--loss", "mse"],
        "no such data": ["run", m, "--data", tmp_path / "nope.npz", "--loss", "mse"],
        "needs a threshold": ["run", m, "--data", d, "--loss", "mse", "--clip", "global"],
        "must be a finite number > 0": ["run", m, "--data", d, "--loss", "mse", "--clip", "norm", "--norm", "-1"],
        "Received: norm=nan": ["run", m, "--data", d, "--loss", "mse", "--clip", "global", "--norm", "nan"],
        "unknown clipping strategy": ["run", m, "--data", d, "--loss", "mse", "--clip", "percentile"],
        "unknown loss": ["run", m, "--data", d, "--loss", "hinge2"],
        "brings no loss": ["run", m, "--data", d],
        "--from-logits applies": ["run", m, "--data", d, "--loss", "mse", "--from-logits"],
        "unknown optimizer": ["run", m, "--data", d, "--loss", "mse", "--optimizer", "bogus"],
        "learning rate must be a number > 0": ["run", m, "--data", d, "--loss", "mse", "--lr", "0"],
        "Received: lr=1e+39": ["run", m, "--data", d, "--loss", "mse", "--lr", "1e39"],  # inf in float32
        "Received: lr=1e-46": ["run", m, "--data", d, "--loss", "mse", "--opt", "learning_rate=1e-46"],  # 0 in float32
        "`--num-steps` must be >= 1": ["run", m, "--data", d, "--loss", "mse", "--num-steps", "0"],
        "`--batch-size` must be >= 1": ["run", "--sample", "ptb-test", "--batch-size", "0"],  # before the corpus is cut
        "`--cpu-devices` must be between 1 and 16": ["run", m, "--data", d, "--loss", "mse", "--cpu-devices", "100000"],
        "fewer than one batch": ["run", m, "--data", d, "--loss", "mse", "--batch-size", "1000"],
        "not both": ["run", m, "--data", d, "--loss", "mse", "--steps", "2", "--epochs", "1"],
        "--data needs a MODEL": ["run", "--data", d],
        "No such option": ["run", "--bogus"],
        "no endpoint 'predict'": ["run", m, "--data", d, "--loss", "mse", "--endpoint", "predict"],
        "folder": ["run", m, "--data", d, "--loss", "mse", "--csv", tmp_path],
        "--findings . is a folder": ["run", m, "--data", d, "--loss", "mse", "--findings", "."],
        "the argument after --findings is empty": ["run", m, "--data", d, "--loss", "mse", "--findings", ""],
        "notes.txt is a file, not a folder": ["run", m, "--data", d, "--loss", "mse", "--plot", tmp_path / "notes.txt" / "p.png"],
        "is not a number": ["compare", m, "--data", d, "--loss", "mse", "--thresholds", "1,abc"],
        "--thresholds '1,,5' has an empty item": ["compare", m, "--data", d, "--loss", "mse", "--thresholds", "1,,5"],
        "--clip 'global,' has an empty item": ["compare", m, "--data", d, "--loss", "mse", "--clip", "global,"],
        "the argument after --thresholds is empty": ["compare", m, "--data", d, "--loss", "mse", "--thresholds", ""],
        "the argument after --clip is only spaces": ["compare", m, "--data", d, "--loss", "mse", "--clip", " "],
        "unknown sample": ["run", "--sample", "nope"],
    }
    for expected, args in cases.items():
        line = one_line_error(*cli(*args))
        assert expected in line, (expected, line)


def test_no_arguments_prints_the_help_readably(cli):
    code, out, err = cli()
    assert code == 2 and err == ""
    assert out.startswith("Usage: gradwatch") and "run" in out and len(out.splitlines()) > 8


def test_errors_whose_fix_is_specific(cli, tmp_path):
    import keras

    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Lambda(lambda t: t * 2)(inputs))).save(tmp_path / "lambda.keras")
    keras.Model(inputs, [keras.layers.Dense(1)(inputs), keras.layers.Dense(2)(inputs)]).save(tmp_path / "two.keras")
    np.savez(tmp_path / "d.npz", x=np.ones((16, 4), np.float32), y=np.ones((16, 1), np.float32))
    line = one_line_error(*cli("run", tmp_path / "lambda.keras", "--data", tmp_path / "d.npz", "--loss", "mse"))
    assert "Lambda layer" in line and "safe_mode" in line and "re-save" not in line
    line = one_line_error(*cli("run", tmp_path / "two.keras", "--data", tmp_path / "d.npz", "--loss", "mse"))
    assert "the model has 2 outputs" in line and "holds one target; give an .npz with one array per output" in line
    line = one_line_error(*cli("run", "--num-steps", 30, "--steps", 2))
    assert "pass --num-steps 20" in line


def test_shape_mismatch_names_both_shapes(cli, module_model, tmp_path):
    path = tmp_path / "wide.npz"
    np.savez(path, x=np.ones((8, 5), np.float32), y=np.ones((8, 1), np.float32))
    line = one_line_error(*cli("run", module_model, "--data", path, "--loss", "mse", "--batch-size", 4))
    assert "(None, 5)" in line and "(None, 4)" in line


def test_integer_model_rejects_float_ids(cli, keras_file_model, tmp_path):
    path = tmp_path / "float_ids.npz"
    np.savez(path, x=np.full((8, 6), 1.5), y=np.ones((8, 1)))
    line = one_line_error(*cli("run", keras_file_model, "--data", path, "--loss", "mse", "--batch-size", 4))
    assert "integer" in line


def test_bad_input_leaves_an_existing_csv_alone(cli, module_model, regression_npz, tmp_path):
    csv = tmp_path / "steps.csv"
    csv.write_text("precious\n")
    code, _, _ = cli("run", module_model, "--data", regression_npz, "--batch-size", 1000, "--loss", "mse", "--csv", csv)
    assert code == 2
    assert csv.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steps.csv"]


def test_help_does_not_import_tensorflow():
    code = (
        "import sys\n"
        "from gradwatch.cli import main\n"
        "for args in (['--help'], ['run', '--help'], ['compare', '--help'], ['samples']):\n"
        "    assert main(args) == 0, args\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "assert 'pandas' not in sys.modules, 'pandas was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--clip" in done.stdout and "ptb-small" in done.stdout


def test_python_dash_m_and_version():
    done = subprocess.run([sys.executable, "-m", "gradwatch", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.startswith("gradwatch ")


@pytest.mark.parametrize("sig, code, name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM"),
                                           (signal.SIGHUP, 129, "SIGHUP")])
def test_ctrl_c_sigterm_and_sighup_keep_recorded_rows(module_model, regression_npz, tmp_path, sig, code, name):
    csv = tmp_path / "steps.csv"
    before = tree_digest(module_model)
    def after_two_seconds_of_training(proc):
        start_line = proc.stderr.readline()  # gradwatch's first stderr line: training starts
        assert start_line.startswith("gradwatch: training"), start_line
        time.sleep(2.0)

    got, out, err = interrupt_gradwatch(["run", module_model, "--data", regression_npz, "--loss", "mse", "--batch-size", 4,
                                         "--steps", 10000000, "--csv", csv], after_two_seconds_of_training, sig, True)
    assert got == code, err
    assert "Traceback" not in err
    assert f"interrupted by {name}; kept" in err
    assert f"(interrupted by {name} after" in out and "loss spikes" in out  # the summary of what was done
    rows = read_csv(csv)
    assert len(rows) > 10
    assert list(rows["step"]) == list(range(1, len(rows) + 1))
    assert [p.name for p in tmp_path.iterdir()] == ["steps.csv"]  # no .partial left behind
    assert tree_digest(module_model) == before


def test_debug_variable_shows_the_traceback(module_model, regression_npz):
    env = {**os.environ, "GRADWATCH_DEBUG": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "gradwatch", "run", str(module_model), "--data", str(regression_npz), "--lr", "-1"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert done.returncode != 0
    assert "Traceback" in done.stderr


def test_installed_entry_point_flushes_everything_before_its_fast_exit(module_model, regression_npz):
    """The `gradwatch` process skips TensorFlow's slow teardown (os._exit): output and codes must survive."""
    base = [sys.executable, "-m", "gradwatch", "run", str(module_model), "--data", str(regression_npz), "-q"]
    done = subprocess.run(base + ["--loss", "mse", "--batch-size", "4", "--steps", "23", "--format", "csv"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("clip,param,step,epoch,loss") and len(lines) == 24
    bad = subprocess.run(base + ["--loss", "mse", "--batch-size", "500"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2  # found after TensorFlow was imported
    assert bad.stderr.strip().count("\n") == 0 and "lower --batch-size" in bad.stderr


CUSTOM_LAYER = '''
import keras


@keras.saving.register_keras_serializable("gwtest")
class Twice(keras.layers.Layer):
    def call(self, x):
        return 2 * x
'''


def test_a_model_with_custom_layers_loads_with_import(cli, tmp_path):
    """A .keras file whose custom layer lives in the user's module: without --import the error
    names the class and the option (not "re-save it"); with --import FILE.py it trains. The
    class is unregistered after saving, so this process knows it no more than a fresh one."""
    import importlib.util

    import keras
    from conftest import read_csv

    (tmp_path / "gwlayers.py").write_text(CUSTOM_LAYER)
    spec = importlib.util.spec_from_file_location("gwlayers_saving", tmp_path / "gwlayers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = keras.Sequential([keras.Input((4,)), module.Twice(), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.save(tmp_path / "custom.keras")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(64, 4)).astype("float32"), y=np.ones((64, 1), np.float32))
    base = ["run", tmp_path / "custom.keras", "--data", tmp_path / "d.npz", "--steps", 2, "-q"]
    keras.saving.get_custom_objects().pop("gwtest>Twice")
    try:
        assert one_line_error(*cli(*base)) == (
            f"gradwatch: error: cannot load {tmp_path / 'custom.keras'}: it uses custom class Twice (registered as "
            "gwtest>Twice), which this process does not know; pass --import MODULE (the module, or its .py file, "
            "that defines it with @keras.saving.register_keras_serializable)")
        (tmp_path / "broken.py").write_text("raise ValueError('boom')\n")
        for module_name, expected in [("gw_no_such_module", "--import gw_no_such_module: No module named"),
                                      (tmp_path / "broken.py", "importing it raised ValueError: boom"),
                                      (tmp_path / "none.py", "no such file")]:
            assert expected in one_line_error(*cli(*base, "--import", module_name))
        code, _, err = cli(*base, "--import", tmp_path / "gwlayers.py", "--csv", tmp_path / "r.csv")
        assert code == 0, err
        assert read_csv(tmp_path / "r.csv")["step"].tolist() == [1, 2]
        # a file named as a module already imported would replace it for this whole process
        import json

        (tmp_path / "json.py").write_text(CUSTOM_LAYER)
        assert one_line_error(*cli(*base, "--import", tmp_path / "json.py")) == (
            f"gradwatch: error: --import {tmp_path / 'json.py'}: Python already has a module named json "
            f"({json.__file__}), which this file would replace; rename the file")
        assert sys.modules["json"] is json
    finally:
        keras.saving.get_custom_objects().pop("gwtest>Twice", None)
