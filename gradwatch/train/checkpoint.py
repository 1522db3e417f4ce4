"""Training state on disk: ``tf.train.Checkpoint`` files that a run continues from (``--checkpoint``)
and writes as it goes (``--save-checkpoints DIR --checkpoint-every K``).

A checkpoint holds ``model=`` (the model's variables, by their place in its object graph) and
``optimizer=`` (a Keras optimizer: its iteration count and slots), as a custom training loop
writes it with ``tf.train.Checkpoint(model=model, optimizer=optimizer).write(path)``. Keras
optimizer slots are stored by index; gradwatch matches them to its own by name
(``adam/w_0_momentum``), so an optimizer built over the same variables in another order still
restores right. After restoring, every model and optimizer variable must hold a value the
checkpoint holds, or the restore is refused with one line.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError, OutputError


def restore(path, trackable, variables, optimizer, extras: dict | None = None) -> int:
    """Restore ``trackable``'s variables and ``optimizer`` from the checkpoint at ``path`` (a
    prefix such as ``ckpt/step-200``, or a folder: its latest checkpoint); the iteration count."""
    import tensorflow as tf

    prefix = _prefix(path)
    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.NotFoundError, tf.errors.DataLossError, ValueError) as exc:
        raise ModelError(f"cannot read the checkpoint {path} ({_first(exc)}); give the prefix tf.train.Checkpoint "
                         "wrote (e.g. ckpt/step-200, beside ckpt/step-200.index)") from None
    shapes = reader.get_variable_to_shape_map()
    if not any(key.startswith("optimizer/") for key in shapes):
        raise ModelError(f"the checkpoint {path} holds no optimizer=; write it with "
                         "tf.train.Checkpoint(model=model, optimizer=optimizer), or drop --checkpoint")
    try:
        # The model by the places of its variables in its object graph; the optimizer's list of
        # slots by name below (an index would follow the other loop's build order).
        status = tf.train.Checkpoint(model=trackable).read(prefix)
        status.expect_partial()
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.InvalidArgumentError) as exc:
        raise _mismatch(path, _first(exc)) from None
    for name, variable in (extras or {}).items():  # gradwatch's own (loss scale): only its checkpoints have them
        key = f"{name}/.ATTRIBUTES/VARIABLE_VALUE"
        if key in shapes:
            variable.assign(reader.get_tensor(key))
    _restore_optimizer(reader, shapes, optimizer)
    # The learning rate is set by gradwatch every step (--lr, the schedule): not part of the match.
    own = [v for v in optimizer.variables if not _name(v).endswith("learning_rate")]
    held = _Held(reader, shapes)
    missing = [v for v in list(variables) + own if not held(v)]
    if missing:
        names = ", ".join(_name(v) for v in missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise _mismatch(path, f"nothing in it fits {names}")
    return int(optimizer.iterations.numpy())


class Writer:
    """Writes the run's state to ``folder/step-N`` at every step N that is a multiple of ``every``."""

    def __init__(self, folder, every: int, trackable, optimizer, extras: dict | None = None):
        import tensorflow as tf

        self.folder, self.every = Path(folder), every
        if self.folder.exists() and not self.folder.is_dir():
            raise ModelError(f"--save-checkpoints {folder} is a file; give a folder")
        self._checkpoint = tf.train.Checkpoint(model=trackable, optimizer=optimizer, **(extras or {}))
        self.written: list[Path] = []

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def write(self, step: int) -> Path:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = Path(self._checkpoint.write(str(self.folder / f"step-{step}")))
        except OSError as exc:
            raise OutputError(f"cannot write a checkpoint into {self.folder}: {exc.strerror or exc}") from None
        self.written.append(path)
        return path


def _prefix(path) -> str:
    import tensorflow as tf

    p = Path(path)
    if p.is_dir():
        latest = tf.train.latest_checkpoint(str(p))
        if latest is None:  # gradwatch's own folders have no "checkpoint" index file: the highest step
            steps = sorted((int(f.name[5:-6]), f) for f in p.glob("step-*.index") if f.name[5:-6].isdigit())
            if not steps:
                raise ModelError(f"{path} holds no checkpoint; give a checkpoint prefix such as ckpt/step-200")
            latest = str(steps[-1][1])[: -len(".index")]
        return latest
    return str(p)


def _restore_optimizer(reader, shapes: dict, optimizer) -> None:
    """Keras keeps its iteration count and slots as a list: put each where its name says
    (``adam/w_0_momentum``), whatever the other loop's build order; by position where names
    do not say (another naming), when the shape fits."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    named: dict[str, list] = {}
    for node in graph.nodes:
        for a in node.attributes:
            if a.checkpoint_key.startswith("optimizer/"):
                named.setdefault(_slot(a.full_name), []).append(a.checkpoint_key)
    by_name = {name: keys[0] for name, keys in named.items() if len(keys) == 1}  # an ambiguous name says nothing
    iterations = "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"
    for index, variable in enumerate(optimizer.variables):
        if variable is optimizer.iterations:
            key = iterations if iterations in shapes else None
        else:
            key = by_name.get(_slot(_name(variable)), f"optimizer/_variables/{index}/.ATTRIBUTES/VARIABLE_VALUE")
        if key in shapes and tuple(shapes[key]) == tuple(variable.shape):
            variable.assign(reader.get_tensor(key))


def _slot(name: str) -> str:
    """A slot's name without its optimizer's (``adam_3/w_0_momentum`` -> ``w_0_momentum``)."""
    name = name[:-2] if name.endswith(":0") else name
    return name.split("/", 1)[1] if "/" in name else name


class _Held:
    """Does a variable now hold a value the checkpoint holds (of its shape)? Each tensor of the
    checkpoint is read once and kept as a digest of its bytes, however many variables share
    its shape (keeping the tensors would hold a second copy of the model in memory)."""

    def __init__(self, reader, shapes: dict):
        self.reader, self.digests = reader, {}
        self.by_shape: dict[tuple, list] = {}
        for key, shape in shapes.items():
            if not key.startswith("_CHECKPOINTABLE"):
                self.by_shape.setdefault(tuple(shape), []).append(key)

    def __call__(self, variable) -> bool:
        import numpy as np

        value = np.asarray(variable.numpy())
        mine = _digest(value)
        for key in self.by_shape.get(value.shape, []):
            if key not in self.digests:
                self.digests[key] = _digest(np.asarray(self.reader.get_tensor(key)))
            if self.digests[key] == mine:
                return True
        return False


def _digest(array) -> tuple:
    import hashlib

    return str(array.dtype), hashlib.blake2b(array.tobytes(), digest_size=16).digest()  # tobytes: C order


def _name(variable) -> str:
    name = getattr(variable, "path", None) or getattr(variable, "name", "?")
    return name[:-2] if name.endswith(":0") else name


def _mismatch(path, why: str) -> ModelError:
    return ModelError(f"the checkpoint {path} does not match this model and optimizer ({why}); give the "
                      "checkpoint of this model, written as tf.train.Checkpoint(model=model, optimizer=optimizer)")


def _first(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:240] if text else type(exc).__name__
