"""gradwatch against what a user would run instead: speed and memory, as medians of interleaved rounds.

    python benchmarks/bench.py                 # everything, 5 rounds, ~40 min on 2 CPU cores
    python benchmarks/bench.py --quick         # fewer steps, still 5 rounds, ~15 min
    python benchmarks/bench.py --models dense --rounds 7 --markdown out.md --gradwatch-args "--xla"

Every number is a whole process (``python ...``) timed from outside, so start-up, imports,
loading and tracing are in it; per-step cost is the difference between two step counts divided
by their difference, so start-up cancels out. Wall time is the child's elapsed time; CPU time
its user + system time (``wait4``), which shows the work done rather than the neighbours on a
shared machine. The ways are run round robin, ``--rounds`` times (at least 5), each round
giving its own ratios; the tables report the median over rounds and every round's ratio, so a
slow spell of the VM shows as one odd round instead of deciding the result. Peak memory is the
child's peak RSS. See benchmarks/README.md for the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
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


def run_once(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds = user + system, peak RSS in MB) of one run of ``cmd``."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:]
            sys.exit(f"benchmark command failed ({code}): {shlex.join(cmd)}\n{tail}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def measure(cmd: list[str], repeats: int = 1) -> tuple[float, float]:
    """(median wall seconds, largest peak RSS in MB) of ``cmd`` over ``repeats`` runs."""
    runs = [run_once(cmd) for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), max(r[2] for r in runs)


def fmt_rounds(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


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
    commands = {"gradwatch": gradwatch_cmd(workdir, name, steps, extra, csv=workdir / "run.csv"),
                "gradwatch --no-per-variable": gradwatch_cmd(workdir, name, steps, extra + ["--no-per-variable"],
                                                             csv=workdir / "run.csv")}
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
    parser.add_argument("--quick", action="store_true", help="fewer steps (rougher numbers), still --rounds rounds")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of every way (at least 5); medians count")
    parser.add_argument("--models", default="ptb-small,conv,dense", help="comma separated: ptb-small, conv, dense")
    parser.add_argument("--gradwatch-args", default="", help="extra options for every gradwatch command, e.g. '--xla'")
    parser.add_argument("--no-xla-row", dest="xla_row", action="store_false", help="skip the extra 'gradwatch --xla' row")
    parser.add_argument("--demo", action="store_true", help="also time the README's demonstration (about 40 s a round)")
    parser.add_argument("--workdir", type=Path, default=None, help="where models, data and CSVs go (default: a temp folder)")
    parser.add_argument("--ptb", type=Path, default=PTB_TEXT, help="PTB text to train on (default: ../shared/data/ptb/ptb.valid.txt)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the results as Markdown here")
    args = parser.parse_args(argv)
    if not args.ptb.is_file():
        sys.exit(f"no PTB text at {args.ptb}; pass --ptb PATH to a PTB split (e.g. ptb.valid.txt)")
    if args.rounds < 5:
        sys.exit("--rounds must be at least 5: fewer rounds cannot tell the VM's slow spells from a difference")
    quick, rounds = args.quick, args.rounds
    extra = shlex.split(args.gradwatch_args)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    counts = {"ptb-small": (30, 150) if quick else (50, 450), "conv": (100, 600) if quick else (100, 1600),
              "dense": (500, 4500) if quick else (500, 10500)}
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
    run_once([PY, "-c", "import tensorflow, keras, gradwatch.cli"])

    say(f"**Machine:** {machine()}")
    say()
    say(f"gradwatch options: defaults{(' + ' + args.gradwatch_args) if extra else ''}; {rounds} interleaved rounds, "
        f"medians; PTB text: {args.ptb.name}, {built['ptb_tokens']} tokens, {built['ptb_batches_per_epoch']} batches an epoch")
    say()
    rows = []  # (check, measured, target, rounds)

    say("| model | way | per step, wall (ms) | per step, CPU (ms) | whole process, short run, wall (s) | peak RSS, long run (MB) |")
    say("|---|---|---:|---:|---:|---:|")
    for name in names:
        n1, n2 = counts[name]
        short, long = ways(workdir, name, n1, extra, args.xla_row), ways(workdir, name, n2, extra, args.xla_row)
        per: dict[str, list[tuple[float, float, float]]] = {way: [] for way in short}  # (wall/step, cpu/step, short wall)
        peaks: dict[str, float] = {}
        for _ in range(rounds):  # round robin, so that a slow spell of the machine hits every way
            for way in short:
                w1, c1, _ = run_once(short[way])
                w2, c2, peak = run_once(long[way])
                per[way].append(((w2 - w1) / (n2 - n1) * 1000, (c2 - c1) / (n2 - n1) * 1000, w1))
                peaks[way] = max(peaks.get(way, 0.0), peak)
        for way in short:
            wall = statistics.median(p[0] for p in per[way])
            cpu = statistics.median(p[1] for p in per[way])
            say(f"| {name} | {way} | {wall:.3f} | {cpu:.3f} | {statistics.median(p[2] for p in per[way]):.2f} | {peaks[way]:.0f} |")

        def ratio(a: str, b: str, k: int) -> list[float]:
            return [x[k] / y[k] for x, y in zip(per[a], per[b])]

        steps = f"({n2} - {n1} steps)"
        rows.append((f"{name}: per step, CPU, gradwatch / Keras fit {steps}", ratio("gradwatch", "keras fit", 1), 1.0))
        rows.append((f"{name}: per step, wall, gradwatch / Keras fit {steps}", ratio("gradwatch", "keras fit", 0), 0.8))
        rows.append((f"{name}: per step, CPU, instruments: gradwatch / --no-per-variable {steps}",
                     ratio("gradwatch", "gradwatch --no-per-variable", 1), 1.05))
        rows.append((f"{name}: per step, wall, gradwatch / bare floor {steps}", ratio("gradwatch", "floor", 0), 1.02))
        rows.append((f"{name}: whole process, wall, gradwatch / Keras fit ({n1} steps)", ratio("gradwatch", "keras fit", 2), 0.8))
    say()

    help_time = measure([PY, "-m", "gradwatch", "--help"], 5)[0]
    import_time = measure([PY, "-c", "import tensorflow"], 5)[0]
    rows.append((f"`gradwatch --help` / `import tensorflow` ({help_time:.2f} s / {import_time:.2f} s)", [help_time / import_time], 0.1))

    csv10k = workdir / "10k.csv"
    run_once(gradwatch_cmd(workdir, "dense", 10_000, extra, csv=csv10k))
    report_time = measure([PY, "-m", "gradwatch", "report", str(csv10k)], 5)[0]
    rows.append(("`gradwatch report` on a 10k-row CSV, seconds (whole process)", [report_time], 0.5))

    for name in names:
        n = counts[name][0] * 4 if name == "ptb-small" else counts[name][1]
        cfg = common.MODELS[name]
        thresholds = f"none,{cfg['clip_norm'] / 5:g},{cfg['clip_norm']:g},{cfg['clip_norm'] * 2:g}"
        one_cmd = gradwatch_cmd(workdir, name, n, extra)
        four_cmd = gradwatch_cmd(workdir, name, n, extra, command="compare", clip=["--clip", "global", "--thresholds", thresholds])
        cpu, wall = [], []
        for _ in range(rounds):
            one, four = run_once(one_cmd), run_once(four_cmd)
            wall.append(four[0] / one[0])
            cpu.append(four[1] / one[1])
        rows.append((f"{name}: compare, 4 variants / one run, {n} steps, CPU", cpu, 2.5))
        rows.append((f"{name}: compare, 4 variants / one run, {n} steps, wall", wall, 2.5))

    if args.demo:
        demo = [PY, "-m", "gradwatch", "compare", "--clip", "global", "--thresholds", "none,5", "--quiet"]
        run_once(demo + ["--steps", "1"])  # builds the sample into its cache first: not part of the timing
        walls = [run_once(demo)[0] for _ in range(rounds)]
        rows.append(("the demonstration (`compare --clip global --thresholds none,5`), wall seconds", walls, 30.0))

    for name in (names if not quick else [n for n in names if n == "dense"] or names[:1]):
        low = run_once(gradwatch_cmd(workdir, name, memory_steps[0], extra, csv=workdir / "mem.csv"))[2]
        high = run_once(gradwatch_cmd(workdir, name, memory_steps[1], extra, csv=workdir / "mem.csv"))[2]
        rows.append((f"{name}: peak RSS, {memory_steps[1]} / {memory_steps[0]} steps ({high:.0f} MB / {low:.0f} MB)", [high / low], 1.1))

    say("| check | median | every round | target | |")
    say("|---|---:|---|---:|---|")
    for check, measured, target in rows:
        median = statistics.median(measured)
        say(f"| {check} | {median:.3f} | {fmt_rounds(measured)} | ≤ {target:g} | {verdict(median, target)} |")
    if args.markdown:
        args.markdown.write_text("\n".join(out) + "\n", encoding="utf-8")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
