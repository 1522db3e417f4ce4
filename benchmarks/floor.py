"""The floor: a bare ``tf.function`` step with ``tf.clip_by_global_norm``, nothing recorded.

    python benchmarks/floor.py WORKDIR MODEL STEPS
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import common  # noqa: E402


def main(workdir: str, name: str, steps: str) -> None:
    cfg = common.MODELS[name]
    model, x, y, loss_fn = common.load(Path(workdir), name)
    optimizer = keras.optimizers.SGD(cfg["lr"])
    variables = model.trainable_variables

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads, _ = tf.clip_by_global_norm(tape.gradient(loss, variables), cfg["clip_norm"])
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    loss = None
    for xb, yb in common.batches(x, y, cfg["batch_size"], int(steps)):
        loss = step(xb, yb)
    print(f"final loss {float(loss):.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
