"""Peak memory of a streamed data set of ~1 GB against one of ~100 MB (issue 14).

    python benchmarks/stream_memory.py                # ~1 GB and ~100 MB, .npz and tf.data folder
    python benchmarks/stream_memory.py --big-mb 300   # smaller, quicker

Writes the data sets into a temporary folder (removed afterwards): rows of 256 float32
features and one target; an uncompressed ``.npz`` (``numpy.savez``) and a
``tf.data.Dataset.save`` folder of the same rows. Each is trained on for one whole epoch (so
every row is read) by ``gradwatch run`` in its own process, with ``--stream`` and, for the
contrast, with ``--no-stream`` (read into memory). Peak RSS is the child's ``ru_maxrss`` from
``wait4``; this process never imports TensorFlow.

Goal: streamed, peak RSS of the big set / the small one <= 1.1, and well under the big set's size.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

FEATURES = 256
BATCH = 256


def make(folder: Path, megabytes: int, seed: int) -> dict:
    """``rows.npz`` and ``rows_tfdata/`` of about ``megabytes`` MB, each written in slices by a
    child process: Linux keeps a process's peak RSS across fork and exec, so pages this process
    touched would show up in every gradwatch child's ``ru_maxrss``."""
    rows = megabytes * 2**20 // ((FEATURES + 1) * 4)
    npz = folder / f"rows{megabytes}.npz"
    tfdata = folder / f"rows{megabytes}_tfdata"
    subprocess.run([sys.executable, __file__, "--write", str(npz), str(tfdata), str(rows), str(seed)], check=True,
                   stderr=subprocess.DEVNULL)
    size = sum(f.stat().st_size for f in tfdata.rglob("*") if f.is_file())
    return {"rows": rows, "npz": npz, "npz_mb": npz.stat().st_size / 2**20, "tfdata": tfdata, "tfdata_mb": size / 2**20}


def write(npz: Path, tfdata: Path, rows: int, seed: int) -> None:
    """(In a child process.) The .npz through memory-mapped members zipped stored, as numpy.savez
    would write them, then the tf.data folder from the .npz, 4096 rows at a time."""
    w = np.random.default_rng(seed).normal(size=(FEATURES, 1)).astype(np.float32) / np.sqrt(FEATURES)
    with zipfile.ZipFile(npz, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, shape in (("x", (rows, FEATURES)), ("y", (rows, 1))):
            path = npz.parent / f"{name}.npy"
            array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
            for start in range(0, rows, 65536):
                stop = min(start + 65536, rows)
                x = np.random.default_rng([seed, start]).normal(size=(stop - start, FEATURES)).astype(np.float32)
                array[start:stop] = x if name == "x" else x @ w
            array.flush()
            del array
            archive.write(path, f"{name}.npy")
            path.unlink()
    import tensorflow as tf

    from gradwatch.load.streams import npz_members

    members = npz_members(npz, ["x", "y"])

    def chunks():
        for start in range(0, rows, 4096):
            r = np.arange(start, min(start + 4096, rows))
            yield members["x"].read(r), members["y"].read(r)

    spec = (tf.TensorSpec((None, FEATURES), tf.float32), tf.TensorSpec((None, 1), tf.float32))
    tf.data.Dataset.from_generator(chunks, output_signature=spec).unbatch().save(str(tfdata))


def model(folder: Path) -> Path:
    code = (
        "import sys, keras\n"
        "keras.utils.set_random_seed(0)\n"
        f"m = keras.Sequential([keras.Input(({FEATURES},)), keras.layers.Dense(64, activation='tanh'), keras.layers.Dense(1)])\n"
        "m.compile(optimizer=keras.optimizers.SGD(0.01), loss='mse')\n"
        "m.save(sys.argv[1])\n"
    )
    path = folder / "mlp.keras"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True)
    return path


def peak(args: list) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one gradwatch process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gradwatch", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"gradwatch failed: {err[-2000:]}")
    return usage.ru_maxrss / 1024, seconds


def main() -> None:
    if sys.argv[1:2] == ["--write"]:
        npz, tfdata, rows, seed = sys.argv[2:6]
        return write(Path(npz), Path(tfdata), int(rows), int(seed))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mb", type=int, default=1024)
    parser.add_argument("--small-mb", type=int, default=100)
    parser.add_argument("--in-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure --no-stream (reads the data into memory)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="gradwatch-stream-bench-"))
    try:
        mlp = model(folder)
        sets = {mb: make(folder, mb, seed=mb) for mb in (args.small_mb, args.big_mb)}
        print(f"**Machine:** {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
              f"Python {platform.python_version()}; {platform.platform()}\n")
        print(f"one epoch (every row read once), batches of {BATCH}, {FEATURES} float32 features a row; "
              "`gradwatch run mlp.keras --data D --epochs 1 --no-per-variable --format csv`\n")
        print("| data | size on disk (MB) | rows | way | peak RSS (MB) | wall (s) |")
        print("|---|---:|---:|---|---:|---:|")
        got = {}
        for kind in ("npz", "tfdata"):
            for mb, found in sets.items():
                ways = [("--stream", True)] + ([("--no-stream", False)] if args.in_memory else [])
                for flag, _ in ways:
                    rss, wall = peak(["run", mlp, "--data", found[kind], "--epochs", 1, "--batch-size", BATCH,
                                      "--no-per-variable", "--format", "csv", "--quiet", flag])
                    got[kind, mb, flag] = rss
                    print(f"| {kind} | {found[kind + '_mb']:.0f} | {found['rows']} | {flag} | {rss:.0f} | {wall:.1f} |",
                          flush=True)
        print("\n| check | measured | goal | |\n|---|---:|---:|---|")
        for kind in ("npz", "tfdata"):
            ratio = got[kind, args.big_mb, "--stream"] / got[kind, args.small_mb, "--stream"]
            print(f"| {kind}, streamed: peak RSS {args.big_mb} MB set / {args.small_mb} MB set "
                  f"({got[kind, args.big_mb, '--stream']:.0f} / {got[kind, args.small_mb, '--stream']:.0f} MB) "
                  f"| {ratio:.3f} | ≤ 1.1 | {'met' if ratio <= 1.1 else 'NOT met'} |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
