"""Training on several devices or machines with TensorFlow's own engine, ``tf.distribute``.

``--strategy mirrored`` is ``tf.distribute.MirroredStrategy`` over the local GPUs (or, with
``--cpu-devices N``, over N logical CPU devices, so it can be tried without GPUs);
``--strategy multiworker`` is ``tf.distribute.MultiWorkerMirroredStrategy``, its cluster read
from ``TF_CONFIG`` as TensorFlow documents it. gradwatch's step then runs on every replica
with its share of the global batch and **all-reduces the gradient before anything measures or
clips it** (see :mod:`gradwatch.train.loop`), so every recorded number is the one the same
global batch gives on one device.

Nothing here imports TensorFlow at module level: the CLI reads ``TF_CONFIG`` (who is chief)
before TensorFlow starts.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext

from ..errors import OptionError

STRATEGIES = ("none", "mirrored", "multiworker")

# --cpu-devices is for trying --strategy mirrored without GPUs: every logical device is a replica
# with its own copy of the step, so start-up and memory grow faster than N. Measured on 2 cores,
# 3 steps of the ptb-test sample: 16 devices 56 s and 1.4 GB, 64 devices 12 minutes and 7.8 GB.
MAX_CPU_DEVICES = 16


def check_options(strategy: str | None, cpu_devices: int | None) -> None:
    """The option pair, checked before anything loads."""
    if strategy not in (None, *STRATEGIES):
        raise OptionError(f"unknown --strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if cpu_devices is not None and not 1 <= cpu_devices <= MAX_CPU_DEVICES:
        raise OptionError(f"`--cpu-devices` must be between 1 and {MAX_CPU_DEVICES} (each is a replica with its own "
                          f"copy of the step). Received: cpu_devices={cpu_devices}")
    if strategy == "multiworker":
        cluster_spec()


def cluster_spec() -> dict:
    """``TF_CONFIG`` as a dict, checked: a cluster with workers and this process's task."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise OptionError(
            "--strategy multiworker reads its cluster from TF_CONFIG, which is not set; set it on every worker, e.g. "
            'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}\''
        )
    try:
        config = json.loads(text)
        workers = config["cluster"].get("worker", []) + config["cluster"].get("chief", [])
        task = config["task"]
        kind, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise OptionError(f"TF_CONFIG is not a cluster spec ({type(exc).__name__}: {exc}); "
                          'it needs {"cluster": {"worker": [...]}, "task": {"type": "worker", "index": N}}') from None
    if not workers:
        raise OptionError("TF_CONFIG names no workers; list them under cluster.worker")
    if kind not in ("worker", "chief") or index >= len(config["cluster"].get(kind, [])):
        raise OptionError(f"TF_CONFIG's task {kind}:{index} is not in its cluster; check task.type and task.index")
    return config


def is_chief(strategy: str | None) -> bool:
    """Does this process write the outputs? Always, but for a multi-worker run's other workers:
    the chief is the task of type "chief", or worker 0 when the cluster has none (TensorFlow's rule)."""
    if strategy != "multiworker":
        return True
    config = cluster_spec()
    kind, index = config["task"]["type"], int(config["task"]["index"])
    if "chief" in config["cluster"]:
        return kind == "chief"
    return kind == "worker" and index == 0


def configure_cpu_devices(n: int | None) -> None:
    """Split the host CPU into ``n`` logical devices; must happen before TensorFlow starts its
    runtime (the first op). Asking again for the same split is fine."""
    if n is None:
        return
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have != n:
            raise OptionError(
                f"--cpu-devices {n}: TensorFlow is already running with {have} CPU device(s) in this process; "
                "set it before anything else uses TensorFlow (in Python: call gradwatch first, or "
                "tf.config.set_logical_device_configuration yourself)"
            ) from None


def make(strategy: str | None, cpu_devices: int | None):
    """The ``tf.distribute.Strategy`` asked for (options checked: :func:`check_options`), or None
    for plain single-device training."""
    configure_cpu_devices(cpu_devices)
    if strategy in (None, "none"):
        return None
    import tensorflow as tf

    if strategy == "mirrored":
        if cpu_devices:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")][:cpu_devices]
        else:
            devices = [d.name for d in tf.config.list_logical_devices("GPU")]
            if not devices:
                raise OptionError("--strategy mirrored found no GPU; add --cpu-devices N to mirror over N CPU devices")
        return tf.distribute.MirroredStrategy(devices)
    communication = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.AUTO
    )
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=communication)
    except (RuntimeError, ValueError) as exc:
        raise OptionError(f"--strategy multiworker could not start from TF_CONFIG: {exc}") from None


def scope(distribution):
    """``distribution.scope()``, or nothing to enter for single-device training."""
    return distribution.scope() if distribution is not None else nullcontext()


def replicas(distribution) -> int:
    return 1 if distribution is None else int(distribution.num_replicas_in_sync)


def check_batch(distribution, batch_size: int) -> None:
    total = replicas(distribution)
    if batch_size % total:
        raise OptionError(
            f"--batch-size {batch_size} does not split over {total} replicas; pick a multiple of {total} "
            "(the batch size is the global batch, split across replicas)"
        )


def split_batches(distribution, make_global, batch_size: int, settled):
    """A distributed dataset whose replicas together see each global batch of ``make_global``.

    ``make_global(rows_of)`` builds the pipeline of ``(x, y, lr)`` global batches; it is given
    ``rows_of(rows)``, which keeps of a batch's row indices (or of the batch) the part this
    worker's replicas train on. Every worker builds the same order (same seed), takes its slice of every
    batch, and hands its replicas consecutive pieces: replica r of R gets rows
    ``[r*B/R, (r+1)*B/R)`` of the global batch, as one device would see them, in order.
    ``settled(dataset)`` gives each worker's pipeline its prefetching (the pipeline's rule).
    """
    import tensorflow as tf

    check_batch(distribution, batch_size)
    total = replicas(distribution)
    per_replica = batch_size // total

    def dataset_fn(context):
        local = total // context.num_input_pipelines  # replicas this worker feeds
        first = context.input_pipeline_id * local * per_replica

        def rows_of(rows):  # a batch's row indices, or the batch itself: rows first
            return rows[first: first + local * per_replica]

        def split(x, y, lr):
            pieces = tf.nest.map_structure(
                lambda t: tf.reshape(t, tf.concat([[local, per_replica], tf.shape(t)[1:]], 0)), (x, y))
            return tf.data.Dataset.from_tensor_slices(pieces + (tf.fill([local], lr),))

        return settled(make_global(rows_of).flat_map(split))

    options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
    return distribution.distribute_datasets_from_function(dataset_fn, options)


def first(distribution, values):
    """Of values every replica computed alike (all-reduced), the first replica's."""
    import tensorflow as tf

    return tf.nest.map_structure(lambda v: distribution.experimental_local_results(v)[0], values)


def replica_share(grads, replicas: int):
    """What each replica hands to a Keras optimizer so that the update is that of ``grads``,
    the all-reduced gradient every replica holds alike.

    Keras' update step sums the replicas' gradients. A dense one is handed on as ``g / R``
    (exact for R a power of two, within an ulp otherwise). A sparse one (``tf.IndexedSlices``,
    an embedding's) is summed by concatenating the replicas' rows, and Keras' optimizers square
    the gradient row by row (Adam's second moment): R halves of one row are not that row. So
    the first replica hands on the whole sparse gradient and the others no rows.
    """
    import tensorflow as tf

    if replicas == 1:
        return list(grads)
    first = tf.equal(tf.distribute.get_replica_context().replica_id_in_sync_group, 0)
    out = []
    for g in grads:
        if isinstance(g, tf.IndexedSlices):
            rows = tf.where(first, tf.shape(g.indices)[0], 0)
            out.append(tf.IndexedSlices(g.values[:rows], g.indices[:rows], g.dense_shape))
        else:
            out.append(g / tf.cast(replicas, g.dtype))
    return out


def is_multi_worker(distribution) -> bool:
    import tensorflow as tf

    return isinstance(distribution, tf.distribute.MultiWorkerMirroredStrategy)


def when(condition, then, otherwise=None, args=()):
    """``then(*args)`` if ``condition`` else ``otherwise(*args)``, called in replica context (where
    Keras calls an optimizer's ``apply``). A Keras update calls ``merge_call``, which a strategy may
    not allow inside a replica's ``tf.cond``: there the cond runs in cross-replica context and
    each replica runs its branch with its own ``args``, as ``LossScaleOptimizer`` does it."""
    import tensorflow as tf

    def branch(fn):
        def run(*given):
            if fn is not None:
                fn(*given)
            return tf.constant(True)
        return run

    context = tf.distribute.get_replica_context()
    if (context is None or context.num_replicas_in_sync == 1
            or tf.__internal__.distribute.strategy_supports_no_merge_call()):
        tf.cond(condition, lambda: branch(then)(*args), lambda: branch(otherwise)(*args))
        return

    def cross(distribution, condition, *given):
        first = distribution.experimental_local_results(condition)[0]  # every replica computed it alike

        def each(fn):
            return lambda: (distribution.extended.call_for_each_replica(branch(fn), args=given), tf.constant(True))[1]

        tf.cond(first, each(then), each(otherwise))

    context.merge_call(cross, args=(condition, *args))
