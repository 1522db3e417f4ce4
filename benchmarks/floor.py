"""The floor: a bare ``tf.function`` step with ``tf.clip_by_global_norm``, nothing recorded.

    python benchmarks/floor.py WORKDIR MODEL STEPS
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import keras  # noqa: E402

import common  # noqa: E402


def main(workdir: str, name: str, steps: str) -> None:
    cfg = common.MODELS[name]
    model, x, y, loss_fn = common.load(Path(workdir), name)
    step = common.bare_step(model, loss_fn, keras.optimizers.SGD(cfg["lr"]), cfg["clip_norm"])
    loss = None
    for xb, yb in common.batches(x, y, cfg["batch_size"], int(steps)):
        loss = step(xb, yb)
    print(f"final loss {float(loss):.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
