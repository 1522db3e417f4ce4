"""Per-step cost of per-variable records (issue 12) on the built-in PTB sample.

    python benchmarks/per_variable.py                     # ~6 min on 2 CPU cores
    python benchmarks/per_variable.py --rounds 3 --steps 150 --sample ptb-small

One process trains the sample with global clipping at 5, ``--rounds`` times each way,
interleaved: plain (--no-per-variable), per-variable norms (the default for the table: grad,
clipped, weight and update norm of every variable, fetched with each block and fed to the
spike attribution), the same with the update norms taken the old way (a copy of every weight
before the update, what gradwatch still does for optimizers not defined by Keras), and
per-variable norms written to --tensorboard with histograms every 100 steps. Every way is
traced before the first round. A way's per-step time is the median ``time_ms`` of its steps
after the first 20; its CPU time per step is the process's CPU time (user + system) over the
run / steps. Its ratios are the medians over rounds of its time / plain's time in the same
round (paired, so the shared VM's slow and fast spells cancel). Target: per-variable records
cost at most 5 % per step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET = 1.05
WARMUP = 20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", default="ptb-small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args(argv)

    from bench import machine
    from gradwatch.clip import Clipping
    from gradwatch.session import RunSpec, prepare, resolve
    from gradwatch.record.tensorboard import TensorBoardSink

    trainer = prepare(resolve(RunSpec(sample=args.sample, steps=args.steps)))
    clipping = Clipping("global", 5.0)
    logdir = Path(tempfile.mkdtemp(prefix="gradwatch-bench-tb-"))
    times: dict[str, list[float]] = {"plain": [], "per-variable": [], "per-variable, update norms from copies": [],
                                     "per-variable + tensorboard": []}
    cpu: dict[str, list[float]] = {way: [] for way in times}

    def set_way(way):
        trainer.per_variable = way != "plain"
        trainer.capture_every = 100 if "tensorboard" in way else None
        trainer.follow_writes = "copies" not in way

    for way in times:  # trace every way first: the rounds time steps, not tracing
        set_way(way)
        trainer.trace(clipping.impl)
    for r in range(args.rounds):
        for way in times:
            set_way(way)
            hooks = {}
            if "tensorboard" in way:
                sink = TensorBoardSink(logdir / f"round{r}", "global", 5.0, trainer.variable_names[0] if trainer.used else [])
                hooks = {"on_variables": lambda rows, norms: sink.write(rows, norms),
                         "on_capture": lambda step, grads: sink.histograms(step, grads)}
            started = time.process_time()
            result = trainer.run(clipping, **hooks)
            cpu[way].append((time.process_time() - started) / len(result.rows) * 1000.0)
            if "tensorboard" in way:
                sink.close()
            ms = statistics.median(row["time_ms"] for row in result.rows[WARMUP:])
            times[way].append(ms)
            print(f"round {r + 1}: {way}: {ms:.2f} ms/step, CPU {cpu[way][-1]:.2f} ms/step", file=sys.stderr, flush=True)
    print(f"**Machine:** {machine()}\n")
    print(f"{args.sample}, {args.steps} steps, global 5, {args.rounds} interleaved rounds; median `time_ms` after {WARMUP} steps\n")
    print("| way | per step, wall (ms) | / plain, wall, rounds | per step, CPU (ms) | / plain, CPU, rounds | target | |\n"
          "|---|---:|---:|---:|---:|---:|---|")
    for way, values in times.items():
        cells = []
        for series in (values, cpu[way]):
            base = times["plain"] if series is values else cpu["plain"]
            ratios = [v / p for v, p in zip(series, base)]
            cells.append((statistics.median(series), statistics.median(ratios), ratios))
        target = "≤ 1.05" if way == "per-variable" else ""
        met = ("met" if max(cells[0][1], cells[1][1]) <= TARGET else "not met") if target else ""
        print(f"| {way} | " + " | ".join(f"{ms:.2f} | {ratio:.3f} ({', '.join(f'{x:.2f}' for x in ratios)})"
                                         for ms, ratio, ratios in cells) + f" | {target} | {met} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
