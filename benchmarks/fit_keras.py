"""What a user would write instead of gradwatch: Keras ``model.fit`` with ``global_clipnorm``.

    python benchmarks/fit_keras.py WORKDIR MODEL STEPS
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import keras  # noqa: E402

import common  # noqa: E402


def main(workdir: str, name: str, steps: str) -> None:
    cfg = common.MODELS[name]
    model, x, y, loss = common.load(Path(workdir), name)
    model.compile(optimizer=keras.optimizers.SGD(cfg["lr"], global_clipnorm=cfg["clip_norm"]), loss=loss)
    history = model.fit(common.batches(x, y, cfg["batch_size"], int(steps)), steps_per_epoch=int(steps), epochs=1, verbose=0)
    print(f"final loss {history.history['loss'][-1]:.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
