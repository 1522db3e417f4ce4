"""gradwatch against what a user would run instead: speed and memory, as ratios from one run.

    python benchmarks/bench.py                 # everything, ~15 min on 2 CPU cores
    python benchmarks/bench.py --quick         # fewer steps and repeats, ~5 min
    python benchmarks/bench.py --markdown out.md --gradwatch-args "--xla"

Every number is a whole process (``python ...``) timed from outside, so start-up, imports,
loading and tracing are in it; per-step cost is the difference between two step counts divided
by their difference, so start-up cancels out. Peak memory is the child's peak RSS (wait4).
Each timing is the minimum of ``--repeats`` runs. See benchmarks/README.md for the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PTB_TEXT = ROOT.parent / "shared" / "data" / "ptb" / "ptb.valid.txt"
sys.path.insert(0, str(HERE))

import common  # noqa: E402

PY = sys.executable


def measure(cmd: list[str], repeats: int = 1) -> tuple[float, float]:
    """(fastest wall seconds, largest peak RSS in MB) of ``cmd`` over ``repeats`` runs."""
    walls, peaks = [], []
    for _ in range(repeats):
        with tempfile.TemporaryFile() as err:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
            _, status, usage = os.wait4(proc.pid, 0)
            walls.append(time.perf_counter() - start)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                err.seek(0)
                tail = err.read().decode(errors="replace")[-2000:]
                sys.exit(f"benchmark command failed ({proc.returncode}): {shlex.join(cmd)}\n{tail}")
        peaks.append(usage.ru_maxrss / 1024)
    return min(walls), max(peaks)


def gradwatch_cmd(workdir: Path, name: str, steps: int, extra: list[str], csv: Path | None = None,
                  command: str = "run", clip: list[str] | None = None) -> list[str]:
    cfg = common.MODELS[name]
    cmd = [PY, "-m", "gradwatch", command, str(workdir / f"{name}.keras"), "--data", str(workdir / f"{name}.npz"),
           "--loss", cfg["loss"], "--optimizer", "sgd", "--lr", str(cfg["lr"]), "--batch-size", str(cfg["batch_size"]),
           "--steps", str(steps), "--no-shuffle", "--quiet"]
    if cfg["from_logits"]:
        cmd.append("--from-logits")
    cmd += clip if clip is not None else ["--clip", "global", "--norm", str(cfg["clip_norm"])]
    if csv is not None:
        cmd += ["--csv", str(csv)]
    return cmd + extra


def ways(workdir: Path, name: str, steps: int, extra: list[str], xla_row: bool) -> dict[str, list[str]]:
    commands = {"gradwatch": gradwatch_cmd(workdir, name, steps, extra, csv=workdir / "run.csv")}
    if xla_row and "--xla" not in extra:
        commands["gradwatch --xla"] = gradwatch_cmd(workdir, name, steps, extra + ["--xla"], csv=workdir / "run.csv")
    commands["keras fit"] = [PY, str(HERE / "fit_keras.py"), str(workdir), name, str(steps)]
    commands["floor"] = [PY, str(HERE / "floor.py"), str(workdir), name, str(steps)]
    return commands


def machine() -> str:
    probe = (
        "import json, tensorflow as tf, keras; "
        "print(json.dumps([tf.__version__, keras.__version__, "
        "[d.name for d in tf.config.list_physical_devices('GPU')]]))"
    )
    out = subprocess.run([PY, "-c", probe], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    tf_version, keras_version, gpus = json.loads(out)
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
        mem_text = f"{mem:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        mem_text = "RAM unknown"
    gpu_text = ", ".join(gpus) if gpus else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores visible, {mem_text}, {gpu_text}; Python {platform.python_version()}, "
            f"TensorFlow {tf_version}, Keras {keras_version}, {platform.system()} {platform.release()}")


def verdict(ratio: float, target: float) -> str:
    return "met" if ratio <= target else "NOT met"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (rougher numbers)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per timing; the fastest counts")
    parser.add_argument("--models", default="ptb-small,dense", help="comma separated: ptb-small, dense")
    parser.add_argument("--gradwatch-args", default="", help="extra options for every gradwatch command, e.g. '--xla'")
    parser.add_argument("--no-xla-row", dest="xla_row", action="store_false", help="skip the extra 'gradwatch --xla' row")
    parser.add_argument("--workdir", type=Path, default=None, help="where models, data and CSVs go (default: a temp folder)")
    parser.add_argument("--ptb", type=Path, default=PTB_TEXT, help="PTB text to train on (default: ../shared/data/ptb/ptb.valid.txt)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the results as Markdown here")
    args = parser.parse_args(argv)
    if not args.ptb.is_file():
        sys.exit(f"no PTB text at {args.ptb}; pass --ptb PATH to a PTB split (e.g. ptb.valid.txt)")
    quick = args.quick
    repeats = args.repeats or (2 if quick else 3)
    extra = shlex.split(args.gradwatch_args)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    counts = {"ptb-small": (30, 150) if quick else (50, 450), "dense": (500, 4500) if quick else (500, 10500)}
    memory_steps = (400, 4000)

    tmp = tempfile.TemporaryDirectory(prefix="gradwatch-bench-")
    workdir = args.workdir or Path(tmp.name)
    out: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        out.append(line)

    print("building models and data ...", file=sys.stderr, flush=True)
    built = json.loads(subprocess.run([PY, str(HERE / "common.py"), str(workdir), str(args.ptb)], capture_output=True,
                                      text=True, check=True).stdout.strip().splitlines()[-1])
    # warm the OS file cache and Python bytecode so the first timed process is not penalised
    measure([PY, "-c", "import tensorflow, keras, gradwatch.cli"])

    say(f"**Machine:** {machine()}")
    say()
    say(f"gradwatch options: defaults{(' + ' + args.gradwatch_args) if extra else ''}; repeats: {repeats} (fastest kept); "
        f"PTB text: {args.ptb.name}, {built['ptb_tokens']} tokens, {built['ptb_batches_per_epoch']} batches an epoch")
    say()
    rows = []  # (check, measured, target, verdict)

    say("| model | way | per step (ms) | whole process, short run (s) | peak RSS, long run (MB) |")
    say("|---|---|---:|---:|---:|")
    for name in names:
        n1, n2 = counts[name]
        short, long = ways(workdir, name, n1, extra, args.xla_row), ways(workdir, name, n2, extra, args.xla_row)
        walls: dict[tuple[str, int], list[float]] = {}
        peaks: dict[str, float] = {}
        for _ in range(repeats):  # round robin, so that a slow spell of the machine hits every way
            for way in short:
                for n, commands in ((n1, short), (n2, long)):
                    wall, peak = measure(commands[way])
                    walls.setdefault((way, n), []).append(wall)
                    if n == n2:
                        peaks[way] = max(peaks.get(way, 0.0), peak)
        results = {}
        for way in short:
            fast_short, fast_long = min(walls[way, n1]), min(walls[way, n2])
            per_step = (fast_long - fast_short) / (n2 - n1) * 1000
            results[way] = (per_step, fast_short, peaks[way])
            say(f"| {name} | {way} | {per_step:.3f} | {fast_short:.2f} | {peaks[way]:.0f} |")
        gw, fit, floor = results["gradwatch"], results["keras fit"], results["floor"]
        rows.append((f"{name}: per step, gradwatch / Keras fit ({n2} - {n1} steps)", gw[0] / fit[0], 0.95))
        rows.append((f"{name}: per step, gradwatch / bare floor", gw[0] / floor[0], 1.02))
        rows.append((f"{name}: whole process, gradwatch / Keras fit ({n1} steps)", gw[1] / fit[1], 0.8))
    say()

    help_time = measure([PY, "-m", "gradwatch", "--help"], 5)[0]
    import_time = measure([PY, "-c", "import tensorflow"], 5)[0]
    rows.append((f"`gradwatch --help` / `import tensorflow` ({help_time:.2f} s / {import_time:.2f} s)", help_time / import_time, 0.1))

    csv10k = workdir / "10k.csv"
    measure(gradwatch_cmd(workdir, "dense", 10_000, extra, csv=csv10k))
    report_time = measure([PY, "-m", "gradwatch", "report", str(csv10k)], 5)[0]
    rows.append(("`gradwatch report` on a 10k-row CSV, seconds (whole process)", report_time, 0.5))

    for name in names:
        n = counts[name][0] * 4 if name == "ptb-small" else counts[name][1]
        cfg = common.MODELS[name]
        thresholds = f"none,{cfg['clip_norm'] / 5:g},{cfg['clip_norm']:g},{cfg['clip_norm'] * 2:g}"
        one_cmd = gradwatch_cmd(workdir, name, n, extra)
        four_cmd = gradwatch_cmd(workdir, name, n, extra, command="compare", clip=["--clip", "global", "--thresholds", thresholds])
        ones, fours = [], []
        for _ in range(repeats):
            ones.append(measure(one_cmd)[0])
            fours.append(measure(four_cmd)[0])
        one, four = min(ones), min(fours)
        rows.append((f"{name}: compare, 4 variants / one run, {n} steps ({four:.1f} s / {one:.1f} s)", four / one, 2.5))

    for name in (names if not quick else [n for n in names if n == "dense"] or names[:1]):
        low = measure(gradwatch_cmd(workdir, name, memory_steps[0], extra, csv=workdir / "mem.csv"))[1]
        high = measure(gradwatch_cmd(workdir, name, memory_steps[1], extra, csv=workdir / "mem.csv"))[1]
        rows.append((f"{name}: peak RSS, {memory_steps[1]} / {memory_steps[0]} steps ({high:.0f} MB / {low:.0f} MB)", high / low, 1.1))

    say("| check | measured | target | |")
    say("|---|---:|---:|---|")
    for check, measured, target in rows:
        say(f"| {check} | {measured:.3f} | ≤ {target:g} | {verdict(measured, target)} |")
    if args.markdown:
        args.markdown.write_text("\n".join(out) + "\n", encoding="utf-8")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
