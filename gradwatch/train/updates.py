"""How far one step moves each variable, ‖w_after − w_before‖, from what the optimizer writes.

A Keras optimizer changes a model variable only through that ``tf.Variable``'s own methods:
``assign_sub``/``assign_add`` for the update and for weight decay, ``scatter_sub``/``scatter_add``
for an embedding's rows, ``assign`` for a constraint or an overwrite. While the step is traced,
:func:`recording` puts a recorder in front of those methods of each variable the step trains, and
:meth:`Writes.norms` gives the norm of each variable's net change from the values written: no copy
of every weight every step, and an embedding updated in 400 of its 10 000 rows costs 400 rows.

Each write adds a *part* to its variable's change:

- ``assign_add(d)`` adds ``d``; ``assign_sub(d)`` adds ``−d``; ``scatter_add`` / ``scatter_sub``
  add their rows (repeated indices add up, as the scatter does);
- ``assign(v)`` adds ``v − w`` and ``scatter_update`` adds ``v − w[rows]`` at its rows, ``w``
  read just before the write (the step's automatic control dependencies order the read first);
- any other writing method (``scatter_nd_*``, ``scatter_max``, ...) adds ``w_after − w_before``
  around the call.

The change is the sum of the parts. A write this cannot follow (one made inside the optimizer's
own ``cond`` or loop, whose tensors cannot leave it) raises :class:`Unfollowed`, and the trainer
traces again the old way: a copy of each weight before the update. That way is also the one for
optimizers not defined by Keras (their writes may bypass the variable's methods) and under a
``tf.distribute`` strategy (its mirrored variables are written per replica).

TensorFlow is imported inside the functions, so that importing this module stays cheap.
"""

from __future__ import annotations

from contextlib import contextmanager

# Methods of a tf.Variable that write it, beyond the six followed part by part.
OTHER_WRITES = ("scatter_max", "scatter_min", "scatter_mul", "scatter_div", "scatter_nd_add", "scatter_nd_sub",
                "scatter_nd_update", "scatter_nd_max", "scatter_nd_min", "batch_scatter_update")


class Unfollowed(Exception):
    """A write :func:`recording` cannot follow: trace the step again with copies."""


def follows(optimizer, distribution) -> bool:
    """Can the update norms of this optimizer's steps come from its writes? Keras' own
    optimizers, without a tf.distribute strategy."""
    module = type(optimizer).__module__ or ""
    return distribution is None and (module == "keras" or module.startswith("keras."))


class Writes:
    """The parts of each variable's change during one traced update (see the module)."""

    def __init__(self, count: int, graph):
        self.parts: list[list] = [[] for _ in range(count)]
        self.graph = graph

    def add(self, k: int, part) -> None:
        tensors = part[1:3] if part[0] == "sparse" else part[1:2]
        if not all(_visible(getattr(t, "graph", self.graph), self.graph) for t in tensors):
            raise Unfollowed("a write inside the optimizer's own control flow")
        self.parts[k].append(part)

    def norms(self):
        """(V,) float32: the norm of each variable's net change (one stacked √(2·l2_loss))."""
        import tensorflow as tf

        if not self.parts:
            return tf.zeros([0])
        return tf.sqrt(tf.stack([_half_square(parts) for parts in self.parts]) * 2.0)


def _visible(graph, here) -> bool:
    """Can a tensor of ``graph`` be used in ``here``: the same graph, or one it is nested in?"""
    while here is not None:
        if here is graph:
            return True
        here = getattr(here, "outer_graph", None)
    return False


def _half_square(parts):
    """½‖Σ parts‖² of one variable (``tf.nn.l2_loss`` of its change); a part is ``("dense", d, sign)``
    or ``("sparse", indices, values, sign)``. One part alone is taken as it is (no sign needed)."""
    import tensorflow as tf

    if not parts:
        return tf.constant(0.0)
    if len(parts) == 1 and parts[0][0] == "dense":
        return tf.nn.l2_loss(tf.cast(parts[0][1], tf.float32))
    dense = [tf.cast(p[1], tf.float32) * p[2] for p in parts if p[0] == "dense"]
    sparse = [p for p in parts if p[0] == "sparse"]
    if sparse:
        indices = tf.concat([tf.cast(p[1], tf.int64) for p in sparse], axis=0)
        values = tf.concat([tf.cast(p[2], tf.float32) * p[3] for p in sparse], axis=0)
    if dense:
        total = tf.add_n(dense) if len(dense) > 1 else dense[0]
        if sparse:
            total = tf.tensor_scatter_nd_add(total, indices[:, None], values)
        return tf.nn.l2_loss(total)
    unique, at = tf.unique(indices)  # repeated rows add up, as the scatter adds them
    return tf.nn.l2_loss(tf.math.unsorted_segment_sum(values, at, tf.shape(unique)[0]))


@contextmanager
def recording(variables):
    """While the update is traced inside: each write to one of ``variables`` (Keras variables or
    tf.Variables) is recorded as a part of its change; yields the :class:`Writes`."""
    import tensorflow as tf

    writes = Writes(len(variables), tf.compat.v1.get_default_graph())
    patched = []
    try:
        for k, variable in enumerate(variables):
            target = getattr(variable, "value", variable)
            if not isinstance(target, tf.Variable):
                target = variable
            for name, wrap in _wrappers(writes, k, target).items():
                if name in vars(target):
                    raise Unfollowed(f"{name} of {getattr(variable, 'path', variable)} is already replaced")
                setattr(target, name, wrap)
                patched.append((target, name))
        yield writes
    finally:
        for target, name in patched:
            delattr(target, name)


def _wrappers(writes: Writes, k: int, target) -> dict:
    import tensorflow as tf

    cls = type(target)

    def read():
        return tf.convert_to_tensor(cls.read_value(target))

    def method(name):
        return getattr(cls, name).__get__(target)

    def dense(value):
        return tf.cast(tf.convert_to_tensor(value), target.dtype)

    def assign_add(value, *args, **kwargs):
        writes.add(k, ("dense", dense(value), 1.0))
        return method("assign_add")(value, *args, **kwargs)

    def assign_sub(value, *args, **kwargs):
        writes.add(k, ("dense", dense(value), -1.0))
        return method("assign_sub")(value, *args, **kwargs)

    def assign(value, *args, **kwargs):
        value = dense(value)
        writes.add(k, ("dense", value - read(), 1.0))
        return method("assign")(value, *args, **kwargs)

    def scatter_add(slices, *args, **kwargs):
        writes.add(k, ("sparse", slices.indices, slices.values, 1.0))
        return method("scatter_add")(slices, *args, **kwargs)

    def scatter_sub(slices, *args, **kwargs):
        writes.add(k, ("sparse", slices.indices, slices.values, -1.0))
        return method("scatter_sub")(slices, *args, **kwargs)

    def scatter_update(slices, *args, **kwargs):
        current = tf.gather(read(), slices.indices)
        writes.add(k, ("sparse", slices.indices, tf.cast(slices.values, target.dtype) - current, 1.0))
        return method("scatter_update")(slices, *args, **kwargs)

    def other(name):
        def write(*args, **kwargs):
            before = tf.identity(read())
            result = method(name)(*args, **kwargs)
            writes.add(k, ("dense", read() - before, 1.0))  # read after the write: the control dependencies order it
            return result

        return write

    out = {"assign_add": assign_add, "assign_sub": assign_sub, "assign": assign, "scatter_add": scatter_add,
           "scatter_sub": scatter_sub, "scatter_update": scatter_update}
    out.update({name: other(name) for name in OTHER_WRITES if hasattr(cls, name)})
    return out
