"""One measured step of this checkout against another checkout's, in one process: CPU per step.

    python benchmarks/step_ab.py WORKDIR MODEL STEPS ROUNDS OLD_CHECKOUT

WORKDIR holds the benchmark models (``python benchmarks/common.py WORKDIR PTB_TEXT``); MODEL is
one of common.MODELS; OLD_CHECKOUT a checkout of an older commit (``git worktree add /tmp/old
COMMIT``), whose ``gradwatch`` package is imported beside this one under another name. Each way
is a ``tf.function`` step: tape, ``measured_step`` with ``--clip global``, the update under the
non-finite guard; the floor is floor.py's bare step (``common.bare_step``). The ways run in
turn, in alternating order, STEPS steps a round; printed: the median CPU time per step
(``time.process_time``) and the medians of the round-by-round ratios.
"""

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import common  # noqa: E402


def package_as(checkout: Path, name: str, into: Path):
    """``checkout``'s gradwatch package, importable as ``name`` (its imports are relative)."""
    shutil.copytree(checkout / "gradwatch", into / name)
    sys.path.insert(0, str(into))
    step = __import__(f"{name}.train.step", fromlist=["measured_step"])
    ops = __import__(f"{name}.clip.tf_ops", fromlist=["ClipByGlobalNorm"])
    return step.measured_step, ops.ClipByGlobalNorm


def main(workdir: str, name: str, steps: str, rounds: str, old: str) -> None:
    from gradwatch.clip.tf_ops import ClipByGlobalNorm
    from gradwatch.train.step import measured_step

    cfg = common.MODELS[name]
    model, x, y, loss_fn = common.load(Path(workdir), name)
    variables = model.trainable_variables
    optimizer = keras.optimizers.SGD(cfg["lr"])
    threshold = tf.constant(cfg["clip_norm"], tf.float32)

    def way(measure, strategy):
        @tf.function
        def step(xb, yb):
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True))
            m = measure(tape.gradient(loss, variables), variables, strategy(), threshold, (), loss)

            def update():
                optimizer.apply_gradients(zip(m.apply, variables))
                return tf.constant(True)

            moved = tf.cond(m.finite, update, lambda: tf.constant(False))
            return loss, m.grad_norm, m.clipped_norm, m.grad_norms, m.clipped_norms, moved
        return step

    floor = common.bare_step(model, loss_fn, optimizer, threshold)  # the step of floor.py
    with tempfile.TemporaryDirectory() as tmp:
        ways = {"floor": floor, "old": way(*package_as(Path(old), "gradwatch_old", Path(tmp))),
                "new": way(measured_step, ClipByGlobalNorm)}
        batches = [(tf.constant(a), tf.constant(b)) for a, b in common.batches(x, y, cfg["batch_size"], int(steps))]
        for f in ways.values():  # trace and warm
            for a, b in batches[:3]:
                f(a, b)
        cpu = {k: [] for k in ways}
        for r in range(int(rounds)):
            for k, f in (list(ways.items()) if r % 2 == 0 else list(ways.items())[::-1]):
                start = time.process_time()
                for a, b in batches:
                    out = f(a, b)
                tf.nest.map_structure(lambda t: t.numpy(), out)
                cpu[k].append((time.process_time() - start) / len(batches) * 1000)
    for k, values in cpu.items():
        print(f"{name} {k}: CPU per step {statistics.median(values):.3f} ms; "
              f"/ floor {statistics.median(a / b for a, b in zip(values, cpu['floor'])):.3f}; "
              f"/ old {statistics.median(a / b for a, b in zip(values, cpu['old'])):.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
