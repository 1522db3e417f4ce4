"""GradientWatch: gradwatch inside the user's own ``model.fit``.

    watch = GradientWatch(clip="global", norm=5.0, csv="run.csv", tensorboard="logs/")
    model.compile(optimizer=watch.wrap(keras.optimizers.AdamW(1e-3)), loss=...)
    model.fit(ds, epochs=3, callbacks=[watch])
    watch.rows          # DataFrame: the CLI's per-step columns
    watch.summary()     # the CLI's summary and verdict

``wrap`` returns the same optimizer object with its ``apply`` and ``scale_loss`` watched (its
config, state and saving are untouched): inside Keras' compiled train step it takes the
gradients Keras computed and runs gradwatch's one measured step on them
(:func:`gradwatch.train.step.measured_step`, the trainer's own: norms, the chosen strategy,
the non-finite rule, the raw embedding rows handed on), then hands the result to the
optimizer's own ``apply``. ``scale_loss`` sees each step's loss before Keras scales
it, and so does the model's ``compute_loss`` while fit runs (a train_step of one's own calls
that one); a step whose loss neither saw records NaN, and only its gradient decides whether it
is finite. The values go to a ring buffer on the device (``capacity`` rows) behind a counter that only
grows; the callback reads the rows since its last read after each execution. It declares itself
``async_safe``, so Keras may run it in a worker thread while the next execution trains: no
extra host sync at all, and the rows still come one per step, in order. With ``clip="global"``
the weights are those of the same fit with the optimizer's ``global_clipnorm`` (``norm`` ~
``clipnorm``, ``value`` ~ ``clipvalue``). A non-finite step is skipped whole by default, as in
gradwatch's own training (``on_nonfinite``); under mixed precision the ``LossScaleOptimizer``
that ``compile`` adds is watched instead, so the unscaled gradient is measured. Under a
``tf.distribute`` strategy the gradients are all-reduced before they are measured and clipped.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from .api import Summary, clipping_of, summarize, typed
from .train import distribute
from .clip import map_values
from .errors import GradwatchError, OptionError, counted, refuse_blank
from .objective import describe_optimizer, refuse_hidden_options, regularization
from .train.step import ON_NONFINITE, SPARSE_NORMS, applies, forward_state, measured_step, nonfinite_kinds, unscale
from .diagnose.spikes import SpikeRule
from .record.rows import COLUMNS, CSV_COLUMNS, RowStore, clip_ratio
from .signals import PendingInterrupt, signal_name

# What the watched apply writes per step into the device buffer, in this order.
_BUFFERED = ("loss", "reg_loss", "grad_norm", "grad_norm_rows", "clipped_norm", "threshold", "lr", "clipped",
             "nonfinite", "loss_scale", "overflow")
class GradientWatch(keras.callbacks.Callback):
    """Optimizer wrapper (``wrap``) and callback in one: records every step of ``fit``."""

    def __init__(self, clip: str = "global", norm=None, value=None, factor=None, percentile=None, z=None,
                 csv=None, tensorboard=None, spike_factor: float = 2.0, spike_window: int = 20, spike_floor: float = 0.01, capacity: int = 1024,
                 on_nonfinite: str = "skip", sparse_norm: str = "summed"):
        super().__init__()
        for name, given in (("clip", clip), ("csv", csv), ("tensorboard", tensorboard)):
            refuse_blank(name, given)  # csv="" would be the folder '.', tensorboard=" " a folder named by a space
        self.clipping = clipping_of(clip, norm=norm, value=value, factor=factor, percentile=percentile, z=z)
        self.impl = self.clipping.impl
        if on_nonfinite not in ON_NONFINITE:
            raise OptionError(f"`on_nonfinite` must be one of {', '.join(ON_NONFINITE)}. Received: {on_nonfinite!r}")
        if sparse_norm not in SPARSE_NORMS:
            raise OptionError(f"`sparse_norm` must be one of {', '.join(SPARSE_NORMS)}. Received: {sparse_norm!r}")
        self.on_nonfinite, self.sparse_norm = on_nonfinite, sparse_norm
        self.rule = SpikeRule(factor=typed("spike_factor", spike_factor, "float"),
                              window=typed("spike_window", spike_window, "int"),
                              floor=typed("spike_floor", spike_floor, "float"))
        self.csv, self.tensorboard = csv, tensorboard
        self.capacity = typed("capacity", capacity, "int")
        if self.capacity < 1:
            raise OptionError(f"`capacity` must be >= 1. Received: capacity={capacity}")
        self._rows = RowStore()
        self._buffer = _variable(tf.zeros([self.capacity, len(_BUFFERED)], tf.float64), "gradwatch_rows")
        self._count = _variable(tf.constant(0, tf.int64), "gradwatch_count")  # rows ever written
        self._fetched = 0  # rows ever read back
        self._lock = threading.Lock()  # Keras may call the batch hooks from several worker threads
        self._interrupt = PendingInterrupt(lambda frame: _inside_fit(frame, self.model))
        self.async_safe = True
        self._loss = _variable(tf.constant(float("nan"), tf.float32), "gradwatch_loss")
        self._loss_seen = _variable(tf.constant(False), "gradwatch_loss_seen")  # this step's loss came
        # the regularization part of this step's loss (model.losses), where compute_loss computed it
        self._reg = _variable(tf.constant(float("nan"), tf.float32), "gradwatch_reg_loss")
        self._compute_loss = None  # the model's own compute_loss while fit runs (see _watch_compute_loss)
        self._weighing = set()  # of every traced training step: were its rows weighted (fit's sample_weight)?
        self._state_vars = None  # the strategy's state as variables, made in on_train_begin
        self._optimizer = None  # the optimizer wrap() was given
        self._outer = None  # a LossScaleOptimizer around it (mixed precision), watched in its place
        self._forward = []  # the model's non-trainable state a skipped step puts back (train.step.forward_state)
        self._shadow = []  # their values after the last applied step
        self._sink = self._board = None
        self._detector = self.rule.detector()
        self._epoch = 1
        self._started = None

    # -- the optimizer side ---------------------------------------------------------------------

    def wrap(self, optimizer):
        """Watch ``optimizer`` (a Keras 3 optimizer, or a LossScaleOptimizer); returns the same object."""
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise OptionError(f"wrap() takes a keras.optimizers.Optimizer, got {type(optimizer).__name__}")
        if getattr(optimizer, "_gradwatch", None) is not None:
            raise OptionError("this optimizer is already watched by a GradientWatch")
        inner = getattr(optimizer, "inner_optimizer", None) or optimizer
        clipping = [name for name in ("clipnorm", "global_clipnorm", "clipvalue") if getattr(inner, name, None)]
        if clipping:
            raise OptionError(f"the optimizer clips by itself ({', '.join(clipping)}); leave that unset: GradientWatch "
                              f"clips with clip={self.clipping.strategy!r}")
        refuse_hidden_options(optimizer, "the optimizer")
        self._optimizer = optimizer
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            self._watch_scaled(optimizer)
        else:
            self._watch(optimizer)
        optimizer._gradwatch = self
        return optimizer

    def _watch(self, optimizer):
        inner_apply, inner_scale = optimizer.apply, optimizer.scale_loss

        def scale_loss(loss):
            if self._outer is None:
                self._record_loss(loss)
            return inner_scale(loss)

        def apply(grads, trainable_variables=None):
            if self._outer is not None:  # a LossScaleOptimizer around it measured this step already
                return inner_apply(grads, trainable_variables)
            return self._apply(inner_apply, optimizer, grads, trainable_variables, scaled_by=None)

        optimizer.apply, optimizer.scale_loss = apply, scale_loss

    def _watch_scaled(self, outer):
        """Mixed precision: watch the LossScaleOptimizer, so that what is measured and clipped is
        the unscaled gradient; it still skips overflowing steps and adjusts its scale itself."""
        outer_apply, outer_scale = outer.apply, outer.scale_loss

        def scale_loss(loss):
            self._record_loss(loss)
            return outer_scale(loss)

        def apply(grads, trainable_variables=None):
            if not outer.built:
                with keras.name_scope(outer.name, caller=outer):
                    outer.build(trainable_variables)
                outer.built = True
            return self._apply(outer_apply, outer, grads, trainable_variables, scaled_by=outer.dynamic_scale)

        outer.apply, outer.scale_loss = apply, scale_loss
        self._outer = outer

    def _record_loss(self, loss):
        # Under a tf.distribute strategy each replica's loss is its share of the global
        # batch's (Keras divides by the replica count): their sum is the global batch's loss.
        self._loss.assign(_all_reduced(tf.cast(loss, tf.float32)))
        self._loss_seen.assign(True)

    def _watch_compute_loss(self, model):
        """Record the loss a train step computes with ``self.compute_loss`` too: a train_step of
        one's own (Keras' guide to customising fit) calls it, but not ``optimizer.scale_loss``,
        which fit's own step calls after it with the same value. Training calls only: fit's
        validation calls it with training=False. Put back when the fit ends (:meth:`_finish`)."""
        if self._compute_loss is not None or "compute_loss" in vars(model):
            return
        own = model.compute_loss

        def compute_loss(*args, **kwargs):
            loss = own(*args, **kwargs)
            training = kwargs.get("training", args[4] if len(args) > 4 else True)
            if loss is not None and training is True:
                self._record_loss(loss)
                # seen while the step is traced: fit gives sample_weight (or class_weight, as weights)
                self._weighing.add(kwargs.get("sample_weight", args[3] if len(args) > 3 else None) is not None)
                # its regularization part, as gradwatch's own step records it: each replica's own,
                # their mean under a strategy (Keras divides only the total by the replica count)
                self._reg.assign(_all_reduced(regularization(model.losses)) / _replicas())
            return loss

        model.compute_loss, self._compute_loss = compute_loss, compute_loss

    def _unwatch_compute_loss(self):
        model = self.model
        if self._compute_loss is not None and model is not None and vars(model).get("compute_loss") is self._compute_loss:
            del model.compute_loss
        self._compute_loss = None

    def _apply(self, hand_on, optimizer, grads, variables, scaled_by):
        grads = list(grads)
        variables = list(variables) if variables is not None else list(optimizer._trainable_variables)
        used = [k for k, g in enumerate(grads) if g is not None]
        if self._state_vars is None:
            raise GradwatchError("GradientWatch records through its callback: pass it to fit(callbacks=[watch])")
        replicas = _replicas()
        watched = [grads[k] for k in used]
        used_variables = [variables[k] for k in used]
        scale = None if scaled_by is None else tf.identity(tf.cast(scaled_by, tf.float32))  # before it changes
        if scale is not None:
            watched = unscale(watched, scale)
        if replicas > 1:
            # The global gradient first: norms and clipping of each replica's own gradient would
            # clip every replica to its own norm, and the update would not be the clipped global
            # gradient (the trap of Keras' clipnorm under a strategy, tensorflow issue 33929).
            watched = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, watched)
        state = tf.nest.map_structure(lambda v: v.read_value(), self._state_vars)
        lr = tf.cast(optimizer.learning_rate, tf.float64)  # before the update: the rate this step uses
        # A step whose loss was not seen (a train_step of one's own that calls neither) records
        # NaN, and only its gradient decides whether it is finite: a missing loss skips nothing.
        seen = self._loss_seen.read_value()
        loss = tf.where(seen, self._loss.read_value(), tf.constant(float("nan")))
        judged = tf.where(seen, loss, tf.constant(0.0))
        m = measured_step(watched, used_variables, self.impl, tf.constant(self.clipping.param or 0.0, tf.float64),
                          state, judged, self.sparse_norm)
        tf.nest.map_structure(lambda v, new: v.assign(new), self._state_vars, m.state)
        overflow, nonfinite = nonfinite_kinds(m.finite, m.grads_finite, judged, scale is not None)
        self._loss_seen.assign(False)
        reg = self._reg.read_value()
        self._reg.assign(tf.constant(float("nan")))  # a step that does not call compute_loss records NaN
        values = {"loss": loss, "reg_loss": reg, "grad_norm": m.grad_norm, "grad_norm_rows": m.grad_norm_rows,
                  "clipped_norm": m.clipped_norm, "threshold": m.threshold, "lr": lr, "clipped": m.clipped,
                  "nonfinite": nonfinite, "loss_scale": 1.0 if scale is None else scale, "overflow": overflow}
        row = tf.stack([tf.cast(values[name], tf.float64) for name in _BUFFERED])  # by name: the order is _BUFFERED's
        self._buffer.assign(tf.tensor_scatter_nd_update(self._buffer, [[self._count % self.capacity]], row[None]))
        self._count.assign_add(1)
        out = distribute.replica_share(m.apply, replicas)
        if scale is not None:
            # The LossScaleOptimizer unscales what it gets, skips a non-finite step and halves its scale.
            out = [map_values(g, lambda t: t * tf.cast(scale, t.dtype)) for g in out]
            go = m.finite
            hand_on(out, used_variables)
        else:
            go = applies(m.finite, self.on_nonfinite)
            distribute.when(go, hand_on, None, args=(out, used_variables))
        if self._forward:
            distribute.when(go, self._keep_forward_state, self._put_back_forward_state)

    def _keep_forward_state(self):
        for shadow, variable in zip(self._shadow, self._forward):
            shadow.assign(variable)

    def _put_back_forward_state(self):
        for shadow, variable in zip(self._shadow, self._forward):
            variable.assign(shadow)

    # -- the callback side ---------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        compiled = self.model.optimizer
        if (self._optimizer is not None and compiled is not self._optimizer and self._outer is None
                and getattr(compiled, "inner_optimizer", None) is self._optimizer):
            # compile() put the watched optimizer inside a LossScaleOptimizer (mixed_float16): watch
            # that one, so that the gradient measured and clipped is the unscaled one.
            self._watch_scaled(compiled)
        watched = self._optimizer if self._outer is None else self._outer
        if self._optimizer is None or compiled is not watched:
            raise GradwatchError("compile the model with optimizer=watch.wrap(optimizer) before fit(callbacks=[watch])")
        per_execution = int(getattr(self.model, "steps_per_execution", 1) or 1)
        if per_execution > self.capacity:
            raise GradwatchError(f"steps_per_execution={per_execution} is more than GradientWatch(capacity="
                                 f"{self.capacity}); raise capacity")
        if self._state_vars is None:
            # Made once: a later fit goes on with the same history (AutoClip's percentiles are over
            # every step this watch has seen, up to 65,536, then a ring of the most recent).
            with tf.init_scope(), self.model.distribute_strategy.scope():
                initial = self.impl.init(list(self.model.trainable_variables))
                self._state_vars = tf.nest.map_structure(lambda t: _variable(t, "gradwatch_state"), initial)
                self._forward = forward_state(self.model.variables)
                self._shadow = [_variable(tf.convert_to_tensor(v), "gradwatch_forward_state") for v in self._forward]
        else:  # the weights may have changed between two fits
            for shadow, variable in zip(self._shadow, self._forward):
                shadow.assign(tf.convert_to_tensor(variable))
        if self.csv is not None and self._sink is None:
            from .record.sinks import CsvSink

            self._sink = CsvSink(self.csv, CSV_COLUMNS)
        if self.tensorboard is not None and self._board is None:
            from .record.tensorboard import TensorBoardSink, check_logdir
            from pathlib import Path

            check_logdir(Path(self.tensorboard))
            self._board = TensorBoardSink(Path(self.tensorboard), self.clipping.strategy, self.clipping.param, [])
        self._watch_compute_loss(self.model)
        self._started = time.perf_counter()
        self._interrupt.install()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch + 1

    # A Ctrl-C, SIGTERM or SIGHUP during fit is acted on from the hooks Keras calls in the main
    # thread, before the next step or at an epoch's end (the batch-end hooks may run in Keras'
    # worker threads).
    def on_train_batch_begin(self, batch, logs=None):
        self._interrupt.raise_if_pending(self._stopped)

    def on_test_batch_begin(self, batch, logs=None):  # fit's validation: a signal there stops fit too
        self._interrupt.raise_if_pending(self._stopped)

    def on_epoch_end(self, epoch, logs=None):
        self._interrupt.raise_if_pending(self._stopped)

    def on_train_batch_end(self, batch, logs=None):
        self._fetch()

    def on_train_end(self, logs=None):
        self._interrupt.uninstall()
        self._finish()

    def _stopped(self, signum: int) -> None:
        """A Ctrl-C, SIGTERM or SIGHUP during fit: keep every row; a signal that is about to end
        the process says on stderr where they are (Ctrl-C raises and tells the caller itself)."""
        sink = self._sink
        self._finish()
        if signum != signal.SIGINT:
            kept = (f"kept {counted(sink.rows_written, 'recorded row')} in {sink.path}" if sink is not None else
                    f"{counted(len(self._rows), 'row')} recorded and not kept (GradientWatch(csv=...) keeps them in a file)")
            sys.stderr.write(f"gradwatch: fit stopped by {signal_name(signum)}; {kept}\n")
            sys.stderr.flush()

    def _finish(self) -> None:
        """The end of a fit, finished or stopped by a signal: every row fetched, the CSV put in place."""
        self._unwatch_compute_loss()
        self._fetch()
        if self._sink is not None:
            self._sink.commit()
            self._sink = None
        if self._board is not None:
            self._board.close()
            self._board = None

    def _fetch(self) -> None:
        with self._lock:
            self._fetch_locked()

    def _fetch_locked(self) -> None:
        written = int(self._count.numpy())  # read before the buffer: every row below it is complete
        n = written - self._fetched
        if n <= 0:
            return
        if n > self.capacity:
            raise GradwatchError(f"{n} steps ran between two reads of GradientWatch's buffer, more than its "
                                 f"capacity={self.capacity}; raise capacity")
        values = self._buffer.numpy()[[(self._fetched + k) % self.capacity for k in range(n)]]
        self._fetched = written
        now = time.perf_counter()
        time_ms = (now - self._started) * 1000.0 / n
        self._started = now
        rows = []
        for got in values.tolist():
            got = dict(zip(_BUFFERED, got))
            loss, grad_norm, clipped_norm = float(np.float32(got["loss"])), got["grad_norm"], got["clipped_norm"]
            rows.append({
                "step": len(self._rows) + len(rows) + 1, "epoch": self._epoch, "loss": loss,
                "reg_loss": float(np.float32(got["reg_loss"])),
                "grad_norm": grad_norm, "grad_norm_rows": got["grad_norm_rows"], "clipped_norm": clipped_norm,
                "clip_ratio": clip_ratio(grad_norm, clipped_norm), "clipped": bool(got["clipped"]),
                "threshold": got["threshold"], "lr": float(np.float32(got["lr"])),
                "loss_scale": float(np.float32(got["loss_scale"])), "overflow": bool(got["overflow"]),
                "nonfinite": bool(got["nonfinite"]), "nonfinite_input": False,
                "loss_spike": self._detector.update(loss), "time_ms": time_ms,
            })
        if self.on_nonfinite == "stop" and any(r["nonfinite"] for r in rows):
            self.model.stop_training = True  # after the batch that showed it (its update was skipped)
        self._rows.extend(rows)
        meta = self._meta()
        if self._sink is not None:
            self._sink.write([{"clip": self.clipping.strategy, "param": self.clipping.param, **r, **meta} for r in rows])
        if self._board is not None:
            self._board.write(rows)

    def _meta(self) -> dict:
        optimizer = getattr(self._optimizer, "inner_optimizer", None) or self._optimizer
        text = describe_optimizer(optimizer, "the wrapped optimizer of model.fit")
        return {"model": f"keras.Model {self.model.name}", "data": "model.fit", "optimizer": text,
                "loss_fn": "the model's compiled loss (model.fit)" + _WEIGHING.get(frozenset(self._weighing), ""),
                "sparse_norm": self.sparse_norm}

    # -- results -------------------------------------------------------------------------------

    @property
    def rows(self):
        """Every recorded step as a DataFrame with the CLI's columns (record.rows.CSV_COLUMNS)."""
        import pandas as pd

        meta = self._meta() if self.model is not None and self._optimizer is not None else {}
        frame = pd.DataFrame([{"clip": self.clipping.strategy, "param": self.clipping.param, **r, **meta}
                              for r in self._rows], columns=CSV_COLUMNS)
        frame["param"] = frame["param"].astype("float64")
        return frame

    def summary(self) -> Summary:
        """The CLI's summary table, findings and verdict of the recorded steps (api.Summary)."""
        if not len(self._rows):
            raise GradwatchError("no step recorded yet: run model.fit(..., callbacks=[watch]) first")
        return summarize(self.rows, self.rule)


def _variable(initial, name: str):
    """A variable every replica may assign the same value to (the first replica's is kept)."""
    return tf.Variable(initial, trainable=False, name=name, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


# What the rows' loss_fn adds for the weighting its traced steps saw (none seen: nothing to add).
_WEIGHING = {frozenset({True}): ", each row weighted by fit's sample_weight (or class_weight)",
             frozenset({True, False}): ", in some fits weighted by their sample_weight (or class_weight)"}


def _replicas() -> int:
    context = tf.distribute.get_replica_context()
    return context.num_replicas_in_sync if context is not None else 1


def _all_reduced(value):
    """The sum over the replicas of a tf.distribute strategy (the value itself on one device)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def _inside_fit(frame, model) -> bool:
    """Whether ``model.fit`` is on the stack that ``frame`` (where a signal came) belongs to."""
    while frame is not None:
        if frame.f_code.co_name == "fit" and frame.f_locals.get("self") is model:
            return True
        frame = frame.f_back
    return False


__all__ = ["GradientWatch", "COLUMNS"]

