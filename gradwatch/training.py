"""One training step (tape -> grads -> clip -> apply), traced once per strategy, and the loop.

The step runs as one ``tf.function``; the threshold and the learning rate are tensors/variables,
so every threshold of a strategy shares one trace. A step whose loss or gradient norm is not
finite skips the update (``tf.cond``), so weights and optimizer state stay as they were.

All variables of the model and the optimizer are snapshot after set-up; every run (every
variant of a comparison) starts from that snapshot and sees the same batches.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from . import data as data_mod
from .clipping import Clipping, dedupe, global_norm
from .errors import DataError, Interrupted, ModelError, NonFiniteStop, OptionError, first_line
from .records import SpikeRule, clip_ratio, summarize

OPTIMIZERS = ("sgd", "momentum", "adam", "rmsprop", "adagrad")
LOSSES = {
    "mse": "MeanSquaredError",
    "mae": "MeanAbsoluteError",
    "huber": "Huber",
    "binary_crossentropy": "BinaryCrossentropy",
    "categorical_crossentropy": "CategoricalCrossentropy",
    "sparse_categorical_crossentropy": "SparseCategoricalCrossentropy",
}
MOMENTUM = 0.9  # of --optimizer momentum (SGD with momentum, as in Keras)


@dataclass(frozen=True)
class TrainOptions:
    batch_size: int = 32
    steps: int | None = None
    epochs: int | None = None
    shuffle: bool = True
    seed: int = 0
    optimizer: str = "sgd"
    lr: float = 0.01
    lr_decay: float | None = None
    decay_after_epoch: int = 1
    on_nonfinite: str = "skip"
    fetch_every: int = 1
    xla: bool = False
    spike_rule: SpikeRule = field(default_factory=SpikeRule)

    def __post_init__(self):
        checks = [
            (self.batch_size >= 1, f"`--batch-size` must be >= 1. Received: batch_size={self.batch_size}"),
            (self.steps is None or self.steps >= 1, f"`--steps` must be >= 1. Received: steps={self.steps}"),
            (self.epochs is None or self.epochs >= 1, f"`--epochs` must be >= 1. Received: epochs={self.epochs}"),
            (not (self.steps and self.epochs), "give --steps or --epochs, not both"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"),
            (math.isfinite(self.lr) and self.lr > 0, f"`--lr` must be > 0. Received: lr={self.lr}"),
            (self.lr_decay is None or (math.isfinite(self.lr_decay) and self.lr_decay > 0),
             f"`--lr-decay` must be > 0. Received: lr_decay={self.lr_decay}"),
            (self.decay_after_epoch >= 0, f"`--decay-after-epoch` must be >= 0. Received: {self.decay_after_epoch}"),
            (self.on_nonfinite in ("skip", "stop"), f"`--on-nonfinite` must be skip or stop. Received: {self.on_nonfinite}"),
            (self.fetch_every >= 1, f"`--fetch-every` must be >= 1. Received: fetch_every={self.fetch_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise OptionError(message)

    def lr_at(self, epoch: int) -> float:
        """The PTB tutorial's schedule: lr * lr_decay ** max(epoch - decay_after_epoch, 0)."""
        if self.lr_decay is None:
            return self.lr
        return self.lr * self.lr_decay ** max(epoch - self.decay_after_epoch, 0)


@dataclass
class RunResult:
    clipping: Clipping
    rows: list[dict]
    stopped: str = "finished"  # "finished", "nonfinite" or "interrupted"

    @property
    def summary(self) -> dict:
        return summarize(self.rows)


def make_loss(name: str, from_logits: bool):
    import keras

    if name not in LOSSES:
        raise OptionError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    cls = getattr(keras.losses, LOSSES[name])
    if from_logits:
        if "crossentropy" not in name:
            raise OptionError(f"--from-logits applies to crossentropy losses, not {name}; drop it")
        return cls(from_logits=True)
    return cls()


def make_optimizer(name: str, lr: float):
    import keras

    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=lr)
    if name == "momentum":
        return keras.optimizers.SGD(learning_rate=lr, momentum=MOMENTUM)
    return {"adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop, "adagrad": keras.optimizers.Adagrad}[name](
        learning_rate=lr
    )


def fit_to_model(dataset: data_mod.Dataset, model, target_spec=None) -> data_mod.Dataset:
    """Check the data's shape against the model's input and cast it to the model's dtypes."""
    x, y = dataset.x, dataset.y
    spec = model.input_spec
    if spec is not None and spec.shape.rank is not None:
        wanted = spec.shape
        got = (None,) + tuple(x.shape[1:])
        if wanted.rank != len(got) or any(w is not None and w != g for w, g in zip(wanted.as_list()[1:], got[1:])):
            raise DataError(
                f"data x has shape {_shape(got)} per batch but the model expects {_shape(wanted.as_list())}; "
                "reshape the data or pick another --endpoint"
            )
        x = _cast(x, spec.dtype, "x")
    elif x.dtype == np.float64:
        x = x.astype(np.float32)
    if target_spec is not None:
        y = _cast(y, target_spec.dtype, "y")
    elif y.dtype == np.float64 or y.dtype == np.bool_:
        y = y.astype(np.float32)
    return data_mod.Dataset(x, y, dataset.kind, dataset.path)


def _cast(array: np.ndarray, dtype, name: str) -> np.ndarray:
    target = np.dtype(dtype.as_numpy_dtype)
    if np.issubdtype(target, np.integer) and not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"the model expects integer {name} ({target}) but the data has {array.dtype}; store ids as integers")
    return array.astype(target, copy=False)


def _shape(dims) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in dims) + ")"


class Trainer:
    """Holds the model, optimizer and data, and runs one clipping variant at a time."""

    def __init__(self, model, dataset: data_mod.Dataset, options: TrainOptions, loss=None):
        import tensorflow as tf

        self.model = model
        self.options = options
        if loss is None and model.own_loss is None:
            raise OptionError(
                f"{model.path} has no loss(inputs, targets) function; pass --loss NAME ({', '.join(LOSSES)})"
            )
        if loss is not None:
            self.objective = lambda x, y: loss(y, model.forward(x))
            target_spec = None
        else:
            self.objective = model.own_loss
            target_spec = _second_input(model.own_loss)
        self.data = fit_to_model(dataset, model, target_spec)
        self.steps_per_epoch = data_mod.steps_per_epoch(len(self.data), options.batch_size)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{self.data.path} has {len(self.data)} rows, fewer than one batch of {options.batch_size}; "
                "lower --batch-size"
            )
        if options.steps is not None:
            self.total_steps = options.steps
        else:
            self.total_steps = (options.epochs or 1) * self.steps_per_epoch

        x0 = tf.constant(self.data.x[: options.batch_size])
        y0 = tf.constant(self.data.y[: options.batch_size])
        self.used, self.skipped = self._split_by_gradient(x0, y0)
        self.optimizer = make_optimizer(options.optimizer, options.lr)
        self.optimizer.build(self.used)
        self._state = list(model.variables) + list(self.optimizer.variables)
        self._initial = [v.numpy() for v in self._state]
        self._steps: dict[str, object] = {}

    # -- set-up -------------------------------------------------------------------------------

    def _split_by_gradient(self, x0, y0):
        """Trace (not run) the gradient once to find variables the loss does not reach."""
        import tensorflow as tf

        trainable = self.model.trainable
        has_grad: list[bool] = []

        def probe(x, y):
            with tf.GradientTape() as tape:
                loss = self.objective(x, y)
            has_grad[:] = [g is not None for g in tape.gradient(loss, trainable)]
            return loss

        try:
            concrete = tf.function(probe).get_concrete_function(
                tf.TensorSpec.from_tensor(x0), tf.TensorSpec.from_tensor(y0)
            )
        except (ModelError, OptionError):
            raise
        except Exception as exc:  # TF raises ValueError/TypeError/InvalidArgumentError for mismatches
            raise DataError(
                f"the model cannot compute the loss on this data: {first_line(exc)}; check --loss, --target and the shapes"
            ) from None
        if concrete.structured_outputs.shape.rank not in (0, None):
            raise ModelError(f"the loss must be a scalar, got shape {concrete.structured_outputs.shape}; reduce it to one number")
        used = [v for v, g in zip(trainable, has_grad) if g]
        skipped = [_name(v) for v, g in zip(trainable, has_grad) if not g]
        if not used:
            raise ModelError(f"the loss of {self.model.path} does not depend on any trainable variable; check the endpoint")
        return used, skipped

    def _step_for(self, strategy):
        import tensorflow as tf

        if strategy.name in self._steps:
            return self._steps[strategy.name]
        used, optimizer, objective = self.used, self.optimizer, self.objective

        def step(x, y, threshold, state):
            with tf.GradientTape() as tape:
                loss = tf.cast(objective(x, y), tf.float32)
            grads = [dedupe(g) for g in tape.gradient(loss, used)]
            grad_norm = global_norm(grads)
            result = strategy.apply(grads, threshold, used, state)
            clipped_norm = global_norm(result.grads)
            finite = tf.math.is_finite(loss) & tf.math.is_finite(grad_norm)

            def update():
                optimizer.apply_gradients(zip(result.grads, used))
                return tf.constant(True)

            tf.cond(finite, update, lambda: tf.constant(False))
            return loss, grad_norm, clipped_norm, result.clipped, finite, result.state

        traced = tf.function(step, jit_compile=self.options.xla or None)
        self._steps[strategy.name] = traced
        return traced

    def reset(self) -> None:
        """Put every model and optimizer variable back to its value after set-up."""
        for variable, value in zip(self._state, self._initial):
            variable.assign(value)

    # -- the loop -----------------------------------------------------------------------------

    def run(self, clipping: Clipping, on_rows=None, on_progress=None) -> RunResult:
        """Train ``total_steps`` steps with ``clipping`` from the initial weights.

        ``on_rows(rows)`` receives rows as they are fetched; ``on_progress(done, total)`` after.
        Raises :class:`Interrupted` on Ctrl-C with the rows so far, and
        :class:`~gradwatch.errors.NonFiniteStop` (with ``.result``) for ``--on-nonfinite stop``.
        """
        import tensorflow as tf

        options = self.options
        self.reset()
        tf.random.set_seed(options.seed)
        step_fn = self._step_for(clipping.impl)
        threshold = tf.constant(clipping.threshold or 0.0, tf.float32)
        state = clipping.impl.init(self.used)
        detector = options.spike_rule.detector()
        stop_on_nonfinite = options.on_nonfinite == "stop"
        fetch_every = 1 if stop_on_nonfinite else options.fetch_every
        result = RunResult(clipping, [])
        pending: list = []
        block_start = time.perf_counter()
        lr = None

        def flush():
            nonlocal block_start, pending
            if not pending:
                return []
            fetched = [[t.numpy() for t in out] for *_, out in pending]
            per_step_ms = (time.perf_counter() - block_start) * 1000.0 / len(pending)
            rows = [
                self._row(step_no, epoch, step_lr, values, detector, per_step_ms)
                for (step_no, epoch, step_lr, _), values in zip(pending, fetched)
            ]
            pending = []
            block_start = time.perf_counter()
            result.rows.extend(rows)
            if on_rows:
                on_rows(rows)
            if on_progress:
                on_progress(len(result.rows), self.total_steps)
            return rows

        batches = data_mod.batches(self.data, options.batch_size, self.total_steps, options.shuffle, options.seed)
        try:
            for step_no, (epoch, xb, yb) in enumerate(batches, start=1):
                step_lr = options.lr_at(epoch)
                if step_lr != lr:
                    self.optimizer.learning_rate = step_lr
                    lr = step_lr
                *out, state = step_fn(tf.constant(xb), tf.constant(yb), threshold, state)
                pending.append((step_no, epoch, lr, out))
                if len(pending) >= fetch_every:
                    rows = flush()
                    if stop_on_nonfinite and rows and rows[-1]["nonfinite"]:
                        result.stopped = "nonfinite"
                        error = NonFiniteStop(
                            f"step {rows[-1]['step']}: loss or gradient is not finite; stopped as --on-nonfinite stop "
                            "asks (use --on-nonfinite skip to go on, or lower --lr / clip harder)"
                        )
                        error.result = result
                        raise error
            flush()
        except KeyboardInterrupt:
            flush()
            result.stopped = "interrupted"
            raise Interrupted([result]) from None
        return result

    def _row(self, step_no, epoch, lr, values, detector, time_ms) -> dict:
        loss, grad_norm, clipped_norm, clipped, finite = (v.item() for v in values)
        return {
            "step": step_no,
            "epoch": epoch,
            "loss": float(loss),
            "grad_norm": float(grad_norm),
            "clipped_norm": float(clipped_norm),
            "clip_ratio": clip_ratio(float(grad_norm), float(clipped_norm)),
            "clipped": bool(clipped),
            "lr": float(lr),
            "nonfinite": not bool(finite),
            "loss_spike": detector.update(float(loss)),
            "time_ms": time_ms,
        }


def compare(trainer: Trainer, variants: list[Clipping], on_rows=None, on_progress=None) -> list[RunResult]:
    """Run every variant from the same initial state on the same batches, one after another."""
    results: list[RunResult] = []
    for clipping in variants:
        forward = (lambda rows, c=clipping: on_rows(c, rows)) if on_rows else None
        progress = (lambda done, total, c=clipping: on_progress(c, done, total)) if on_progress else None
        try:
            results.append(trainer.run(clipping, forward, progress))
        except Interrupted as stop:
            raise Interrupted(results + stop.results) from None
    return results


def _second_input(fn):
    """TensorSpec of the targets argument of a restored ``loss(inputs, targets)``, if any."""
    import tensorflow as tf

    for concrete in getattr(fn, "concrete_functions", None) or []:
        args, _ = concrete.structured_input_signature
        flat = [a for a in tf.nest.flatten(args) if isinstance(a, tf.TensorSpec)]
        if len(flat) == 2:
            return flat[1]
    return None


def _name(variable) -> str:
    return getattr(variable, "path", None) or getattr(variable, "name", "?")
