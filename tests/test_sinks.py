"""CsvSink and the output-path guard: rows are never lost, inputs never overwritten."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradwatch.errors import GradwatchError, OutputError
from gradwatch.record.rows import COLUMNS, read_rows
from gradwatch.record.sinks import CsvSink, check_outputs

from test_records import make_rows


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_commit_replaces_the_old_file_discard_without_rows_leaves_it(tmp_path):
    target = tmp_path / "steps.csv"
    target.write_text("good old file\n")
    sink = CsvSink(target, COLUMNS)
    sink.discard()  # an error before any row: nothing is left behind
    assert target.read_text() == "good old file\n"
    assert list(tmp_path.iterdir()) == [target]
    sink = CsvSink(target, COLUMNS)
    sink.write(make_rows([1.0], [1.0]))
    assert target.read_text() == "good old file\n"  # nothing touched while running
    sink.write(make_rows([1.0, 2.0], [1.0, 1.0]))
    sink.commit()
    assert len(read_rows(target)) == 3
    assert list(tmp_path.iterdir()) == [target]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_current_umask()


def test_rows_reach_the_partial_file_as_they_are_written_and_survive_an_error(tmp_path):
    target = tmp_path / "steps.csv"
    target.write_text("good old file\n")
    sink = CsvSink(target, COLUMNS)
    sink.write(make_rows([1.0, 2.0], [1.0, 1.0]))
    partial = tmp_path / "steps.csv.partial"
    assert len(read_rows(partial)) == 2  # on disk already: a SIGKILL now loses nothing written
    sink.discard()
    assert sink.kept == partial and len(read_rows(partial)) == 2
    assert target.read_text() == "good old file\n"


def test_an_unfinished_partial_file_is_never_overwritten(tmp_path):
    target = tmp_path / "steps.csv"
    sink = CsvSink(target, COLUMNS)
    sink.write(make_rows([1.0], [1.0]))
    sink._file.close()  # then the process is killed: its lock goes with it, the .partial stays
    with pytest.raises(GradwatchError, match="did not finish.*gradwatch report"):
        CsvSink(target, COLUMNS)
    assert len(read_rows(tmp_path / "steps.csv.partial")) == 1
    (tmp_path / "steps.csv.partial").write_text(",".join(COLUMNS) + "\n")  # header only: nothing to lose
    CsvSink(target, COLUMNS).commit()
    assert target.exists() and not (tmp_path / "steps.csv.partial").exists()


def test_sink_refuses_missing_folder(tmp_path):
    with pytest.raises(GradwatchError, match="does not exist"):
        CsvSink(tmp_path / "nope" / "steps.csv", COLUMNS)


def test_a_full_device_is_an_output_error_naming_the_path():
    with pytest.raises(OutputError, match="/dev/full: No space left on device") as info:
        sink = CsvSink("/dev/full", COLUMNS)  # not a regular file: written directly, never replaced
        sink.write(make_rows([1.0] * 500, [1.0] * 500))
        sink.commit()
    assert info.value.exit_code == 74
    assert os.path.exists("/dev/full") and not os.path.isfile("/dev/full")


def test_a_write_failing_mid_run_keeps_the_rows_written_before(tmp_path):
    """A file-size limit (EFBIG) stands in for a disk filling up during the run."""
    code = (
        "import resource, signal, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "from gradwatch.record.sinks import CsvSink\n"
        "from gradwatch.record.rows import COLUMNS\n"
        "from gradwatch.errors import OutputError\n"
        "from test_records import make_rows\n"
        f"sink = CsvSink({str(tmp_path / 'steps.csv')!r}, COLUMNS)\n"
        "sink.write(make_rows([1.0] * 10, [1.0] * 10))\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        "    for _ in range(100):\n"
        "        sink.write(make_rows([2.0] * 10, [1.0] * 10))\n"
        "except OutputError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(exc.exit_code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 74, done.stderr
    assert "File too large" in done.stdout and "steps.csv.partial" in done.stdout
    rows = read_rows(tmp_path / "steps.csv.partial")  # every whole row written before the failure
    assert len(rows) >= 10 and [r["step"] for r in rows[:10]] == list(range(1, 11))
    assert not (tmp_path / "steps.csv").exists()


def test_outputs_that_are_inputs_are_refused(tmp_path):
    data = tmp_path / "data.npz"
    data.write_bytes(b"x")
    model = tmp_path / "model"
    (model / "variables").mkdir(parents=True)
    (model / "saved_model.pb").write_bytes(b"x")
    (tmp_path / "link.csv").symlink_to(data)
    os.link(data, tmp_path / "hard.csv")
    inputs = {"data file": data, "model folder": model}
    refused = {
        "is the data file": data,
        "is inside the model folder": model / "saved_model.pb",
        "is the model folder": model,
        "inside the model folder": model / "variables" / "steps.csv",
    }
    for expected, path in refused.items():
        with pytest.raises(GradwatchError, match=expected):
            check_outputs({"--csv": path}, inputs)
    for path in [tmp_path / "link.csv", tmp_path / "hard.csv", tmp_path / "model" / ".." / "data.npz"]:
        with pytest.raises(GradwatchError, match="never writes over its inputs"):
            check_outputs({"--csv": path}, inputs)
    with pytest.raises(GradwatchError, match="--csv and --summary-csv are the same file"):
        check_outputs({"--summary-csv": tmp_path / "a.csv", "--csv": tmp_path / "x" / ".." / "a.csv"}, inputs)
    check_outputs({"--csv": tmp_path / "steps.csv", "--summary-csv": tmp_path / "summary.csv"}, inputs)


def test_a_whole_file_replaces_an_old_one_only_when_complete(tmp_path):
    """write_whole (findings, plots): a write that fails leaves the old file as it was and no
    temporary beside it; one that succeeds replaces it; a device is written, never replaced."""
    from gradwatch.record.sinks import write_whole

    target = tmp_path / "findings.json"
    target.write_text("old\n")

    def failing(path):
        path.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="findings.json: No space left on device") as info:
        write_whole(target, failing)
    assert info.value.exit_code == 74
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["findings.json"]
    write_whole(target, lambda path: path.write_text("new\n"))
    assert target.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["findings.json"]
    with pytest.raises(OutputError, match="/dev/full: No space left on device"):
        write_whole(Path("/dev/full"), lambda path: path.write_text("x" * 10000))
    assert os.path.exists("/dev/full") and not os.path.isfile("/dev/full")


def test_every_output_file_path_is_checked_the_same_way(tmp_path):
    from gradwatch.record.sinks import check_file_target

    (tmp_path / "afile").write_text("")
    for path, expected in [(tmp_path, "is a folder; give a file name such as"),
                           (tmp_path / "afile" / "x.json", "afile is a file, not a folder"),
                           (tmp_path / "nope" / "x.json", "folder " + str(tmp_path / "nope") + " does not exist")]:
        with pytest.raises(GradwatchError, match=expected.replace(".", r"\.")):
            check_file_target("--findings", path, "findings.json")
