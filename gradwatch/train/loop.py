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
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..load import data as data_mod
from ..train import distribute
from ..clip import Clipping
from ..clip.base import norms
from ..objective import check_lr, describe_optimizer, has_schedule, make_optimizer, optimizer_config, regularization
from ..errors import DataError, GradwatchError, Interrupted, ModelError, NonFiniteStop, OptionError, first_line
from ..diagnose.spikes import SpikeRule
from ..record.rows import RowStore, clip_ratio, summarize
from ..signals import deferred_interrupt
from .pipeline import Pipeline
from ..train import updates
from .step import INITIAL_LOSS_SCALE, ON_NONFINITE, SPARSE_NORMS, applies, forward_state, measured_step, next_loss_scale, nonfinite_kinds, unscale

# What the traced step records for every step, fetched once per block: (name, dtype).
RECORDED = (
    ("loss", "float32"), ("grad_norm", "float64"), ("clipped_norm", "float64"), ("threshold", "float64"),
    ("reg_loss", "float32"), ("lr", "float32"), ("loss_scale", "float32"),
    ("clipped", "bool"), ("overflow", "bool"), ("nonfinite", "bool"), ("grad_norm_rows", "float64"),
    ("nonfinite_input", "bool"),
)
# With per-variable records on, each step also gives a (4, V) matrix: for every variable that
# gets a gradient, these norms (fetched with the block, streamed to --layers-csv).
PER_VARIABLE = ("grad_norm", "clipped_norm", "weight_norm", "update_norm")


@dataclass(frozen=True)
class TrainOptions:
    batch_size: int = 32
    steps: int | None = None
    epochs: int | None = None
    shuffle: bool = True
    seed: int = 0
    optimizer: str | None = None  # a Keras identifier; None: the model's compiled optimizer, else SGD
    lr: float | None = None  # None: the optimizer's own (compiled, or 0.01)
    optimizer_args: dict = field(default_factory=dict)  # --opt NAME=VALUE
    lr_decay: float | None = None
    decay_after_epoch: int = 1
    on_nonfinite: str = "skip"
    sparse_norm: str = "summed"  # what clipping measures an embedding's repeated rows by (train.step)
    start_step: int = 0  # the run continues as step start_step + 1 of the user's training
    fresh_optimizer: bool = False  # ignore the optimizer state the model file carries
    checkpoint: str | None = None  # a tf.train.Checkpoint (model=, optimizer=) to continue from
    save_checkpoints: str | None = None  # write the run's state into this folder ...
    checkpoint_every: int = 100  # ... at every step that is a multiple of this
    fetch_every: int | None = None  # None: auto (see _next_block)
    xla: bool | None = None  # None: as Keras' jit_compile="auto", on where a GPU is visible
    spike_rule: SpikeRule = field(default_factory=SpikeRule)

    def __post_init__(self):
        checks = [
            (self.batch_size >= 1, f"`--batch-size` must be >= 1. Received: batch_size={self.batch_size}"),
            (self.steps is None or self.steps >= 1, f"`--steps` must be >= 1. Received: steps={self.steps}"),
            (self.epochs is None or self.epochs >= 1, f"`--epochs` must be >= 1. Received: epochs={self.epochs}"),
            (not (self.steps and self.epochs), "give --steps or --epochs, not both"),
            (self.lr_decay is None or (math.isfinite(self.lr_decay) and self.lr_decay > 0),
             f"`--lr-decay` must be > 0. Received: lr_decay={self.lr_decay}"),
            (self.decay_after_epoch >= 0, f"`--decay-after-epoch` must be >= 0. Received: {self.decay_after_epoch}"),
            (self.on_nonfinite in ON_NONFINITE,
             f"`--on-nonfinite` must be one of {', '.join(ON_NONFINITE)}. Received: {self.on_nonfinite}"),
            (self.start_step >= 0, f"`--start-step` must be >= 0. Received: start_step={self.start_step}"),
            (self.checkpoint_every >= 1, f"`--checkpoint-every` must be >= 1. Received: {self.checkpoint_every}"),
            (not (self.checkpoint and self.fresh_optimizer), "give --checkpoint or --fresh-optimizer, not both"),
            (self.sparse_norm in SPARSE_NORMS,
             f"`--sparse-norm` must be one of {', '.join(SPARSE_NORMS)}. Received: {self.sparse_norm}"),
            (self.fetch_every is None or self.fetch_every >= 1, f"`--fetch-every` must be >= 1. Received: fetch_every={self.fetch_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise OptionError(message)
        if self.lr is not None:
            check_lr(self.lr)

    def lr_at(self, epoch: int, base: float | None = None) -> float:
        """The PTB tutorial's schedule: lr * lr_decay ** max(epoch - decay_after_epoch, 0)."""
        lr = self.lr if base is None else base
        if self.lr_decay is None:
            return lr
        return lr * self.lr_decay ** max(epoch - self.decay_after_epoch, 0)


@dataclass
class RunResult:
    clipping: Clipping
    rows: RowStore  # reads like a list of row dicts
    stopped: str = "finished"  # "finished", "nonfinite" or "interrupted"
    layers: object = None  # diagnose.LayerWatch when per-variable norms were recorded

    @property
    def summary(self) -> dict:
        return summarize(self.rows)


AUTO_BLOCK_SECONDS = 0.25  # --fetch-every auto: aim for one device-to-host fetch per this much training
AUTO_BLOCK_MAX = 1000
LOCKSTEP_BLOCK = 50  # --fetch-every under --strategy multiworker unless given


class Trainer:
    """Holds the model, optimizer and data, and runs one clipping variant at a time.

    Steps run in blocks: one ``tf.function`` call runs a ``tf.while_loop`` of up to N steps,
    pulling batches from a prefetching ``tf.data`` pipeline and keeping each step's values in
    ``TensorArray``s on the device; the host fetches them once per block (``--fetch-every``)
    and still writes one row per step. Each strategy is traced once, with fixed input
    signatures: thresholds, block lengths and learning rates are tensors.
    """

    def __init__(self, model, dataset: data_mod.Dataset, options: TrainOptions, loss=None, mark_input: bool = False,
                 distribution=None):
        self.model = model
        # A tf.distribute strategy (the model's and optimizer's variables made in its scope), or None.
        self.distribution = distribution
        distribute.check_batch(distribution, options.batch_size)
        # --allow-nonfinite-data: every step looks at its own batch for NaN/inf values (the
        # nonfinite_input column), whatever the data's kind (in memory, read where it lies, a
        # record stream in its shuffle buffer's order); otherwise the data was checked before training.
        self.mark_input = mark_input
        self.options = options
        self.loss_source = self._pick_objective(model, loss)
        uses_own_loss = loss is None and model.compiled_loss is None  # the targets go to the model's loss(x, y)
        if uses_own_loss and dataset.w is not None:
            held = "column" if dataset.kind == "csv" else "array"
            raise OptionError(f"{dataset.path} has a {data_mod.SAMPLE_WEIGHT} {held}, but the model's own "
                              "loss(inputs, targets) takes no weights; pass --loss NAME (a Keras loss weighs "
                              f"its rows), or drop the {data_mod.SAMPLE_WEIGHT} {held}")
        target_spec = _second_input(model.own_loss) if uses_own_loss else None
        self.data = data_mod.fit_to_model(dataset, model, target_spec)
        if self.data.w is not None:  # the rows say so too (loss_fn)
            self.loss_source += f", each row weighted by the data's {data_mod.SAMPLE_WEIGHT}"
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

        # Built for every trainable variable, so that no separate trace is needed to find the
        # ones the loss does not reach; those get no gradient and the optimizer never sees them.
        config, source = optimizer_config(options.optimizer, options.lr, options.optimizer_args, model.compiled_optimizer)
        self.optimizer = make_optimizer(config, source, typed=options.optimizer_args)
        self.optimizer_text = describe_optimizer(self.optimizer, source)
        self.scheduled = has_schedule(self.optimizer)  # its own schedule sets the lr of every step
        if self.scheduled and options.lr_decay is not None:
            raise OptionError("the optimizer has its own learning-rate schedule; drop --lr-decay (or set --lr)")
        self.base_lr = None if self.scheduled else _float32_text(self.optimizer.learning_rate.numpy())
        if options.lr is not None:
            self.base_lr = options.lr  # exactly as given, not its float32 rounding
        self.optimizer.build(model.trainable)
        self.loss_scaling = bool(model.loss_scaling)
        import tensorflow as tf

        self._loss_scale = tf.Variable(INITIAL_LOSS_SCALE, dtype=tf.float32, trainable=False, name="loss_scale")
        self._good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="loss_scale_good_steps")
        extras = {"loss_scale": self._loss_scale, "loss_scale_good_steps": self._good_steps}  # checkpointed too
        self.checkpoints = None
        if options.save_checkpoints:
            from .checkpoint import Writer

            self.checkpoints = Writer(options.save_checkpoints, options.checkpoint_every, model.keep_alive,
                                      self.optimizer, extras)
        self.state_text = self._continue_from(model, options, extras)
        # XLA as Keras' fit decides it (jit_compile="auto"): asked for, or on where a GPU is visible.
        self.xla = options.xla if options.xla is not None else bool(tf.config.list_logical_devices("GPU"))
        # Update norms from what the optimizer writes (train.updates), else from a copy of each weight.
        self.follow_writes = updates.follows(self.optimizer, self.distribution)
        self.notes: list[str] = []  # said once on stderr after training (the automatic XLA falling back)
        self.used: list | None = None  # variables with a gradient, known after the first trace
        self.skipped: list[str] = []
        self.traces = 0  # how often a block was traced: once per strategy (tests check it)
        self._state = list(model.variables) + list(self.optimizer.variables) + [self._loss_scale, self._good_steps]
        self._forward_state = forward_state(model.variables)
        self._initial = [v.numpy() for v in self._state]
        self._blocks: dict[tuple, object] = {}
        # Record each variable's norms too (PER_VARIABLE): set before run(); one trace each way.
        self.per_variable = False
        # Keep each variable's raw gradient at every multiple of this step (and the last step),
        # for histograms: set before run(); blocks then end at those steps.
        self.capture_every: int | None = None
        self._captured: list | None = None
        # The batches of every step, built on first use (train/pipeline.py).
        self.pipeline = Pipeline(self.data, options, self.total_steps, self.steps_per_epoch, self.base_lr, distribution,
                                 start=options.start_step)

    # -- set-up -------------------------------------------------------------------------------

    def trace(self, strategy) -> None:
        """Trace the block of ``strategy`` now (errors and unreached variables show up early)."""
        self._block_for(strategy)

    def _block_for(self, strategy):
        """The traced block of ``strategy``: a ``tf.while_loop`` of up to ``n`` steps."""
        capture = self.capture_every is not None
        key = (strategy.name, self.per_variable, capture, self.xla, self.follow_writes)
        if key in self._blocks:
            return self._blocks[key]
        try:
            traced = self._trace_block(strategy, capture)
        except updates.Unfollowed:
            self.follow_writes = False  # trace again, with a copy of each weight before the update
            return self._block_for(strategy)
        self._blocks[key] = traced
        return traced

    def _trace_block(self, strategy, capture):
        import tensorflow as tf

        distribution = self.distribution
        step = self._step_fn(strategy, self.per_variable, capture)
        per_variable = self.per_variable
        if capture and self._captured is None:
            if self.used is None:
                self._find_used()
            with distribute.scope(self.distribution):
                self._captured = [tf.Variable(tf.zeros(v.shape, tf.as_dtype(v.dtype)), trainable=False)
                                  for v in self.used]
        captured = self._captured
        if self.xla:
            # tf.data's iterator cannot be XLA-compiled, the step inside the loop can.
            step = tf.function(step, jit_compile=True, autograph=False)
        learning_rate = None if self.scheduled else self.optimizer.learning_rate

        scheduled = self.scheduled

        def block(iterator, n, param, state, stop_on_nonfinite, capture_at):
            self.traces += 1
            arrays = tuple(tf.TensorArray(tf.as_dtype(dtype), size=n, element_shape=()) for _, dtype in RECORDED)
            if per_variable:  # (4, V) per step; V is known once the step is traced
                arrays += (tf.TensorArray(tf.float32, size=n, element_shape=tf.TensorShape(None)),)
            names = [name for name, _ in RECORDED] + (["per_variable"] if per_variable else [])

            def body(i, state, stop, arrays):
                x, y, lr = iterator.get_next()
                if distribution is not None:
                    lr = distribute.first(distribution, lr)
                if not scheduled:
                    learning_rate.assign(lr)
                values, state = step(x, y, param, state)
                if capture:
                    grads = values.pop("grads")

                    def keep():
                        for buffer, grad in zip(captured, grads):
                            buffer.assign(tf.cast(tf.convert_to_tensor(grad), buffer.dtype))
                        return tf.constant(True)

                    tf.cond(tf.equal(i, capture_at), keep, lambda: tf.constant(False))
                arrays = tuple(a.write(i, values[name]) for a, name in zip(arrays, names))
                return i + 1, state, stop_on_nonfinite & values["nonfinite"], arrays

            def more(i, state, stop, arrays):
                return (i < n) & tf.logical_not(stop)

            done, state, _, arrays = tf.while_loop(more, body, (tf.constant(0), state, tf.constant(False), arrays))
            return done, tuple(a.stack() for a in arrays), state

        traced = tf.function(block, autograph=False)
        state = self._initial_state(strategy)
        tf.random.set_seed(self.options.seed)
        with distribute.scope(self.distribution):
            with _loss_errors():
                iterator = iter(self._batches())
            try:  # the loss's own complaints are DataErrors (_loss_and_grads); the rest of the step is ours
                traced.get_concrete_function(
                    iterator, tf.constant(1), tf.constant(0.0, tf.float64), state, tf.constant(False), tf.constant(-1)
                )
            finally:
                self._drop(iterator)
        return traced

    def _continue_from(self, model, options, extras: dict) -> str:
        """Take over the training state of ``--checkpoint``, or the one the model carries (its
        optimizer's slots and iteration count, so a schedule goes on; a LossScaleOptimizer's
        scale), unless told not to; say which."""
        if options.checkpoint:
            from .checkpoint import restore

            iterations = restore(options.checkpoint, model.keep_alive, model.variables, self.optimizer, extras)
            return (f"model and optimizer state restored from the checkpoint {options.checkpoint} (iteration "
                    f"{iterations})" + _position(iterations, options.start_step))
        saved = model.saved_optimizer
        if saved is None:
            return "fresh optimizer state (the model carries none)" if options.start_step else ""
        iterations = int(saved.iterations.numpy())
        if options.fresh_optimizer:
            return f"fresh optimizer state (--fresh-optimizer; the model's is at iteration {iterations})"
        if options.optimizer is not None:
            return f"fresh optimizer state (--optimizer given; the model's {type(saved).__name__} is at iteration {iterations})"
        restore_optimizer(self.optimizer, saved)
        if model.saved_loss_scale is not None:
            self._loss_scale.assign(model.saved_loss_scale[0])
            self._good_steps.assign(model.saved_loss_scale[1])
        return f"optimizer state restored from the model (iteration {iterations})" + _position(iterations, options.start_step)

    @property
    def variable_names(self) -> tuple[list[str], list[str]]:
        """(variables, layers) of the per-variable records, in the order of their columns."""
        return variable_names(self.used or [])

    @property
    def variable_shapes(self) -> list[tuple]:
        return [tuple(int(d) for d in v.shape) for v in self.used or []]

    def _pick_objective(self, model, loss) -> str:
        """Set ``self.objective(x, y) -> (total loss, regularization part)``; say where it comes from.

        Keras models: the data loss plus ``model.losses`` (regularizers, ``add_loss``), as
        ``fit`` minimises; with their compiled loss, Keras' own ``model.compute_loss``.

        Under a tf.distribute strategy the total follows Keras' convention: each replica's loss
        is its part of the global batch's, so that their sum is the global loss (Keras' mean
        losses divide by the replica count themselves; a model's own ``loss(inputs, targets)``
        and the regularization added here are taken as means and divided here). The
        regularization returned for the record is the replica's own, undivided.
        """

        def share(value):
            import tensorflow as tf

            replicas = tf.distribute.get_strategy().num_replicas_in_sync  # what Keras' losses divide by
            return value if replicas == 1 else value / tf.cast(replicas, value.dtype)

        def extra_loss():
            return None if model.extra_losses is None else regularization(model.extra_losses())

        def weighed(y):  # (targets, sample weights or None): the pipeline's y, or (y, w) (Pipeline.targets)
            return y if isinstance(y, tuple) else (y, None)

        if loss is not None:
            names = model.output_names

            def data_loss(y, y_pred, w):
                return loss(y, y_pred) if w is None else loss(y, y_pred, sample_weight=w)

            def objective(x, y):
                y, w = weighed(y)
                y_pred = model.forward(x)
                reg = extra_loss()
                if names is None:
                    total = data_loss(y, y_pred, w)
                else:  # one loss is every output's, summed, as Keras' compile(loss=NAME) applies it
                    import tensorflow as tf

                    by_name = y_pred if isinstance(y_pred, dict) else dict(zip(names, y_pred))
                    total = tf.add_n([data_loss(y[n], by_name[n], w) for n in names])
                return (total if reg is None else total + share(reg)), reg

            self.objective = objective
            each = "" if names is None else f" on each of the {len(names)} outputs, summed"
            return f"{getattr(loss, 'name', type(loss).__name__)} (--loss){each}"
        if model.compiled_loss is not None:
            def objective(x, y):
                y, w = weighed(y)
                y_pred = model.forward(x)
                return model.compiled_loss(x, y, y_pred, w), extra_loss()

            self.objective = objective
            return "the model's compiled loss"
        if model.own_loss is not None:
            self.objective = lambda x, y: (share(model.own_loss(x, y)), None)
            return "the model's loss(inputs, targets)"
        raise OptionError(
            f"{model.path} brings no loss (no loss(inputs, targets) function, not compiled with one); "
            "pass --loss NAME, e.g. mse or sparse_categorical_crossentropy"
        )

    def _step_fn(self, strategy, per_variable: bool = False, capture: bool = False):
        """One step as a Python function of tensors: tape -> grads -> clip -> apply -> values.

        With ``per_variable``, ``values["per_variable"]`` is a (4, V) float32 matrix (rows as
        PER_VARIABLE): each variable's gradient norm before and after clipping (from the same
        reduction as the global norms), its weight norm before the update, and the norm of
        the change the optimizer made, ‖w_after − w_before‖ (0 on a skipped step).
        With ``capture``, ``values["grads"]`` holds the raw gradients (for histograms).
        """
        import tensorflow as tf

        optimizer = self.optimizer
        scaling = self.loss_scaling
        loss_scale, good_steps = self._loss_scale, self._good_steps

        distribution = self.distribution
        replicas = distribute.replicas(distribution)
        sparse_norm = self.options.sparse_norm
        mark_input = self.mark_input
        # Update norms from the optimizer's writes (train.updates), or from a copy of each weight.
        follow = per_variable and self.follow_writes and distribution is None

        def norms32(tensors):  # each one's L2 norm in float32, from the reduction of the gradient norms
            return norms([tf.cast(t, tf.float32) for t in tensors])[1]

        def measure(x, y, param, state):
            """Everything before the update: on every replica (its share of the batch) under a strategy."""
            loss, reg, grads, used = self._loss_and_grads(x, y)
            if replicas > 1:
                # The global batch's loss and gradient first (each replica's loss is its part of the
                # global one, see _pick_objective): norms and clipping of a replica's own gradient
                # would clip every replica to its own norm, and the update would not be the
                # clipped global gradient.
                context = tf.distribute.get_replica_context()
                loss = context.all_reduce(tf.distribute.ReduceOp.SUM, loss)
                reg = None if reg is None else context.all_reduce(tf.distribute.ReduceOp.MEAN, reg)
                grads = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            m = measured_step(grads, used, strategy, param, state, loss, sparse_norm)
            loss = tf.cast(loss, tf.float32)
            bad_input = tf.constant(False)
            if mark_input:
                bad_input = holds_nonfinite((x, y))
                if replicas > 1:  # any replica's share of the global batch (a SUM: not every all-reduce has MAX)
                    bad_input = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(bad_input, tf.float32)) > 0
            measured = {
                "loss": loss,
                "reg": tf.constant(float("nan")) if reg is None else tf.cast(reg, tf.float32),
                "grad_norm": m.grad_norm,
                "grad_norm_rows": m.grad_norm_rows,
                "clipped_norm": m.clipped_norm,
                "threshold": m.threshold,
                "clipped": m.clipped,
                "grads_finite": m.grads_finite,
                "finite": m.finite,
                "lr": tf.cast(optimizer.learning_rate, tf.float32),  # before the update: the rate this step uses
                "state": m.state,
                "nonfinite_input": bad_input,
            }
            if per_variable:
                measured["grad_norms"] = tf.cast(m.grad_norms, tf.float32)
                measured["clipped_norms"] = tf.cast(m.clipped_norms, tf.float32)
                if follow:
                    measured["weight_norms"] = norms32(used)  # before the update
                else:
                    measured["before"] = [tf.identity(tf.convert_to_tensor(v)) for v in used]
            if capture:
                measured["grads"] = list(m.summed)
            return measured, list(m.apply)

        def apply_share(grads):
            # Keras' update sums the replicas' gradients: each hands on its share of the clipped one.
            optimizer.apply_gradients(zip(distribute.replica_share(grads, replicas), self.used))

        restored = self._forward_state  # put back on a skipped step (BatchNorm's moving statistics)
        on_nonfinite = self.options.on_nonfinite

        def step(x, y, param, state):
            before_forward = [tf.identity(v) for v in restored]  # read before the forward pass updates them
            if distribution is None:
                got, clipped = measure(x, y, param, state)

                def update():
                    if not follow:
                        apply_share(clipped)
                        return tf.constant(True)
                    # the weight norms are read before the update writes in place (no copy-on-write)
                    with tf.control_dependencies([got["weight_norms"]]), updates.recording(self.used) as writes:
                        apply_share(clipped)
                    return writes.norms()
            else:
                per_replica, clipped = distribution.run(measure, args=(x, y, param, state))
                got = distribute.first(distribution, per_replica)  # all-reduced: the same on every replica

                def update():  # a cond in cross-replica context: each replica applies in its own
                    distribution.extended.call_for_each_replica(apply_share, args=(clipped,))
                    return tf.constant(True)

            finite, grads_finite, loss = got["finite"], got["grads_finite"], got["loss"]
            def skip():  # the forward pass's own state goes back too; nothing moved
                for variable, value in zip(restored, before_forward):
                    variable.assign(value)
                return tf.zeros([len(self.used)]) if follow else tf.constant(False)

            moved = tf.cond(applies(finite, on_nonfinite), update, skip)
            scale_used = tf.identity(loss_scale) if scaling else tf.constant(1.0)
            if scaling:
                new_scale, new_good = next_loss_scale(loss_scale, good_steps, grads_finite)
                loss_scale.assign(new_scale)
                good_steps.assign(new_good)
            overflow, nonfinite = nonfinite_kinds(finite, grads_finite, loss, scaling)
            new_state = got["state"]  # the strategy's: measured_step keeps the old one on a non-finite step
            values = {
                "loss": loss,
                "grad_norm": got["grad_norm"],
                "clipped_norm": got["clipped_norm"],
                "threshold": got["threshold"],
                "reg_loss": got["reg"],
                "lr": got["lr"],
                "loss_scale": scale_used,
                "clipped": got["clipped"],
                "overflow": overflow,
                "nonfinite": nonfinite,
                "grad_norm_rows": got["grad_norm_rows"],
                "nonfinite_input": got["nonfinite_input"],
            }
            if per_variable:
                if follow:
                    weight, update = got["weight_norms"], moved
                else:
                    before = got["before"]
                    weight = norms32(before)
                    update = norms32([tf.convert_to_tensor(v) - b for v, b in zip(self.used, before)])
                values["per_variable"] = tf.stack([got["grad_norms"], got["clipped_norms"], weight, update])
            if capture:
                values["grads"] = got["grads"]
            return values, new_state

        return step

    def _loss_and_grads(self, x, y):
        """Loss, its regularization part, and the gradients of the variables it reaches with those
        variables (traced code). With loss scaling (float16 layers) the gradient is that of the
        scaled loss, divided by the scale again before anything looks at it.

        The first trace records which variables get a gradient (``used``) and which do not.
        """
        import tensorflow as tf

        trainable = self.model.trainable
        with _loss_errors():  # only here: an error in the clipping, the optimizer or the records is not the data's
            with tf.GradientTape() as tape:
                loss, reg = self.objective(x, y)
                target = loss * tf.cast(self._loss_scale, loss.dtype) if self.loss_scaling else loss
            if loss.shape.rank not in (0, None):
                raise ModelError(f"the loss must be a scalar, got shape {loss.shape}; reduce it to one number")
            gradients = tape.gradient(target, trainable)
        pairs = [(g, v) for g, v in zip(gradients, trainable) if g is not None]
        if not pairs:
            raise ModelError(f"the loss of {self.model.path} does not depend on any trainable variable; check the endpoint")
        used = [v for _, v in pairs]
        if self.used is None:
            self.used = used
            ids = {id(v) for v in used}
            self.skipped = [_name(v) for v in trainable if id(v) not in ids]
        grads = [g for g, _ in pairs]
        if self.loss_scaling:
            grads = unscale(grads, self._loss_scale)
        return loss, reg, grads, used

    def _initial_state(self, strategy):
        """``strategy.init`` over the variables that get a gradient.

        Stateless strategies (TensorFlow's clippers) return ``()`` whatever the variables; a
        strategy with state needs the used variables before its first trace, found by tracing
        the gradient alone once.
        """
        sized = {"steps": self.total_steps} if getattr(strategy, "takes_steps", False) else {}
        if self.used is None:
            state = strategy.init(self.model.trainable, **sized)
            if state == ():
                return state
            self._find_used()
        return strategy.init(self.used, **sized)

    def _find_used(self) -> None:
        import tensorflow as tf

        def probe(x, y):
            return self._loss_and_grads(x, y)[0]

        x0, y0 = self._batch_specs()
        tf.function(probe, autograph=False).get_concrete_function(x0, y0)

    def _batch_specs(self):
        return self.pipeline.specs()

    def _batches(self):
        return self.pipeline.batches()

    def reset(self) -> None:
        """Put every model and optimizer variable back to its value after set-up."""
        for variable, value in zip(self._state, self._initial):
            variable.assign(value)

    # -- the loop -----------------------------------------------------------------------------

    def run(self, clipping: Clipping, on_rows=None, on_progress=None, on_variables=None, on_capture=None) -> RunResult:
        """Train ``total_steps`` steps with ``clipping`` from the initial weights.

        ``on_rows(rows)`` receives rows as they are fetched; ``on_progress(done, total)`` after.
        With ``per_variable`` on, ``on_variables(rows, norms)`` receives each block's (n, 4, V)
        per-variable norms (PER_VARIABLE; variables as ``variable_names``) beside its rows.
        With ``capture_every`` set, ``on_capture(step, grads)`` receives the raw gradients (NumPy)
        at every multiple of it and at the last step.
        Raises :class:`Interrupted` on Ctrl-C with the rows so far, and
        :class:`~gradwatch.errors.NonFiniteStop` (with ``.result``) for ``--on-nonfinite stop``.
        """
        import tensorflow as tf

        options = self.options
        block = self._block_for(clipping.impl)
        self.reset()
        tf.random.set_seed(options.seed)
        param = tf.constant(clipping.param or 0.0, tf.float64)
        state = self._initial_state(clipping.impl)
        stop_on_nonfinite = tf.constant(options.on_nonfinite == "stop")
        detector = options.spike_rule.detector()
        result = RunResult(clipping, RowStore())
        if self.per_variable:
            from ..diagnose import LayerWatch

            result.layers = LayerWatch(*self.variable_names, rule=options.spike_rule, shapes=self.variable_shapes)
        iterators = [iter(self._batches())]  # in a list, so that _drop can end it wherever the run ends
        # Workers of a multi-worker run meet in every step's all-reduce: their blocks must have
        # the same lengths, which timing-based sizes would not give.
        auto = options.fetch_every is None and not distribute.is_multi_worker(self.distribution)
        size = options.fetch_every or (1 if auto else LOCKSTEP_BLOCK)
        try:
            return self._train(clipping, result, iterators, block, param, state, stop_on_nonfinite, detector, auto, size,
                               on_rows, on_progress, on_variables, on_capture)
        finally:  # finished, interrupted, stopped or failed: end the pipeline's threads, then drop the iterator
            self._drop(iterators.pop())

    def _drop(self, iterator) -> None:
        """Let go of a tf.data iterator without the hang of pipeline._Guard (quiesce first)."""
        self.pipeline.quiesce()
        del iterator

    def _train(self, clipping, result, iterators, block, param, state, stop_on_nonfinite, detector, auto, size,
               on_rows, on_progress, on_variables, on_capture) -> RunResult:
        """The loop of :meth:`run` over blocks of steps."""
        import tensorflow as tf

        options = self.options
        try:
            with deferred_interrupt() as interrupted:
                while len(result.rows) < self.total_steps and not interrupted():
                    size = min(size, self.total_steps - len(result.rows))
                    if self.capture_every:  # end the block where a histogram is due
                        size = min(size, self.capture_every - len(result.rows) % self.capture_every)
                    if self.checkpoints is not None:  # ... and where a checkpoint is due (absolute steps)
                        every, at = self.checkpoints.every, options.start_step + len(result.rows)
                        size = min(size, every - at % every)
                    start = time.perf_counter()
                    ends = len(result.rows) + size
                    due = self.capture_every and (ends == self.total_steps or ends % self.capture_every == 0)
                    capture_at = tf.constant(size - 1 if due else -1)  # keep the gradients of this block's last step
                    try:
                        done, arrays, state = block(iterators[0], tf.constant(size), param, state, stop_on_nonfinite,
                                                    capture_at)  # no local name: _drop holds the only reference
                    except Exception as exc:
                        first = options.start_step + len(result.rows) + 1
                        where = f"step {first}" if size == 1 else f"steps {first} to {first + size - 1}"
                        _raise_unread(exc, self.pipeline.guard.failed, where)
                        _raise_bad_id(exc, where)
                        if not (self.xla and not result.rows and _xla_failed(exc)):
                            raise
                        if options.xla:  # asked for: say why, and what to do
                            raise OptionError(f"--xla: XLA cannot compile this model's training step "
                                              f"({_xla_reason(exc)}); drop --xla") from None
                        self.xla = False  # the automatic default falls back, once, and says so
                        self.notes.append(f"XLA cannot compile this model's training step ({_xla_reason(exc)}); "
                                          "trained without it")
                        return self.run(clipping, on_rows, on_progress, on_variables, on_capture)
                    done = int(done)
                    columns = [a.numpy()[:done].tolist() for a in arrays[: len(RECORDED)]]
                    seconds = (time.perf_counter() - start) / max(done, 1)
                    rows = self._rows(options.start_step + len(result.rows), columns, detector, seconds * 1000.0)
                    result.rows.extend(rows)
                    if on_rows:
                        on_rows(rows)
                    last = len(result.rows)
                    if on_capture and done == size and (last == self.total_steps or last % self.capture_every == 0):
                        on_capture(options.start_step + last, [b.numpy() for b in self._captured])
                    if self.per_variable:
                        per = arrays[len(RECORDED)].numpy()[:done]
                        result.layers.update(rows, per)
                        if on_variables:
                            on_variables(rows, per)
                    if self.checkpoints is not None and done == size:
                        at = options.start_step + len(result.rows)
                        if self.checkpoints.due(at):
                            self.checkpoints.write(at)
                    if on_progress:
                        on_progress(len(result.rows), self.total_steps)
                    if rows and rows[-1]["nonfinite"] and options.on_nonfinite == "stop":
                        raise self._nonfinite_stop(result)
                    if auto:
                        size = _next_block(size, seconds)
                if interrupted():
                    raise Interrupted([result], interrupted())
        except Interrupted:
            result.stopped = "interrupted"
            raise
        except KeyboardInterrupt as stop:  # outside a block (e.g. in a callback): stop as well
            result.stopped = "interrupted"
            raise Interrupted([result], getattr(stop, "signum", 2)) from None
        return result

    @staticmethod
    def _nonfinite_stop(result: RunResult) -> NonFiniteStop:
        result.stopped = "nonfinite"
        error = NonFiniteStop(
            f"step {result.rows[-1]['step']}: loss or gradient is not finite; stopped as --on-nonfinite stop "
            "asks (use --on-nonfinite skip to go on, or lower --lr / clip harder)"
        )
        error.result = result
        return error

    def _rows(self, before: int, columns, detector, time_ms: float) -> list[dict]:
        """One row per step of a fetched block; step numbers continue after ``before``."""
        rows = []
        names = [name for name, _ in RECORDED]
        for k, values in enumerate(zip(*columns)):
            got = dict(zip(names, values))
            step_no = before + k + 1
            epoch = (step_no - 1) // self.steps_per_epoch + 1
            loss, grad_norm, clipped_norm = got["loss"], got["grad_norm"], got["clipped_norm"]
            lr = _float32_text(got["lr"]) if self.scheduled else float(self.options.lr_at(epoch, self.base_lr))
            rows.append({
                "step": step_no,
                "epoch": epoch,
                "loss": loss,
                "reg_loss": got["reg_loss"],
                "grad_norm": grad_norm,
                "grad_norm_rows": got["grad_norm_rows"],
                "clipped_norm": clipped_norm,
                "clip_ratio": clip_ratio(grad_norm, clipped_norm),
                "clipped": got["clipped"],
                "threshold": got["threshold"],
                "lr": lr,
                "loss_scale": got["loss_scale"],
                "overflow": got["overflow"],
                "nonfinite": got["nonfinite"],
                "nonfinite_input": got["nonfinite_input"],
                "loss_spike": detector.update(loss),
                "time_ms": time_ms,
            })
        return rows

    def rows_of_step(self, step_no: int) -> np.ndarray:
        """The data rows step ``step_no`` trained on (1-based, as the rows count it): those of data.batches."""
        epoch, k = (step_no - 1) // self.steps_per_epoch + 1, (step_no - 1) % self.steps_per_epoch
        if getattr(self, "_order_epoch", None) != epoch:
            self._order = data_mod.epoch_order(len(self.data), epoch, self.options.shuffle, self.options.seed)
            self._order_epoch = epoch
        size = self.options.batch_size
        return self._order[k * size:(k + 1) * size]

    def data_view(self):
        """What the findings may read of the data (diagnose.findings.DataView); None for data
        read as a stream, which is not in memory to compare rows with."""
        from ..diagnose.findings import DataView

        return None if self.data.streamed else DataView(self.rows_of_step, self.data.x, self.data.y)


def holds_nonfinite(batch):
    """Does a batch (any structure of tensors) hold a NaN or inf? Integer and text tensors cannot."""
    import tensorflow as tf

    floats = [t for t in tf.nest.flatten(batch) if t.dtype.is_floating]
    if not floats:
        return tf.constant(False)
    return tf.logical_not(tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in floats]))


def _position(iterations: int, start_step: int) -> str:
    """What the start line adds when the restored iteration count and the data position disagree."""
    if start_step == iterations:
        return ""
    return (f"; its iteration count is {iterations} but the data starts at step {start_step + 1} (--start-step "
            f"{start_step}): give --start-step {iterations} to continue where it stopped")


def _raise_unread(exc, failed, where: str) -> None:
    """Data that could not be read while training (the file was cut short, changed or removed
    under the run) is the data's fault, not an unexpected error: gradwatch's own error from the
    pipeline's reader (``failed``), or TensorFlow's for a record stream's files."""
    import tensorflow as tf

    if failed is not None:
        raise DataError(f"the data of {where} could not be read: {failed}") from None
    if isinstance(exc, (tf.errors.DataLossError, tf.errors.NotFoundError)):
        raise DataError(f"the data of {where} could not be read ({_op_reason(exc)}); was the file changed or removed "
                        "while the run read it?") from None


def _op_reason(exc) -> str:
    """What a TensorFlow op error says happened: its first line that is not the frame around it
    ("Graph execution error:", "Detected at node ...", stack lines, node names)."""
    frame = ("Graph execution error", "Detected at node", "<stack traces unavailable>", "File ", "[[")
    for line in str(getattr(exc, "message", exc)).splitlines():
        line = line.strip()
        if line and not line.startswith(frame):
            return line[:200]
    return first_line(exc)


def _raise_bad_id(exc, where: str) -> None:
    """An id the model cannot look up is the data's fault, not an unexpected error: say which id,
    what the model has room for, and what to check. Two kinds, as TensorFlow reports them on a
    CPU (on a GPU neither raises, and nothing after the fact can see them):

    * an id outside a lookup table (an Embedding's rows, a tf.gather): the lookup returns zeros
      on a GPU;
    * a class id outside the model's classes, reaching a sparse cross-entropy that the check
      before training does not know by name (a SavedModel's own ``loss``): NaN on a GPU,
      recorded as a non-finite step. The words are those of the check before training.
    """
    import re

    text = str(exc)
    found = re.search(r"indices\[[^\]]*\] = (-?\d+) is not in \[0, (\d+)\)", text)
    if found:
        index, rows = found.groups()
        raise DataError(f"the data of {where} holds the id {index}, but the model's lookup table (an Embedding, a tf.gather) has {rows} rows, "
                        f"ids 0 to {int(rows) - 1}: give the vocabulary the model was trained with (--vocab) or ids "
                        f"below {rows}") from None
    found = re.search(r"Received a label value of (-?\d+) which is outside the valid range of \[0, (\d+)\)", text)
    if found:
        label, classes = found.groups()
        raise DataError(f"the data of {where} holds the class id {label}, outside [0, {classes}) (the model's last "
                        f"output dimension is {classes}); fix the labels or the model's number of outputs") from None


def _xla_failed(exc) -> bool:
    """Is this TensorFlow's error for a step that XLA cannot compile?"""
    text = str(exc)
    return ("tf2xla" in text or "XLA compilation requires" in text or "compile-time constant" in text
            or "XLA can't" in text or "not supported by XLA" in text)


def _xla_reason(exc) -> str:
    import re

    text = str(exc)
    found = re.search(r"with op (\w+) must be a compile-time constant", text)
    if found:
        return f"its {found.group(1)} op needs a shape XLA cannot know at compile time"
    found = re.search(r"(Detected unsupported operations[^.]*|[^.]*not supported by XLA[^.]*)", text)
    return found.group(1).strip()[:160] if found else first_line(exc)[:160]


def restore_optimizer(optimizer, saved) -> None:
    """Copy a trained Keras optimizer's variables (iteration count, slots) into ``optimizer``,
    built for the same variables; a one-line error when they do not match."""
    from ..errors import ModelError

    ours, theirs = list(optimizer.variables), list(saved.variables)
    mismatch = len(ours) != len(theirs) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(ours, theirs))
    if type(optimizer) is not type(saved) or mismatch:
        raise ModelError(
            f"the model's saved {type(saved).__name__} state ({len(theirs)} variables) does not fit the "
            f"{type(optimizer).__name__} gradwatch builds for its trainable variables ({len(ours)}); "
            "add --fresh-optimizer to start it over"
        )
    for a, b in zip(ours, theirs):
        a.assign(b.numpy())


def _float32_text(value: float) -> float:
    """A float32 read back as the decimal it was written as (0.001, not 0.0010000000474974513)."""
    return float(str(np.float32(value)))


def _next_block(size: int, seconds_per_step: float) -> int:
    """--fetch-every auto: grow the block (at most doubling) towards AUTO_BLOCK_SECONDS."""
    if seconds_per_step <= 0:
        return min(size * 2, AUTO_BLOCK_MAX)
    wanted = int(AUTO_BLOCK_SECONDS / seconds_per_step)
    return max(1, min(wanted, size * 2, AUTO_BLOCK_MAX))


@contextmanager
def _loss_errors():
    """Tracing the loss on the data: TF's shape and dtype complaints become one DataError line."""
    try:
        yield
    except (GradwatchError, updates.Unfollowed):
        raise
    except Exception as exc:  # TF raises ValueError/TypeError/InvalidArgumentError for mismatches
        raise DataError(
            f"the model cannot compute the loss on this data: {first_line(exc)}; check --loss, --target and the shapes"
        ) from None


def compare(trainer: Trainer, variants: list[Clipping], on_rows=None, on_progress=None, on_stop=None,
            on_variables=None, on_capture=None) -> list[RunResult]:
    """Run every variant from the same initial state on the same batches, one after another.

    With ``--on-nonfinite stop`` a variant that meets a non-finite step stops there (its result
    says ``stopped == "nonfinite"``, ``on_stop(clipping, error)`` is told) and the others still run.
    """
    results: list[RunResult] = []
    for clipping in variants:
        forward = (lambda rows, c=clipping: on_rows(c, rows)) if on_rows else None
        progress = (lambda done, total, c=clipping: on_progress(c, done, total)) if on_progress else None
        per_variable = (lambda rows, norms, c=clipping: on_variables(c, rows, norms)) if on_variables else None
        capture = (lambda step, grads, c=clipping: on_capture(c, step, grads)) if on_capture else None
        try:
            results.append(trainer.run(clipping, forward, progress, per_variable, capture))
        except NonFiniteStop as stop:
            results.append(stop.result)
            if on_stop:
                on_stop(clipping, stop)
        except Interrupted as stop:
            raise Interrupted(results + stop.results, stop.signum) from None
        except KeyboardInterrupt as stop:  # between two variants: keep the finished ones
            raise Interrupted(results, getattr(stop, "signum", 2)) from None
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


def variable_names(variables) -> tuple[list[str], list[str]]:
    """(variable, layer) names for the per-variable records: the variable's path without a
    ``:0`` suffix (made unique with ``#2``, ``#3`` where two share one), and its layer: the
    path without its last part (a variable outside any layer is its own layer)."""
    names, seen = [], {}
    for v in variables:
        name = _name(v)
        name = name[:-2] if name.endswith(":0") else name
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    layers = [n.split("#")[0].rsplit("/", 1)[0] for n in names]
    return names, layers
