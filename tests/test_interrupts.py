"""Issue 22, part 1: a process that keeps its rows also exits. Twenty real processes, `run` and
`compare`, in-memory and streamed data, each stopped at a random moment (while loading or while
training) by SIGINT, SIGTERM or SIGHUP, must each exit with 128 + the signal within 5 s of it,
with every row it says it kept in its CSV. Two at a time, to keep the suite's length."""

from __future__ import annotations

import csv
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import heed_stop_signals

RUNS = 20
SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


@pytest.fixture(scope="module")
def cases(module_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("interrupts")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 4)).astype("float32")
    np.savez(folder / "data.npz", x=x, y=(x @ np.ones((4, 1), "float32")))  # uncompressed: --stream reads rows
    rng = np.random.default_rng(22)
    out = []
    for k in range(RUNS):
        command = ["run"] if k % 2 == 0 else ["compare", "--thresholds", "none,1"]
        stream = ["--stream"] if k % 4 in (2, 3) else ["--no-stream"]
        out.append({
            "args": [*command, module_model, "--data", folder / "data.npz", "--loss", "mse", "--batch-size", 8,
                     "--steps", 200000, *stream, "--csv", folder / f"rows{k}.csv", "-q"],
            "csv": folder / f"rows{k}.csv",
            "sig": SIGNALS[k % 3],
            # one in four while TensorFlow loads (the first 3 s); the others at a random moment of
            # the first 3 s of training (after the first recorded rows reach the CSV)
            "loading": k % 4 == 1,
            "delay": float(rng.uniform(0.3, 3.0)),
        })
    return out


def _one(case):
    proc = subprocess.Popen([sys.executable, "-m", "gradwatch", *map(str, case["args"])], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=heed_stop_signals)
    try:
        if not case["loading"]:
            partial = case["csv"].with_name(case["csv"].name + ".partial")
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and proc.poll() is None:
                if partial.exists() and partial.read_bytes().count(b"\n") >= 2:
                    break
                time.sleep(0.05)
        time.sleep(case["delay"])
        sent = time.monotonic()
        proc.send_signal(case["sig"])
        try:
            err = proc.communicate(timeout=5)[1]
        except subprocess.TimeoutExpired:
            return {"hung": True, "case": case}
        return {"hung": False, "code": proc.returncode, "err": err, "after": time.monotonic() - sent, "case": case}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_twenty_interrupted_processes_each_exit_within_5_s_with_their_rows(cases):
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_one, cases))
    hung = [(r["case"]["args"][0], r["case"]["sig"], r["case"]["delay"]) for r in results if r["hung"]]
    assert not hung, f"still running 5 s after the signal: {hung}"
    training = 0
    for r in results:
        case = r["case"]
        assert r["code"] == 128 + case["sig"], (r["code"], r["err"])
        kept = re.search(r"kept (\d+) recorded rows?", r["err"])
        if kept is None:  # stopped while starting or loading: said so, and wrote nothing
            assert re.search(r"while (starting|loading).*; no step was recorded and no output was written", r["err"]), r["err"]
            assert not case["csv"].exists()
            continue
        training += 1
        with case["csv"].open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == int(kept.group(1)) > 0
    assert training >= RUNS - RUNS // 4 - 1  # nearly all were stopped mid-training, where the hang was


API_SCRIPT = """
import sys, time
import numpy as np
import gradwatch
x = np.random.default_rng(0).normal(size=(512, 4)).astype("float32")
y = x @ np.ones((4, 1), "float32")
started = time.monotonic()
gradwatch.run(sys.argv[1], (x, y), loss="mse", steps=3, batch_size=8)
print("ready", time.monotonic() - started, flush=True)  # how long loading and tracing take on this machine
try:
    gradwatch.run(sys.argv[1], (x, y), loss="mse", steps=2_000_000, batch_size=8)
except KeyboardInterrupt as stop:  # what a notebook cell gets back: Ctrl-C as Python raises it, with the rows
    assert isinstance(stop, gradwatch.Interrupted) and stop.signum == 2
    n = len(stop.rows)
    assert str(stop) == f"interrupted by Ctrl-C after {n} recorded step{'s' * (n != 1)}; they are in this exception's .rows"
    assert stop.rows["step"].tolist() == list(range(1, len(stop.rows) + 1)) and stop.rows["loss"].notna().all()
    print("stopped", type(stop).__name__, len(stop.rows), flush=True)
rows = gradwatch.run(sys.argv[1], (x, y), loss="mse", steps=3, batch_size=8)
print("again", len(rows), flush=True)
"""

WATCH_SCRIPT = """
import sys
import time
import numpy as np
import keras
from gradwatch.keras import GradientWatch
x = np.random.default_rng(0).normal(size=(512, 4)).astype("float32")
y = x @ np.ones((4, 1), "float32")
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
watch = GradientWatch(clip="global", norm=1.0)
model.compile(optimizer=watch.wrap(keras.optimizers.SGD(0.01)), loss="mse")
started = time.monotonic()
model.fit(x[:8], y[:8], batch_size=8, epochs=1, callbacks=[watch], verbose=0)
print("ready", time.monotonic() - started, len(watch.rows), flush=True)  # tracing time here, rows so far
watch.csv = sys.argv[2]
try:
    model.fit(x, y, batch_size=8, epochs=100000, callbacks=[watch], validation_data=(x[:64], y[:64]), verbose=0)
except KeyboardInterrupt:
    print("stopped", len(watch.rows), flush=True)
"""


def _signal_script(text: str, module_model, kept, sig):
    """Run a Python script (it prints "ready SECONDS [ROWS]" once warm), send ``sig`` while it
    trains, and return (exit status, stdout, stderr, the ready line's words, when it was sent)."""
    path = kept.with_name("script.py")
    path.write_text(text)
    proc = subprocess.Popen([sys.executable, str(path), str(module_model), str(kept)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=heed_stop_signals)
    try:
        ready = proc.stdout.readline().split()
        assert ready[0] == "ready"
        time.sleep(2 + 2 * float(ready[1]))  # loading and tracing again, then training (scaled to this machine)
        proc.send_signal(sig)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err, ready, sent


@pytest.mark.parametrize("script", ["api", "watch"])
def test_ctrl_c_in_the_python_api_and_in_fit_returns_control(script, module_model, tmp_path):
    kept = tmp_path / "fit_steps.csv"
    code, out, err, ready, sent = _signal_script(API_SCRIPT if script == "api" else WATCH_SCRIPT, module_model, kept,
                                                 signal.SIGINT)
    assert code == 0, err
    stopped = next(line for line in out.splitlines() if line.startswith("stopped"))
    before = int(ready[2]) if len(ready) > 2 else 0  # the watch's rows of the warm-up fit
    assert int(stopped.split()[-1]) > before  # the rows recorded before the Ctrl-C came back
    if script == "api":
        assert stopped.split()[1] == "Interrupted" and "again 3" in out  # and the session goes on
    else:  # the fit's rows are in its CSV, put in place
        with open(kept, newline="") as handle:
            assert len(list(csv.DictReader(handle))) == int(stopped.split()[-1]) - before
    assert time.monotonic() - sent < 25


def test_sigterm_inside_a_watched_fit_keeps_the_csv_then_ends_the_process_as_sigterm_does(tmp_path, module_model):
    """A scheduler's SIGTERM during fit: the rows so far are put in place as the CSV and a line says
    so, then the process ends as SIGTERM ends it (status -15), as it would have without the watch."""
    kept = tmp_path / "fit_steps.csv"
    code, out, err, _, _ = _signal_script(WATCH_SCRIPT, module_model, kept, signal.SIGTERM)
    assert code == -signal.SIGTERM, err
    said = re.search(r"gradwatch: fit stopped by SIGTERM; kept (\d+) recorded rows? in (\S+)", err)
    assert said and said.group(2) == str(kept), err
    with open(kept, newline="") as handle:
        assert len(list(csv.DictReader(handle))) == int(said.group(1)) > 0
    assert "stopped" not in out  # fit did not return: the process ended


def test_a_ctrl_c_inside_a_watched_loop_is_noted_and_raised_at_its_safe_point():
    """GradientWatch's Ctrl-C inside fit (gradwatch.signals.PendingInterrupt): noted, then raised
    by the loop's own hook after what was recorded is kept; a second Ctrl-C, or one once the loop
    is no longer running, raises at once; a handler someone else set is left alone."""
    from gradwatch.signals import PendingInterrupt

    started_with = signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python starts in a terminal
    try:
        _pending_interrupt_cases(PendingInterrupt)
    finally:
        signal.signal(signal.SIGINT, started_with)


def _pending_interrupt_cases(PendingInterrupt):
    running = [True]
    pending = PendingInterrupt(lambda frame: running[0])
    pending.install()
    signal.raise_signal(signal.SIGINT)  # noted, not raised here
    kept = []
    with pytest.raises(KeyboardInterrupt):
        pending.raise_if_pending(kept.append)
    assert kept == [signal.SIGINT] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    pending.raise_if_pending()  # nothing pending: nothing raised

    pending.install()
    signal.raise_signal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)  # a second Ctrl-C before the safe point: at once
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    pending.install()
    running[0] = False  # the loop ended by an error and never uninstalled it
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def theirs(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, theirs)
    other = PendingInterrupt(lambda frame: True)
    try:
        other.install()
        assert signal.getsignal(signal.SIGINT) is theirs
    finally:
        other.uninstall()
        signal.signal(signal.SIGINT, previous)

    # SIGTERM and SIGHUP are watched over their default action only, and put back as they were
    for sig in (signal.SIGTERM, signal.SIGHUP):
        before = signal.signal(sig, signal.SIG_DFL)
        try:
            pending = PendingInterrupt(lambda frame: True)
            pending.install()
            assert signal.getsignal(sig) == pending._handler
            pending.uninstall()
            assert signal.getsignal(sig) is signal.SIG_DFL
            signal.signal(sig, theirs)
            pending.install()
            assert signal.getsignal(sig) is theirs
        finally:
            pending.uninstall()
            signal.signal(sig, before)


def test_a_signal_the_process_was_started_ignoring_stays_ignored():
    """nohup ignores SIGHUP, a shell's background job SIGINT: the CLI's handlers, a training
    block's and GradientWatch's leave such a signal ignored; SIGTERM is still heeded."""
    from gradwatch.signals import PendingInterrupt, deferred_interrupt, stop_signals_unwind

    started_with = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGHUP)}
    try:
        with stop_signals_unwind():
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
            with deferred_interrupt() as interrupted:
                assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
                assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
                signal.raise_signal(signal.SIGHUP)
                signal.raise_signal(signal.SIGINT)
                assert interrupted() == 0
                signal.raise_signal(signal.SIGTERM)
                assert interrupted() == signal.SIGTERM
        pending = PendingInterrupt(lambda frame: True)
        pending.install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        pending.uninstall()
    finally:
        for sig, handler in started_with.items():
            signal.signal(sig, handler)


def _as_under_nohup_in_the_background():
    heed_stop_signals()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_a_run_under_nohup_outlives_its_terminal_and_still_stops_on_sigterm(module_model, regression_npz, tmp_path):
    out = tmp_path / "rows.csv"
    partial = out.with_name(out.name + ".partial")
    proc = subprocess.Popen([sys.executable, "-m", "gradwatch", "run", str(module_model), "--data", str(regression_npz),
                             "--loss", "mse", "--batch-size", "8", "--steps", "200000", "--csv", str(out), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_under_nohup_in_the_background)
    try:
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            if partial.exists() and partial.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGHUP)  # the terminal closes
        proc.send_signal(signal.SIGINT)  # a Ctrl-C meant for the foreground job
        time.sleep(3)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    kept = int(re.search(r"interrupted by SIGTERM; kept (\d+) recorded rows?", err).group(1))
    with out.open(newline="") as handle:
        assert len(list(csv.DictReader(handle))) == kept > 0
