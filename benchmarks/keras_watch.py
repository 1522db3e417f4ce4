"""GradientWatch's cost inside model.fit (issue 13): plain fit with global_clipnorm against the same
fit with the optimizer wrapped by GradientWatch(clip="global"), per step.

    python benchmarks/keras_watch.py                 # ~3 min on 2 CPU cores
    python benchmarks/keras_watch.py --rounds 5 --steps-per-execution 1,8

For each model and steps_per_execution, one process alternates the two ways for ``--rounds``
rounds; a round builds the model from the same seed, runs one warm-up epoch (tracing), then
times ``--epochs`` epochs of fit. A way's ratio is the median over rounds of its time against
plain fit's in the same round. Target: at most 1.05.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET = 1.05


def build(name: str):
    import keras

    keras.utils.set_random_seed(0)
    if name == "dense":  # 3 x 512 tanh MLP, batch 64
        layers = [keras.Input((256,))] + [keras.layers.Dense(512, activation="tanh") for _ in range(3)] + [keras.layers.Dense(1)]
        return keras.Sequential(layers), 64
    # a small word LSTM: embedding 5000 x 128, LSTM 256 over 20 steps, softmax over the vocabulary
    inputs = keras.Input((20,), dtype="int32")
    h = keras.layers.LSTM(256, return_sequences=True)(keras.layers.Embedding(5000, 128)(inputs))
    return keras.Model(inputs, keras.layers.Dense(5000)(h)), 32


def data(name: str, n: int):
    import numpy as np

    rng = np.random.default_rng(0)
    if name == "dense":
        x = rng.normal(size=(n, 256)).astype("float32")
        return x, x[:, :1] * 0.5
    ids = rng.integers(0, 5000, size=(n, 21)).astype("int32")
    return ids[:, :-1], ids[:, 1:]


def timed_fit(name: str, way: str, per_execution: int, epochs: int, n: int) -> float:
    import keras

    from gradwatch.keras import GradientWatch

    model, batch = build(name)
    loss = "mse" if name == "dense" else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    callbacks = []
    if way == "plain":
        optimizer = keras.optimizers.SGD(0.01, global_clipnorm=1.0)
    else:
        watch = GradientWatch(clip="global", norm=1.0)
        optimizer, callbacks = watch.wrap(keras.optimizers.SGD(0.01)), [watch]
    model.compile(optimizer=optimizer, loss=loss, steps_per_execution=per_execution, jit_compile=False)
    x, y = data(name, n)
    model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)  # tracing
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
    return (time.perf_counter() - start) * 1000.0 / (epochs * (n // batch))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="dense,lstm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps-per-execution", default="1,8")
    args = parser.parse_args(argv)
    from bench import machine

    print(f"**Machine:** {machine()}\n")
    print(f"{args.rounds} interleaved rounds, {args.epochs} timed epochs each; per step = fit's wall time / steps\n")
    print("| model | steps_per_execution | plain fit (ms/step) | GradientWatch (ms/step) | / plain, rounds | target | |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in args.models.split(","):
        n = 6400 if name == "dense" else 1600
        for per_execution in [int(v) for v in args.steps_per_execution.split(",")]:
            times = {"plain": [], "watch": []}
            for _ in range(args.rounds):
                for way in times:
                    times[way].append(timed_fit(name, way, per_execution, args.epochs, n))
            ratios = [w / p for w, p in zip(times["watch"], times["plain"])]
            ratio = statistics.median(ratios)
            print(f"| {name} | {per_execution} | {statistics.median(times['plain']):.2f} | {statistics.median(times['watch']):.2f} "
                  f"| {ratio:.3f} ({', '.join(f'{r:.3f}' for r in ratios)}) | ≤ 1.05 | {'met' if ratio <= TARGET else 'not met'} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
