"""Data sets larger than memory, read as streams: memory does not grow with their size.

Two kinds of stream stand in for the in-memory arrays of :class:`gradwatch.load.data.Dataset`:

* **Rows read where they lie** (:class:`NpzMember`): an array inside an uncompressed ``.npz``
  (``numpy.savez``) is read with positional reads at its offset in the file, only the rows of
  each batch, in a tf.data thread ahead of the step. Shuffling is the in-memory path's own:
  the per-epoch permutation of row indices ``numpy.random.default_rng([seed, epoch])``, so a
  streamed run trains on exactly the batches of the in-memory one. Reads rather than
  ``numpy.memmap``: the pages of a memory map count as the process's resident memory once
  touched, and an epoch touches them all.
* **Record streams** (:class:`RecordStream`): a ``tf.data.Dataset.save`` folder or TFRecord
  files of ``tf.train.Example``, read in file order. Shuffling draws from a bounded buffer
  (``--shuffle-buffer`` elements) seeded by ``seed`` and reshuffled every epoch: deterministic for a seed, the
  same for every variant of a comparison, but not the in-memory permutation.

Under a tf.distribute strategy every worker reads the same stream and keeps its replicas'
rows of each global batch (``keep``), so the workers' batches together are one device's.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, replace

import numpy as np

from ..errors import DataError, counted, first_line
from . import casts, targets
from .casts import cast

SAMPLE_WEIGHT = "sample_weight"  # an .npz array, CSV column or TFRecord feature of this name weighs each row's loss, as fit's sample_weight
AUTO_STREAM_BYTES = 256 * 2**20  # --stream auto: data on disk larger than this is streamed
CHUNK_BYTES = 8 * 2**20  # rows per read when scanning a whole array (checks before training)


@dataclass(frozen=True)
class NpzMember:
    """One array inside an uncompressed .npz, read row by row; looks like an array to the
    shape and dtype checks (``shape``, ``dtype``, ``ndim``, ``astype``)."""

    path: str
    name: str
    offset: int  # where its data starts in the file
    shape: tuple
    stored: np.dtype  # the dtype in the file
    dtype: np.dtype  # the dtype rows are read as (after astype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.stored.itemsize

    def astype(self, dtype, copy: bool = False) -> "NpzMember":
        return replace(self, dtype=np.dtype(dtype))

    def read(self, rows) -> np.ndarray:
        """The given rows, in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows),) + tuple(self.shape[1:]), self.stored)
        size = self.row_bytes
        view = out.reshape(len(rows), -1).view(np.uint8) if size else None
        with open(self.path, "rb", buffering=0) as handle:
            fd = handle.fileno()
            if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
                view.reshape(-1)[:] = np.frombuffer(_pread(fd, size * len(rows), self.offset + size * int(rows[0]),
                                                           self.path), np.uint8)
            else:
                for k, row in enumerate(rows.tolist()):
                    view[k] = np.frombuffer(_pread(fd, size, self.offset + size * row, self.path), np.uint8)
        return cast(out, self.dtype, self.name, rows)

    def chunks(self):
        """(first row, rows) over the whole array, CHUNK_BYTES at a time."""
        step = max(1, CHUNK_BYTES // max(self.row_bytes, 1))
        for start in range(0, len(self), step):
            yield start, self.read(np.arange(start, min(start + step, len(self))))

    def __getitem__(self, rows):  # whole-array indexing is what the in-memory path does; say so
        raise TypeError("a streamed array is read with .read(rows)")


def _pread(fd: int, size: int, offset: int, path) -> bytes:
    data = os.pread(fd, size, offset)
    while len(data) < size:  # pread may return less; never past the end of a valid member
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise DataError(f"{path}: unexpected end of file reading {size} bytes at {offset}; the .npz is truncated "
                            "(or was changed while the run read it)")
        data += more
    return data


def npz_members(path, keys) -> dict:
    """The arrays ``keys`` of an .npz as :class:`NpzMember` s (no data read)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc}); write it with numpy.savez") from None
    members = {}
    with archive, open(path, "rb") as handle:
        names = {n[:-4] if n.endswith(".npy") else n: n for n in archive.namelist()}
        for key in keys:
            if key not in names:
                raise DataError(f"{path} has no array {key!r} (it has: {', '.join(names) or 'none'}); "
                                "pass --x-key / --y-key to name the inputs and targets")
            info = archive.getinfo(names[key])
            if info.compress_type != zipfile.ZIP_STORED:
                raise DataError(f"{path}: array {key!r} is compressed (numpy.savez_compressed), which cannot be read "
                                "row by row; save it with numpy.savez to stream it, or pass --no-stream")
            handle.seek(info.header_offset)
            header = handle.read(30)
            start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
            handle.seek(start)
            try:
                version = np.lib.format.read_magic(handle)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(version, np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(handle)
            except ValueError as exc:
                raise DataError(f"{path}: array {key!r} is not a .npy array ({exc})") from None
            if fortran or dtype.hasobject or not shape:
                raise DataError(f"{path}: array {key!r} must be a C-ordered numeric array with a row dimension "
                                "to be streamed; pass --no-stream")
            members[key] = NpzMember(str(path), key, handle.tell(), tuple(shape), dtype, dtype)
    return members


def is_rows(x) -> bool:
    """Streamed rows read where they lie (one input, or a dict of inputs)?"""
    if isinstance(x, dict):
        return any(isinstance(v, NpzMember) for v in x.values())
    return isinstance(x, NpzMember)


def read(x, rows):
    """The given rows of one input or of every input of several."""
    if isinstance(x, dict):
        return {k: v.read(rows) for k, v in x.items()}
    return x.read(rows)


# --- record streams ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """Shape and dtype of one streamed tensor (rows first), for the checks made on arrays."""

    shape: tuple
    dtype: np.dtype
    beyond: tuple | None = None  # (index, value, float32 or int32): its first value beyond that, from the counting pass

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def astype(self, dtype, copy: bool = False) -> "Column":
        return replace(self, dtype=np.dtype(dtype))


class RecordStream:
    """A tf.data pipeline of single ``(x, y)`` examples in file order, made afresh on demand
    (``(x, (y, sample_weight))`` where the data weighs its rows; see :func:`_stream`)."""

    def __init__(self, make, rows: int, buffer: int):
        self.make = make  # () -> tf.data.Dataset of (x, y) or (x, (y, w)) examples
        self.rows = rows
        self.buffer = buffer

    def batches(self, x, y, epochs: int, batch_size: int, shuffle: bool, seed: int, keep, parallel_calls: int):
        """Global batches of ``epochs`` epochs (``len // batch_size`` each, the rest dropped),
        cast to the dtypes of the ``x``/``y`` columns (``y``: ``(y, w)`` for weighted rows), each
        cut by ``keep`` (a worker's rows),
        ``parallel_calls`` batches at once."""
        import tensorflow as tf

        dtypes = tf.nest.map_structure(lambda c: tf.as_dtype(c.dtype), (x, y))
        per_epoch = self.rows // batch_size

        examples = self.make()
        if shuffle:
            # One seed from --seed; the buffer reshuffles on every pass, so each epoch has its own
            # order, the same in every run: nothing is made per epoch up front.
            examples = examples.shuffle(self.buffer, seed=int(np.random.default_rng([seed, 0]).integers(2**31)),
                                        reshuffle_each_iteration=True)
        stream = examples.batch(batch_size, drop_remainder=True).take(per_epoch).repeat(epochs)
        return stream.map(lambda bx, by: tf.nest.map_structure(lambda t, d: tf.cast(keep(t), d), (bx, by), dtypes),
                          num_parallel_calls=parallel_calls)


def check_elements(spec, path) -> None:
    """What a ``tf.data`` data set may hold, as ``fit`` takes one: (x, y) pairs or (x, y,
    sample_weight) triples, x a tensor or a dict / tuple of tensors (y too, for a model with
    several outputs). Written once for a folder read into memory and one read as a stream."""
    import tensorflow as tf

    parts = len(spec) if isinstance(spec, tuple) else 0
    flat_x = tf.nest.flatten(spec[0]) if parts in (2, 3) else []
    if not (flat_x and all(isinstance(s, tf.TensorSpec) for s in flat_x + tf.nest.flatten(spec[1:]))
            and isinstance(spec[0], (tf.TensorSpec, dict, tuple, list))
            and isinstance(spec[1], (tf.TensorSpec, dict, tuple, list)) and (parts == 2 or isinstance(spec[2], tf.TensorSpec))):
        raise DataError(
            f"{path}: elements must be (x, y) pairs or (x, y, sample_weight), x a tensor or a dict/tuple of "
            f"tensors (y too, for a model with several outputs), found {spec}; save dataset.map(lambda ...: (x, y))"
        )


def is_batched(spec) -> bool:
    """Was the data set saved after ``.batch()`` (its first input's leading dimension unknown)?"""
    import tensorflow as tf

    first = tf.nest.flatten(spec[0])[0]
    return bool(first.shape.rank) and first.shape[0] is None


def load_saved(path, options, by_input, by_output):
    """A ``tf.data.Dataset.save`` folder of (x, y) or (x, y, sample_weight) examples (or batches)
    as a stream."""
    import tensorflow as tf

    try:
        loaded = tf.data.Dataset.load(str(path))
    except (tf.errors.OpError, ValueError, OSError) as exc:
        raise DataError(f"{path} is not a folder written by tf.data.Dataset.save ({first_line(exc)})") from None
    check_elements(loaded.element_spec, path)
    batched = is_batched(loaded.element_spec)

    def make():
        data = tf.data.Dataset.load(str(path))
        return data.unbatch() if batched else data

    return _stream(make, path, options, by_input, by_output, "tf.data (streamed)")


def parse_features(text: str, target: str | None):
    """``--features x:float32:20,y:int64`` -> ({name: FixedLenFeature}, [input names], target name)."""
    import tensorflow as tf

    features = {}
    for item in (text or "").split(","):
        parts = item.strip().split(":")
        if not parts[0]:
            continue
        if len(parts) not in (2, 3):
            raise DataError(f"--features item {item!r} is not NAME:DTYPE[:SHAPE], e.g. x:float32:20 or y:int64")
        name, dtype = parts[0], parts[1]
        if dtype not in ("float32", "int64", "string"):
            raise DataError(f"--features {name}: dtype {dtype!r} is not one tf.train.Example holds (float32, int64, string)")
        try:
            shape = [int(d) for d in parts[2].split("x")] if len(parts) == 3 and parts[2] else []
        except ValueError:
            raise DataError(f"--features {name}: shape {parts[2]!r} is not like 20 or 4x5") from None
        features[name] = tf.io.FixedLenFeature(shape, tf.as_dtype(dtype))
    if len(features) < 2:
        raise DataError("a TFRecord file needs --features naming its inputs and target, e.g. "
                        "--features x:float32:20,y:int64 (the target is --target, else the last but sample_weight)")
    target = target or default_target(list(features))
    if target not in features:
        raise DataError(f"--target {target!r} is not among --features ({', '.join(features)})")
    return features, [n for n in features if n != target], target


def default_target(names: list) -> str:
    """The target when --target is not given, of a CSV's columns or a TFRecord's features: the
    last one that is not ``sample_weight`` (a weight column at the end weighs; it is not the target)."""
    rest = [n for n in names if n != SAMPLE_WEIGHT]
    return rest[-1] if rest else names[-1]


def load_tfrecord(path, options, by_input, by_output):
    """TFRecord file(s) of tf.train.Example, parsed with ``--features``, as a stream."""
    import tensorflow as tf

    features, inputs, target = parse_features(options.features, options.target)
    weighted = SAMPLE_WEIGHT in inputs  # a feature of that name weighs each row's loss, as fit's sample_weight
    inputs = [n for n in inputs if n != SAMPLE_WEIGHT]
    if not inputs:
        raise DataError(f"--features names no input beside {target!r} and {SAMPLE_WEIGHT!r}; add the inputs")
    files = sorted(str(p) for p in path.iterdir() if p.suffix in TFRECORD_SUFFIXES) if path.is_dir() else [str(path)]
    if not files:
        raise DataError(f"{path} holds no .tfrecord files")

    def make():
        def parse(record):
            example = tf.io.parse_single_example(record, features)
            x = example[inputs[0]] if len(inputs) == 1 else {n: example[n] for n in inputs}
            return (x, example[target], example[SAMPLE_WEIGHT]) if weighted else (x, example[target])

        return tf.data.TFRecordDataset(files).map(parse)

    try:
        return _stream(make, path, options, by_input, by_output, "tfrecord (streamed)")
    except tf.errors.OpError as exc:
        raise DataError(f"{path}: cannot read it as TFRecord files of tf.train.Example with --features "
                        f"{options.features} ({first_line(exc)})") from None


TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfr")


@dataclass(frozen=True)
class Streamed:
    """What a record stream's loader found: columns of x and y, the kind, the stream itself
    (``data.load`` makes the Dataset of it, so this module needs nothing from ``data``)."""

    x: object
    y: object
    kind: str
    stream: "RecordStream"
    w: object = None  # the sample weights' column, where the records carry them


def _stream(make, path, options, by_input, by_output, kind):
    """Count the rows and check every value is finite (every sample weight finite and >= 0, and
    the targets against the loss, ``options.targets``) in one pass, a few thousand rows at a time. ``make()`` gives (x, y) or (x, y, sample_weight)
    examples; the stream trains on (x, y) or (x, (y, sample_weight)), x and y in the structure
    ``by_input`` / ``by_output`` give their columns (by the model's input and output names)."""
    import tensorflow as tf

    examples = make()
    spec = examples.element_spec
    weighted = len(spec) == 3
    checks = _target_checks(spec[1], options, path, by_output)
    rows, bad, first = 0, 0, None
    beyond = [None] * len(tf.nest.flatten(spec))  # per stored tensor: the first value float32 / int32 cannot hold
    for element in examples.batch(4096).as_numpy_iterator():
        if weighted:
            _check_weights(path, element[2], rows)
        for k, array in enumerate(tf.nest.flatten(element)):
            against = casts.reference(array.dtype)
            if beyond[k] is None and against is not None:
                hit = casts.first_beyond(array, against, start=rows)
                beyond[k] = None if hit is None else (*hit, np.dtype(against))
        for name, array in _flat_named(element[0], "x") + _flat_named(element[1], "y"):
            if np.issubdtype(array.dtype, np.floating):
                finite = np.isfinite(array.reshape(len(array), -1)).all(axis=1)
                if not finite.all():
                    bad += int((~finite).sum())
                    first = first or (name, rows + int(np.argmin(finite)))
        for check, array in zip(checks, tf.nest.flatten(element[1])):
            check.feed(rows, array)
        rows += len(tf.nest.flatten(element[1])[0])
    if bad and not options.allow_nonfinite:  # allowed: each step marks its own batch (train.loop.holds_nonfinite)
        raise DataError(f"{path}: {counted(bad, 'row')} hold{'s' * (bad == 1)} non-finite values (NaN or inf), the first "
                        f"in {first[0]} of row {first[1]}; clean the data, or pass --allow-nonfinite-data to train on it "
                        "anyway")
    if rows == 0:
        raise DataError(f"{path} holds no elements")
    for check in checks:
        check.finish()

    found = iter(beyond)
    saved_x, saved_y = (_columns(side, rows, found) for side in spec[:2])
    x = by_input(saved_x, options, path)
    y = by_output(saved_y, options, path)
    w = _columns(spec[2], rows, found) if weighted else None
    as_x, as_y = _follow(saved_x, x), _follow(saved_y, y)

    def make_training():
        if weighted:
            return make().map(lambda ex, ey, ew: (as_x(ex), (as_y(ey), ew)))
        return make().map(lambda ex, ey: (as_x(ex), as_y(ey)))

    as_saved = not weighted and as_x is _same and as_y is _same  # no stage to add
    return Streamed(x, y, kind, RecordStream(make if as_saved else make_training, rows, options.shuffle_buffer), w)


def _columns(side, rows: int, beyond=None):
    """The Columns of one side (x, y or the weights) of a stream's element_spec, ``rows`` long;
    a tuple where it holds several (as ``by_input`` / ``by_output`` take them). ``beyond``: an
    iterator over what the counting pass found beyond float32 / int32, in ``tf.nest.flatten`` order."""
    import tensorflow as tf

    columns = tf.nest.map_structure(lambda s: Column((rows,) + tuple(s.shape), np.dtype(s.dtype.as_numpy_dtype),
                                                     next(beyond) if beyond is not None else None), side)
    return tuple(columns) if isinstance(columns, list) else columns


def _target_checks(side, options, path, by_output) -> list:
    """A TargetCheck per target of a stream (``side``: the element_spec of its y), in the order
    ``tf.nest.flatten`` gives them, each against the loss and units of the output it trains."""
    import tensorflow as tf

    if options.targets is None:
        return []
    loss, classes = options.targets
    saved = _columns(side, 0)
    flat = tf.nest.flatten(saved)
    by_name = by_output(saved, options, path)  # which output each saved target trains
    output = {id(c): key for key, c in by_name.items()} if isinstance(by_name, dict) else {id(flat[0]): None}
    return [targets.for_target(path, "y" if output[id(c)] is None else f"y[{output[id(c)]!r}]", output[id(c)], loss,
                               classes) for c in flat]


def _same(side):
    return side


def _follow(saved, columns):
    """One side (x or y) of an example, structured as saved (``saved``: its columns), as the
    structure ``by_input`` / ``by_output`` gave those columns: a dict by the model's names, from a
    tuple in input order or from other names in that order. The identity where they kept it."""
    import tensorflow as tf

    if not isinstance(columns, dict):
        return _same
    at = {id(c): k for k, c in enumerate(tf.nest.flatten(saved))}
    picks = [(name, at[id(c)]) for name, c in columns.items()]
    return lambda side: {name: tf.nest.flatten(side)[k] for name, k in picks}


WEIGHTS_RULE = "sample weights must be finite and >= 0"


def first_bad_weight(weights) -> tuple | None:
    """Index of the first sample weight that is not finite or is negative (None: none is): the
    one rule for weights, read into memory (data._check_weights) or streamed. A weight scales a
    row's loss: NaN or a negative weight trains on nothing a user meant."""
    weights = np.asarray(weights, np.float64)
    bad = ~np.isfinite(weights) | (weights < 0)
    if not bad.any():
        return None
    return targets.first_true(bad)


def _check_weights(path, weights, start: int) -> None:
    """A batch of a stream's sample weights whose first row is row ``start`` of the stream."""
    at = first_bad_weight(weights)
    if at is not None:
        where = targets.indexed(SAMPLE_WEIGHT, targets.in_whole(start, at))
        raise DataError(f"{path}: {where} is {np.asarray(weights)[at]:g}; {WEIGHTS_RULE}")


def _flat_named(side, what: str):
    if isinstance(side, dict):
        return [(f"{what}[{k!r}]", v) for k, v in side.items()]
    if isinstance(side, (tuple, list)):
        return [(f"{what}[{k}]", v) for k, v in enumerate(side)]
    return [(what, side)]
