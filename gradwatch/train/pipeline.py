"""The batches of every step as a prefetching ``tf.data`` pipeline: ``(x, y, learning rate)``.

Batch k of epoch e holds rows ``data.epoch_order(e)[k*B:(k+1)*B]``, the rows
:func:`gradwatch.load.data.batches` yields, whether the data is in memory, read where it lies
(an uncompressed ``.npz``) or a record stream; under a ``tf.distribute`` strategy each replica
gets its consecutive share of every global batch (:func:`distribute.split_batches`).
"""

from __future__ import annotations

import threading

import numpy as np

from ..errors import GradwatchError
from ..load import data as data_mod
from ..train import distribute

# How long an ending run lets tf.data's threads leave the pipeline's Python generators: a thread
# waiting for the GIL gets it within the interpreter's switch interval (5 ms) once it is released.
QUIESCE_S = 0.05

# The pipeline is sized by hand, with tf.data's autotuning off. Autotuning runs a background
# thread that sleeps between its rounds for longer and longer as a run goes on, and dropping the
# iterator at the end of a run waited out that sleep: 0.3 s after 10 s of training, 4.8 s after
# 20 s of the PTB sample (measured; with autotuning off, 1 ms every time) -- time between the
# last step, or a Ctrl-C, and the exit. Gathering a batch's rows takes microseconds; reading
# one where it lies, a batch at a time, is what PARALLEL_CALLS and PREFETCH keep ahead of the step.
PARALLEL_CALLS = 2  # batches made at once
PREFETCH = 2  # batches ready before the step asks


def settled(dataset):
    """``dataset`` with PREFETCH batches made ahead and autotuning off (see PARALLEL_CALLS)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.prefetch(PREFETCH).with_options(options)


class _Guard:
    """The Python generators inside the pipeline, and how a run ends them.

    tf.data calls a ``from_generator`` generator from its own threads, taking the GIL each time.
    Destroying an iterator waits for those threads; it happens in Python (a reference dropped),
    with the GIL held, so a thread that was just then waiting for the GIL to call the generator
    never returns: the process hangs in ``IteratorResource::~IteratorResource``. :meth:`quiesce`
    ends that race before the iterator is dropped: it tells every generator to stop (its next
    call returns), then waits with the GIL released until each has seen it, so that no thread is
    in, or waiting to enter, Python when the iterator goes; a thread that never comes back for
    more is blocked on a full buffer, which cancellation ends without Python.
    """

    def __init__(self):
        self.stop = threading.Event()
        self._live: list[threading.Event] = []
        self._lock = threading.Lock()
        # gradwatch's own error met by a generator in tf.data's thread (a truncated .npz), which
        # TensorFlow hands the step as an UnknownError: the loop raises this one instead
        self.failed: GradwatchError | None = None

    def wrap(self, make):
        """``make()`` -> a generator; the stoppable generator function for from_generator."""
        def generator():
            ended = threading.Event()
            with self._lock:
                self._live.append(ended)
            try:
                items = make()
                while not self.stop.is_set():
                    try:
                        item = next(items)
                    except StopIteration:
                        return
                    except GradwatchError as exc:
                        self.failed = exc
                        raise
                    yield item
            finally:
                ended.set()

        return generator

    def quiesce(self) -> None:
        self.stop.set()
        with self._lock:
            live = list(self._live)
        for ended in live:
            ended.wait(QUIESCE_S)  # releases the GIL: a waiting thread gets in, sees stop, returns
        self.stop.clear()
        with self._lock:
            self._live = [e for e in self._live if not e.is_set()]


class Pipeline:
    """Builds the pipeline once; every run iterates it afresh from its first batch."""

    def __init__(self, data, options, total_steps: int, steps_per_epoch: int, base_lr, distribution=None, start: int = 0):
        self.data, self.options = data, options
        self.start = start  # batches of the data order consumed first: the run continues as step start + 1
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.base_lr, self.distribution = base_lr, distribution
        self._pipeline = None  # the tf.data pipeline, built on first use
        self._distributed = None  # its distributed form under a strategy
        self.guard = _Guard()  # ends its Python generators before an iterator is dropped (quiesce)

    def specs(self):
        import tensorflow as tf

        size = self.options.batch_size

        def spec(array):
            return tf.TensorSpec((size,) + array.shape[1:], tf.as_dtype(array.dtype))

        return tf.nest.map_structure(spec, self.data.x), tf.nest.map_structure(spec, self.targets())

    def targets(self):
        """What a batch's second element holds: ``y``, or ``(y, sample_weight)`` when the data has
        weights (``loop.Trainer._pick_objective`` takes them apart)."""
        return self.data.y if self.data.w is None else (self.data.y, self.data.w)

    def quiesce(self) -> None:
        """Before a run drops its iterator (finished, interrupted or failed): see :class:`_Guard`."""
        self.guard.quiesce()

    def batches(self):
        """What the block iterates: :meth:`dataset`, or under a strategy its distributed form
        (each replica gets its part of every global batch: :func:`distribute.split_batches`)."""
        if self.distribution is None:
            return self.dataset()
        if self._distributed is None:
            self._distributed = distribute.split_batches(self.distribution, self.dataset, self.options.batch_size, settled)
        return self._distributed

    def dataset(self, rows_of=None):
        """Batches of every step as a prefetching tf.data pipeline: ``(x, y, learning rate)``.

        Batch k of epoch e holds rows ``data.epoch_order(e)[k*B:(k+1)*B]``, the same rows
        :func:`gradwatch.load.data.batches` yields; the row order of an epoch is made on the host
        once per epoch, the gathering runs in tf.data's threads ahead of the training step.
        ``rows_of(rows)`` (a worker under a strategy) keeps the part of each batch it trains on;
        that pipeline comes back without its prefetching, which :func:`distribute.split_batches`
        adds once, after splitting each batch into the replicas' pieces.
        """
        if rows_of is not None:  # a worker's pipeline under a strategy, built by tf.distribute, which
            return self._make(rows_of)  # settles it once it is split into the replicas' pieces
        if self._pipeline is None:  # every run iterates it afresh from its first batch
            self._pipeline = settled(self._make(None))
        return self._pipeline

    def _make(self, rows_of):
        import tensorflow as tf

        from ..load import streams

        options, per, size = self.options, self.steps_per_epoch, self.options.batch_size
        start, end = self.start, self.start + self.total_steps
        epochs = -(-end // per)
        # The first epoch this run trains in, and the batches of it consumed before: the orders of
        # earlier epochs are never made (in memory, and rows read where they lie; a record stream
        # is read through), so --start-step costs nothing however large it is.
        first_epoch, skipped = start // per + 1, start % per
        n_rows = len(self.data)
        keep = rows_of or (lambda r: r)

        base = float(self.base_lr or 0.0)

        def rate(step):
            # TrainOptions.lr_at in the graph, in float64 as Python computes it (the same libm pow),
            # so that nothing is made per epoch up front: a run's length sizes nothing.
            if options.lr_decay is None:
                return tf.constant(np.float32(base))
            epoch = step // per + 1
            exponent = tf.cast(tf.maximum(epoch - options.decay_after_epoch, 0), tf.float64)
            return tf.cast(base * tf.pow(tf.constant(options.lr_decay, tf.float64), exponent), tf.float32)

        rates = tf.data.Dataset.range(start, end).map(rate)

        def orders():
            for epoch in range(first_epoch, epochs + 1):
                order = data_mod.epoch_order(n_rows, epoch, options.shuffle, options.seed)
                yield order[: per * size].reshape(per, size).astype(np.int64)

        if self.data.stream is not None:  # a record stream: bounded shuffle buffer (streams.RecordStream)
            batches = self.data.stream.batches(self.data.x, self.targets(), epochs, size, options.shuffle, options.seed,
                                               keep, PARALLEL_CALLS).skip(start)
        elif streams.is_rows(self.data.x):  # rows read where they lie, a batch at a time, ahead of the step
            targets = self.targets()

            def read_batches():
                k = 0
                for order in orders():
                    for rows in order:
                        k += 1
                        if k <= skipped:  # consumed before this run: not read
                            continue
                        rows = keep(rows)
                        yield streams.read(self.data.x, rows), tf.nest.map_structure(lambda t: t.read(rows), targets)

            def spec(member):
                return tf.TensorSpec((None,) + tuple(member.shape[1:]), tf.as_dtype(member.dtype))

            batches = tf.data.Dataset.from_generator(
                self.guard.wrap(read_batches),
                output_signature=(tf.nest.map_structure(spec, self.data.x), tf.nest.map_structure(spec, targets)))
        else:  # in memory: the rows of each batch gathered from constants in tf.data's threads
            with tf.device("/CPU:0"):  # tf.data runs on the host; the step takes each batch to the device
                x, y = tf.nest.map_structure(tf.constant, self.data.x), tf.nest.map_structure(tf.constant, self.targets())
            rows = tf.data.Dataset.from_generator(self.guard.wrap(orders),
                                                  output_signature=tf.TensorSpec((per, size), tf.int64))
            pairs = tf.data.Dataset.zip((rows.unbatch().skip(skipped), rates)).take(self.total_steps)
            batches = pairs.map(
                lambda r, rate: (tf.nest.map_structure(lambda t: tf.gather(t, keep(r)), x),
                                 tf.nest.map_structure(lambda t: tf.gather(t, keep(r)), y), rate),
                num_parallel_calls=PARALLEL_CALLS,
            )
            return batches
        pairs = tf.data.Dataset.zip((batches, rates)).take(self.total_steps)
        return pairs.map(lambda b, rate: (*b, rate))
