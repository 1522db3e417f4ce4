"""What gradwatch promises (README): inputs are never overwritten, failed writes fail loudly,
signals keep rows, bad data is refused before training. Real files, real processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

from conftest import read_csv, tree_digest
from test_cli import one_line_error

MSE = ["--loss", "mse", "--batch-size", "4", "-q"]


def test_outputs_never_overwrite_the_data_or_the_model(cli, module_model, keras_file_model, regression_npz, tmp_path):
    data_before = tree_digest(regression_npz)
    models_before = tree_digest(module_model), tree_digest(keras_file_model)
    link = tmp_path / "innocent.csv"
    link.symlink_to(regression_npz)
    cases = [
        ["run", module_model, "--data", regression_npz, *MSE, "--csv", regression_npz],
        ["run", module_model, "--data", regression_npz, *MSE, "--csv", link],
        ["run", module_model, "--data", regression_npz, *MSE, "--csv", module_model / "saved_model.pb"],
        ["run", module_model, "--data", regression_npz, *MSE, "--csv", module_model / "variables" / ".." / "x.csv"],
        ["run", keras_file_model, "--data", regression_npz, *MSE, "--csv", keras_file_model],
        ["compare", module_model, "--data", regression_npz, *MSE, "--summary-csv", regression_npz],
    ]
    for args in cases:
        line = one_line_error(*cli(*args))
        assert "never writes over its inputs" in line, line
    line = one_line_error(*cli("compare", module_model, "--data", regression_npz, *MSE,
                               "--csv", tmp_path / "a.csv", "--summary-csv", tmp_path / "." / "a.csv"))
    assert "--summary-csv and --csv are the same file" in line or "--csv and --summary-csv" in line
    assert tree_digest(regression_npz) == data_before
    assert (tree_digest(module_model), tree_digest(keras_file_model)) == models_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["innocent.csv"]


def test_report_never_draws_over_the_csv_it_reads(cli, tmp_path, module_model, regression_npz):
    csv = tmp_path / "run.png"  # an odd name, but a CSV all the same
    assert cli("run", module_model, "--data", regression_npz, *MSE, "--steps", 3, "--csv", csv)[0] == 0
    before = csv.read_bytes()
    line = one_line_error(*cli("report", csv, "--plot", csv))
    assert "never writes over its inputs" in line
    assert csv.read_bytes() == before


def _gradwatch(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "gradwatch", *map(str, args)], text=True, timeout=180, **kwargs)


def test_a_full_disk_is_an_error_with_exit_74_never_a_silent_success(module_model, regression_npz):
    run = ["run", module_model, "--data", regression_npz, *MSE, "--steps", 5]
    done = _gradwatch(*run, "--csv", "/dev/full", capture_output=True)
    assert done.returncode == 74, done.stderr
    assert done.stderr.strip() == "gradwatch: error: cannot write /dev/full: No space left on device"
    with open("/dev/full", "w") as full:
        done = _gradwatch(*run, "--format", "csv", stdout=full, stderr=subprocess.PIPE)
    assert done.returncode == 74, done.stderr
    assert "cannot write to standard output: No space left on device" in done.stderr
    assert done.stderr.count("\n") == 1
    done = _gradwatch(*run, "--findings", "/dev/full", capture_output=True)  # written, not replaced by a file
    assert done.returncode == 74 and done.stderr.strip().endswith("cannot write /dev/full: No space left on device")
    assert os.path.exists("/dev/full") and not os.path.isfile("/dev/full")


def test_a_closed_pipe_ends_quietly(module_model, regression_npz):
    """`gradwatch run ... --format csv | head -3` once head has gone: no error storm, the exit
    status of a SIGPIPE. (The reader is closed before gradwatch writes, so the test does not
    depend on how much a pipe buffers.)"""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = _gradwatch("run", module_model, "--data", regression_npz, *MSE, "--steps", 30, "--format", "csv",
                          stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert done.stderr == ""


def test_sigkill_loses_at_most_one_block_and_report_reads_what_is_left(cli, module_model, regression_npz, tmp_path):
    csv = tmp_path / "steps.csv"
    partial = tmp_path / "steps.csv.partial"
    proc = subprocess.Popen([sys.executable, "-m", "gradwatch", "run", str(module_model), "--data", str(regression_npz),
                             *MSE, "--steps", "10000000", "--csv", str(csv)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (partial.exists() and partial.read_text().count("\n") > 50):
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not csv.exists()
    code, out, err = cli("report", partial)
    assert code == 0, err
    assert "did not finish" in out and "did not finish" in err
    rows = read_csv(partial)
    assert len(rows) > 50
    # The next run into the same --csv must not destroy those rows.
    line = one_line_error(*cli("run", module_model, "--data", regression_npz, *MSE, "--steps", 3, "--csv", csv))
    assert "did not finish" in line and "gradwatch report" in line
    assert len(read_csv(partial)) >= len(rows)


def test_nonfinite_input_data_is_refused_with_where(cli, module_model, data_dir, tmp_path):
    x = np.ones((16, 4), np.float32)
    x[5, 2] = np.nan
    x[9, 0] = np.inf
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=np.ones((16, 1), np.float32))
    line = one_line_error(*cli("run", module_model, "--data", path, *MSE))
    assert "x has 2 non-finite values (NaN or inf) in 2 rows, the first at x[5, 2]" in line
    assert "--allow-nonfinite-data" in line
    frame = "a,b,c,d,label\n" + "1,2,3,4,1\n" * 3 + "1,2,,4,1\n" + "1,2,3,4,inf\n"
    (tmp_path / "bad.csv").write_text(frame)
    line = one_line_error(*cli("run", module_model, "--data", tmp_path / "bad.csv", *MSE))
    assert "the first at line 5, column 'c'" in line
    assert "(NaN, inf, an empty cell or a line cut short)" in line
    (tmp_path / "short.csv").write_text("a,b,c,d,label\n" + "1,2,3,4,1\n" * 3 + "1,2\n")  # a line cut short
    line = one_line_error(*cli("run", module_model, "--data", tmp_path / "short.csv", *MSE))
    assert "the first at line 5, column 'c'" in line and "a line cut short" in line


def test_allowed_nonfinite_data_is_blamed_on_the_data(cli, module_model, tmp_path):
    x = np.ones((16, 4), np.float32)
    x[5, 2] = np.nan  # batch 2 of 4, without shuffling
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=np.ones((16, 1), np.float32))
    csv = tmp_path / "steps.csv"
    code, out, err = cli("run", module_model, "--data", path, *MSE, "--no-shuffle", "--allow-nonfinite-data", "--csv", csv)
    assert code == 0, err
    rows = read_csv(csv)
    assert list(rows["nonfinite"]) == [False, True, False, False]
    assert list(rows["nonfinite_input"]) == [False, True, False, False]
    assert "jumping" not in out
    assert "the data, not the training, produced it" in " ".join(out.split())
    code, report_out, _ = cli("report", csv)
    assert "the data, not the training, produced it" in " ".join(report_out.split())


def test_targets_outside_the_loss_domain_are_refused(cli, keras_saved_model, module_model, tmp_path):
    x = np.ones((8, 4), np.float32)
    for y, expected in [(np.array([0, 1, 2, 5, 0, 1, 2, 0]), "outside [0, 3) (the model's last output dimension is 3)"),
                        (np.array([0, 1, -1, 2, 0, 1, 2, 0]), "outside [0, 3)"),
                        (np.array([0, 1, 1.5, 2, 0, 1, 2, 0]), "whole-number class ids")]:
        path = tmp_path / "classes.npz"
        np.savez(path, x=x, y=y)
        line = one_line_error(*cli("run", keras_saved_model, "--data", path, "--loss", "sparse_categorical_crossentropy",
                                   "--from-logits", "--batch-size", 4, "-q"))
        assert expected in line, line
    path = tmp_path / "binary.npz"
    np.savez(path, x=x, y=np.full((8, 1), 2.0))
    line = one_line_error(*cli("run", module_model, "--data", path, "--loss", "binary_crossentropy", "--batch-size", 4))
    assert "needs targets in [0, 1]" in line


def test_a_write_error_keeps_rows_and_names_the_partial_file(module_model, regression_npz, tmp_path):
    """A file-size limit (EFBIG) stands in for a disk that fills up in the middle of a run."""
    csv = tmp_path / "steps.csv"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "from gradwatch.cli import main\n"
        f"sys.exit(main(['run', {str(module_model)!r}, '--data', {str(regression_npz)!r}, '--loss', 'mse',"
        f" '--batch-size', '4', '--steps', '2000', '--fetch-every', '10', '-q', '--csv', {str(csv)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "GRADWATCH_CACHE": str(tmp_path)})
    assert done.returncode == 74, done.stderr
    assert "File too large" in done.stderr and "steps.csv.partial" in done.stderr
    assert "Traceback" not in done.stderr
    rows = read_csv(tmp_path / "steps.csv.partial")
    assert len(rows) >= 10 and list(rows["step"][:10]) == list(range(1, 11))
