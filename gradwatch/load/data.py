"""Data files -> in-memory (x, y) arrays, and the one batch order every run and variant uses.

The kind of file is recognised from the path (see ``LOADERS``):

* ``.npz``: arrays ``x`` and ``y`` (or ``--x-key`` / ``--y-key``), read with allow_pickle=False;
* ``.csv``: numeric feature columns plus a target column (``--target``; default: the last column but ``sample_weight``)
  and, optionally, a ``sample_weight`` column;
* a folder written by ``tf.data.Dataset.save`` whose elements are ``(x, y)`` pairs;
* ``.txt``: a whitespace-tokenised corpus for word language models, cut into windows the way
  the PTB reader of TensorFlow's ``ptb_word_lm`` tutorial does (:func:`ptb_windows`).

Batches: an epoch has ``len(x) // batch_size`` batches (the last partial batch is dropped, so
the traced step sees one shape). Without shuffling, batch k is rows ``k*B .. (k+1)*B - 1`` in file
order; with shuffling, the rows of epoch e are taken in the order
``numpy.random.default_rng([seed, e]).permutation(len(x))``.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, counted, first_line
from . import streams, targets
from .casts import CastError, can_overflow, cast
from .streams import SAMPLE_WEIGHT, WEIGHTS_RULE, check_elements, default_target, first_bad_weight, is_batched
from .targets import first_true, in_whole, indexed

UNK = "<unk>"
EOS = "<eos>"


@dataclass
class Dataset:
    x: np.ndarray | dict  # one array, or {input name: array} for a model with several inputs
    y: np.ndarray | dict  # one array, or {output name: array} for a Keras model with several outputs
    kind: str
    path: str
    columns: tuple | None = None  # (feature names, target name) of a CSV, to name cells in errors
    stream: object = None  # a streams.RecordStream when x and y are streams.Columns (read as a stream)
    w: np.ndarray | None = None  # Keras' sample_weight of every row (the .npz array or CSV column of that name), if given

    @property
    def streamed(self) -> bool:
        from .streams import is_rows

        return self.stream is not None or is_rows(self.x)

    def __len__(self) -> int:
        return len(next(iter(self.y.values())) if isinstance(self.y, dict) else self.y)

    def inputs(self) -> list[tuple[str, np.ndarray]]:
        """(name, array) of every input: ``x`` alone, or ``x['ids']`` ... for several."""
        return _named("x", self.x)

    def targets(self) -> list[tuple[str, np.ndarray]]:
        """(name, array) of every target: ``y`` alone, or ``y['cls']`` ... for several outputs."""
        return _named("y", self.y)


def _named(what: str, values) -> list[tuple[str, np.ndarray]]:
    if isinstance(values, dict):
        return [(f"{what}[{name!r}]", array) for name, array in values.items()]
    return [(what, values)]


@dataclass(frozen=True)
class DataOptions:
    """Options that only some kinds of data read."""

    x_key: str | None = None  # None: "x", or arrays named after the model's inputs
    y_key: str = "y"
    input_names: tuple | None = None  # the model's input names, when it has several
    output_names: tuple | None = None  # a Keras model's output names, when it has several
    target: str | None = None
    vocab: str | None = None
    num_steps: int | None = None
    batch_size: int = 32
    stream: bool | None = None  # None: stream data larger than streams.AUTO_STREAM_BYTES
    features: str | None = None  # --features of a TFRecord file: NAME:DTYPE[:SHAPE],...
    shuffle_buffer: int = 10000  # record streams: elements in the shuffle buffer
    allow_nonfinite: bool = False
    # (loss name, output units), each one value or {output name: value}: what a record stream's
    # targets are checked against in the pass that counts it (targets.TargetCheck); None: nothing
    targets: tuple | None = None


# --- loaders --------------------------------------------------------------------------------


def load_npz(path: Path, options: DataOptions, model_assets: Path | None) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            x_keys, y_keys = _npz_keys(path, list(archive.keys()), options)
            y = _npz_targets(options, {k: archive[k] for k in y_keys})
            if len(x_keys) == 1:
                x = archive[x_keys[0]]
            else:
                x = {k: archive[k] for k in x_keys}
            w = archive[SAMPLE_WEIGHT] if SAMPLE_WEIGHT in archive.files and SAMPLE_WEIGHT not in x_keys else None
    except ValueError as exc:
        if "pickle" in str(exc):  # object arrays need pickle, which is never allowed
            raise DataError(f"cannot read {path} without pickle ({exc}); save plain numeric arrays with numpy.savez") from None
        raise _unreadable_npz(path, exc) from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise _unreadable_npz(path, exc) from None
    return _checked(_by_input(x, options, path), _by_output(y, options, path), "npz", path, w)


def _unreadable_npz(path: Path, exc: BaseException) -> DataError:
    return DataError(f"{path} is not a complete .npz file ({first_line(exc)}): truncated, or not written by "
                     "numpy.savez; write it again")


def _npz_targets(options: DataOptions, arrays: dict):
    """One target array; {name: array} named after the outputs; or (arrays) in --y-key's order."""
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    return tuple(arrays.values()) if "," in options.y_key else arrays


def _npz_keys(path: Path, keys: list, options: DataOptions) -> tuple[list, list]:
    """The arrays of an .npz that are the inputs (--x-key, else named after the model's inputs,
    else "x") and the targets (--y-key, else named after a model's several outputs, else "y"); an
    error naming the first of them that is missing."""
    names, outputs = options.input_names, options.output_names
    if options.x_key is not None:
        x_keys = [k.strip() for k in options.x_key.split(",")]
    elif names and len(names) > 1 and all(n in keys for n in names):
        x_keys = list(names)  # arrays named after the model's inputs
    else:
        x_keys = ["x"]
    if "," in options.y_key:
        y_keys = [k.strip() for k in options.y_key.split(",")]
    elif outputs and options.y_key not in keys and all(n in keys for n in outputs):
        y_keys = list(outputs)  # arrays named after the model's outputs
    else:
        y_keys = [options.y_key]
    missing = [k for k in x_keys if k not in keys]
    missing_y = [k for k in y_keys if k not in keys]
    if missing or missing_y:
        if missing and names and len(names) > 1:
            hint = f"name its arrays after the model's inputs ({', '.join(names)}) or pass --x-key a,b in input order"
        elif not missing and outputs:
            hint = f"name its arrays after the model's outputs ({', '.join(outputs)}) or pass --y-key a,b in output order"
        else:
            hint = "pass --x-key / --y-key to name the inputs and targets"
        raise DataError(f"{path} has no array {(missing + missing_y)[0]!r} (it has: {', '.join(keys) or 'none'}); {hint}")
    return x_keys, y_keys


def load_csv(path: Path, options: DataOptions, model_assets: Path | None) -> Dataset:
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable CSV ({str(exc).strip().splitlines()[0]}); check the file") from None
    if frame.shape[1] < 2:
        header = str(frame.columns[0]) if frame.shape[1] else ""
        other = next((name for sep, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "bars")) if sep in header), None)
        hint = (f"; its header {header!r} looks separated by {other}: gradwatch reads comma-separated files, so save "
                "it with commas") if other else ""
        raise DataError(f"{path} needs feature columns and a target column; it has {frame.shape[1]} column(s){hint}")
    if len(frame) == 0:
        raise DataError(f"{path} has a header but no rows; give a CSV with one row per example")
    target = options.target if options.target is not None else default_target(list(frame.columns))
    if target not in frame.columns:
        raise DataError(
            f"{path} has no column {target!r} (columns: {', '.join(map(str, frame.columns))}); pass --target NAME"
        )
    weighted = SAMPLE_WEIGHT in frame.columns and SAMPLE_WEIGHT != target  # a column of that name: each row's weight
    features = frame.drop(columns=[target] + [SAMPLE_WEIGHT] * weighted)
    if features.shape[1] == 0:
        raise DataError(f"{path} has no feature column beside {target!r} and {SAMPLE_WEIGHT!r}; give the inputs as columns")
    kept = [target] + [SAMPLE_WEIGHT] * weighted
    text = [str(c) for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    text += [str(c) for c in kept if not pd.api.types.is_numeric_dtype(frame[c])]
    if text:
        raise DataError(f"{path}: columns {', '.join(text)} are not numeric; encode them as numbers first")
    # float64 as parsed: a value beyond float32 is told where it is when it is cast (fit_to_model), not read as inf
    w = frame[SAMPLE_WEIGHT].to_numpy(np.float64) if weighted else None
    dataset = _checked(features.to_numpy(np.float64), frame[target].to_numpy(), "csv", path, w=w)
    dataset.columns = [str(c) for c in features.columns], str(target)
    return dataset


def load_tf_data(path: Path, options: DataOptions, model_assets: Path | None) -> Dataset:
    import tensorflow as tf

    try:
        dataset = tf.data.Dataset.load(str(path))
    except (tf.errors.OpError, ValueError, OSError) as exc:
        raise DataError(f"{path} is not a folder written by tf.data.Dataset.save ({first_line(exc)})") from None
    return from_tf_dataset(dataset, options, path)


def from_tf_dataset(dataset, options: DataOptions, path) -> Dataset:
    """A ``tf.data.Dataset`` of (x, y) or (x, y, sample_weight) examples or batches, as ``fit``
    takes them, read into arrays."""
    spec = dataset.element_spec
    check_elements(spec, path)
    if is_batched(spec):
        dataset = dataset.unbatch()  # saved after .batch(): go back to one example per element
    xs, ys, ws = [], [], []
    for element in dataset.as_numpy_iterator():
        xs.append(element[0])
        ys.append(element[1])
        ws.extend(element[2:])
    if not xs:
        raise DataError(f"{path} holds no elements")
    x, y = _stacked(xs, spec[0]), _stacked(ys, spec[1])
    return _checked(_by_input(x, options, path), _by_output(y, options, path), "tf.data", path,
                    np.stack(ws) if ws else None)


def _stacked(elements: list, spec):
    """The examples of one side (x or y) as arrays of the same structure: a dict, a tuple or one array."""
    if isinstance(spec, dict):
        return {k: np.stack([e[k] for e in elements]) for k in spec}
    if isinstance(spec, (tuple, list)):
        return tuple(np.stack([e[i] for e in elements]) for i in range(len(spec)))
    return np.stack(elements)


def _by_output(y, options: DataOptions, path):
    """Targets for several outputs -> {model output name: array}: by name, or in output order."""
    if not isinstance(y, (dict, tuple, list)):
        return y
    names = options.output_names
    if names is None:
        raise DataError(f"{path} holds {len(y)} target arrays but the model has one output; give one target "
                        "(--y-key NAME)")
    if isinstance(y, dict):
        if set(y) == set(names):
            return {n: y[n] for n in names}
        raise DataError(f"{path} has targets {', '.join(y)} but the model's outputs are {', '.join(names)}; "
                        "name the arrays after them, or pass --y-key a,b in output order")
    if len(y) != len(names):
        raise DataError(f"{path} holds {len(y)} target arrays but the model has {len(names)} outputs "
                        f"({', '.join(names)}); give one target per output")
    return dict(zip(names, y))


def _by_input(x, options: DataOptions, path: Path):
    """Several input arrays -> {model input name: array}: by name, or in the model's input order."""
    if not isinstance(x, (dict, tuple, list)):
        return x
    names = options.input_names
    if isinstance(x, dict):
        if names and set(x) != set(names):
            if len(x) == len(names) and not set(x) & set(names):
                return dict(zip(names, x.values()))  # --x-key a,b: in input order
            raise DataError(
                f"{path} has inputs {', '.join(x)} but the model's inputs are {', '.join(names)}; "
                "name the arrays after them, or pass --x-key a,b in input order"
            )
        return {n: x[n] for n in names} if names else dict(x)
    if names is None and len(x) == 1:
        return x[0]  # [x] for a model of one input: that input, as fit reads it
    if names is None or len(names) != len(x):
        raise DataError(f"{path} holds {len(x)} input arrays but the model takes {len(names or ()) or 1}; check the data")
    return dict(zip(names, x))


def load_text(path: Path, options: DataOptions, model_assets: Path | None) -> Dataset:
    vocab_path = Path(options.vocab) if options.vocab else (model_assets / "vocab.txt" if model_assets else None)
    if vocab_path is None or not vocab_path.is_file():
        where = f"{vocab_path} does not exist" if vocab_path else "the model has no assets/vocab.txt"
        raise DataError(f"a text corpus needs a vocabulary: {where}; pass --vocab FILE (one word a line)")
    vocab = read_vocab(vocab_path)
    if options.num_steps is None:
        raise DataError("a text corpus needs the window length: pass --num-steps N (the model's input has no fixed length)")
    ids = encode_corpus(path, vocab)
    x, y = ptb_windows(ids, options.batch_size, options.num_steps)
    if len(x) == 0:
        raise DataError(
            f"{path} has {len(ids)} tokens, too few for one window of {options.batch_size} x {options.num_steps}; "
            "use a longer corpus or a smaller --batch-size / --num-steps"
        )
    return Dataset(x, y, "text", str(path))


def read_vocab(path: Path) -> dict[str, int]:
    words = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    vocab = {word: i for i, word in enumerate(words)}
    if UNK not in vocab:
        raise DataError(f"vocabulary {path} has no {UNK} entry for unknown words; add a line '{UNK}'")
    return vocab


def encode_corpus(path: Path, vocab: dict[str, int]) -> np.ndarray:
    """Token ids of a corpus: each line's words, then <eos> (if the vocabulary has it), as the
    PTB reader does; unknown words map to <unk>."""
    unk = vocab[UNK]
    eos = [vocab[EOS]] if EOS in vocab else []
    ids: list[int] = []
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                words = line.split()
                if words:
                    ids.extend(vocab.get(w, unk) for w in words)
                    ids.extend(eos)
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; convert it or give an .npz/.csv file") from None
    return np.asarray(ids, dtype=np.int32)


def ptb_windows(ids: np.ndarray, batch_size: int, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a token stream into (inputs, next-token targets) windows as ``ptb_producer`` does.

    The stream is laid out as ``batch_size`` rows of ``batch_len = len(ids) // batch_size``
    tokens; window i of row b is ``data[b, i*T:(i+1)*T]`` and its targets are shifted by one.
    Rows are returned window-major, so without shuffling batch i holds exactly the tutorial's
    i-th batch and each row continues where the same row of the previous batch stopped.
    """
    batch_len = len(ids) // batch_size
    data = ids[: batch_size * batch_len].reshape(batch_size, batch_len)
    epoch_size = max(0, (batch_len - 1) // num_steps)
    x = np.empty((epoch_size * batch_size, num_steps), dtype=np.int32)
    y = np.empty_like(x)
    for i in range(epoch_size):
        x[i * batch_size : (i + 1) * batch_size] = data[:, i * num_steps : (i + 1) * num_steps]
        y[i * batch_size : (i + 1) * batch_size] = data[:, i * num_steps + 1 : (i + 1) * num_steps + 1]
    return x, y


LOADERS = {".npz": load_npz, ".csv": load_csv, ".txt": load_text}


def from_arrays(pair, options: DataOptions) -> Dataset:
    """An in-memory ``(x, y)`` pair (x an array, or a dict / tuple of arrays, one per input), or
    ``(x, y, sample_weight)`` as ``fit`` takes them."""
    if len(pair) not in (2, 3):
        raise DataError(f"data must be an (x, y) pair of arrays, or (x, y, sample_weight), got a sequence of {len(pair)}")
    x, y = pair[:2]
    if isinstance(x, (tuple, list)) and not options.input_names and len(x) != 1:
        raise DataError(f"x is a {type(x).__name__} of {len(x)} items, which Keras reads as one array per input, but "
                        "the model takes one input; give its rows as one array (numpy.asarray(x))")
    w = None if len(pair) == 2 or pair[2] is None else np.asarray(pair[2])
    if isinstance(x, dict):
        x = {k: np.asarray(v) for k, v in x.items()}
    elif isinstance(x, (tuple, list)):
        x = tuple(np.asarray(v) for v in x)
    else:
        x = np.asarray(x)
    if isinstance(y, dict):
        y = {k: np.asarray(v) for k, v in y.items()}
    elif isinstance(y, (tuple, list)) and options.output_names:
        y = tuple(np.asarray(v) for v in y)
    else:
        y = np.asarray(y)
    label = f"arrays ({len(next(iter(y.values())) if isinstance(y, dict) else y[0] if isinstance(y, tuple) else y)} rows)"
    return _checked(_by_input(x, options, label), _by_output(y, options, label), "arrays", label, w)


def label_of(data) -> str:
    """How the files and tables name the data: its path, or what the in-memory object is."""
    if isinstance(data, (str, Path)):
        return str(data)
    if hasattr(data, "element_spec"):
        return "tf.data.Dataset"
    if isinstance(data, (tuple, list)) and len(data) in (2, 3):
        y = data[1]
        first = next(iter(y.values())) if isinstance(y, dict) else y
        return f"arrays ({len(first)} rows)"
    return type(data).__name__


def load_npz_streamed(path: Path, options: DataOptions, model_assets: Path | None) -> Dataset:
    """An uncompressed .npz whose rows are read as batches need them (streams.NpzMember)."""
    from .streams import npz_members

    try:
        with np.load(path, allow_pickle=False) as archive:  # the names only; no array is read
            x_keys, y_keys = _npz_keys(path, list(archive.keys()), options)
            weighted = SAMPLE_WEIGHT in archive.files and SAMPLE_WEIGHT not in x_keys
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
        raise _unreadable_npz(path, exc) from None
    members = npz_members(path, x_keys + y_keys + [SAMPLE_WEIGHT] * weighted)
    x = members[x_keys[0]] if len(x_keys) == 1 else {k: members[k] for k in x_keys}
    y = _npz_targets(options, {k: members[k] for k in y_keys})
    return _checked(_by_input(x, options, path), _by_output(y, options, path), "npz (streamed)", path,
                    members.get(SAMPLE_WEIGHT))


def _size_on_disk(p: Path) -> int:
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def _streams(p: Path, options: DataOptions) -> bool:
    if options.stream is not None:
        return options.stream
    from .streams import AUTO_STREAM_BYTES

    return _size_on_disk(p) > AUTO_STREAM_BYTES


def _of_stream(found, path) -> Dataset:
    dataset = Dataset(found.x, found.y, found.kind, str(path), stream=found.stream, w=found.w)
    if found.w is not None:
        _check_weight_shape(path, found.w, dataset.targets())
    return dataset


def load(path, options: DataOptions, model_assets: Path | None = None) -> Dataset:
    """Load the data at ``path`` (the kind recognised from the path), or an in-memory (x, y)
    pair or tf.data.Dataset of (x, y) examples or batches."""
    if hasattr(path, "element_spec"):
        return from_tf_dataset(path, options, "tf.data.Dataset")
    if isinstance(path, (tuple, list)):
        return from_arrays(path, options)
    if not isinstance(path, (str, Path)):
        raise DataError(f"data must be a path, an (x, y) pair of arrays or a tf.data.Dataset, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise DataError(f"no such data file or folder: {p}")
    if p.suffix.lower() in streams.TFRECORD_SUFFIXES or (p.is_dir() and any(
            f.suffix in streams.TFRECORD_SUFFIXES for f in p.iterdir())):
        return _of_stream(streams.load_tfrecord(p, options, _by_input, _by_output), p)
    if options.features:
        raise DataError("--features describes the records of a TFRecord file (.tfrecord); drop it for this data")
    if p.suffix.lower() == ".keras" or (p.is_dir() and (p / "saved_model.pb").exists()):
        kind = "a .keras model file" if p.suffix.lower() == ".keras" else "a SavedModel folder"
        raise DataError(f"--data {p} is {kind}, not data; give the model first and the data after --data: "
                        f"gradwatch run MODEL --data DATA")
    if p.is_dir():
        if not (p / "dataset_spec.pb").exists() and not any(p.glob("*.snapshot")):
            raise DataError(f"{p} is a folder but not one written by tf.data.Dataset.save; give an .npz, .csv, .txt "
                            "or .tfrecord file")
        if _streams(p, options):
            return _of_stream(streams.load_saved(p, options, _by_input, _by_output), p)
        return load_tf_data(p, options, model_assets)
    if p.suffix.lower() == ".npz" and _streams(p, options):
        return load_npz_streamed(p, options, model_assets)
    if options.stream and p.suffix.lower() in (".csv", ".txt"):
        raise DataError(f"{p}: only .npz files, tf.data.Dataset.save folders and TFRecord files can be streamed; "
                        "drop --stream")
    loader = LOADERS.get(p.suffix.lower())
    if loader is None:
        raise DataError(f"cannot tell the kind of {p}: use .npz, .csv, .txt, .tfrecord or a tf.data.Dataset.save folder")
    return loader(p, options, model_assets)


def _checked(x, y, kind: str, path: Path, w=None) -> Dataset:
    dataset = Dataset(x, y, kind, str(path), w=w)
    first, rows = dataset.targets()[0][0], None
    for name, array in dataset.targets() + dataset.inputs() + ([(SAMPLE_WEIGHT, w)] if w is not None else []):
        if array.ndim == 0:
            raise DataError(f"{path}: {name} needs a leading example dimension; got shape {array.shape}")
        rows = len(array) if rows is None else rows
        if len(array) != rows:
            raise DataError(f"{path}: {name} has {len(array)} rows but {first} has {rows}; they must match")
        if is_text(array) and name.startswith("x"):
            continue  # text for a model that takes strings (a TextVectorization inside): checked against its input
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise DataError(f"{path}: {name} has dtype {array.dtype}; store numbers")
    if w is not None:
        _check_weight_shape(path, w, dataset.targets())
    return dataset


def _check_weight_shape(path, w, targets) -> None:
    """One weight array weighs every output's loss: one weight per row, or per target element."""
    for name, target in targets:
        if tuple(w.shape[1:]) != tuple(target.shape[1:w.ndim]):
            raise DataError(f"{path}: {SAMPLE_WEIGHT} has shape {tuple(w.shape)}, which does not weigh {name} of shape "
                            f"{tuple(target.shape)}; give one weight per row {(len(target),)}, or per target element "
                            f"{tuple(target.shape[:2])}, as Keras' sample_weight")


# --- checks before training -----------------------------------------------------------------


def check_finite(data: Dataset, allow: bool) -> None:
    """NaN or inf in x or y: an error saying how many, in how many rows and where, unless
    ``allow`` (--allow-nonfinite-data: then every step marks its own batch, train.loop's
    holds_nonfinite). Sample weights must be finite whatever ``allow`` says."""
    if data.stream is not None:
        return  # checked as it was counted (streams._stream)
    if data.w is not None:
        _check_weights(data)
    if allow:
        return
    for name, array in data.inputs() + data.targets():
        if not np.issubdtype(array.dtype, np.floating):
            continue
        rows, count, first = _nonfinite(array)
        if rows is None:
            continue
        # a CSV's empty cell, or a line cut short, reads as NaN: name them, they are what the file shows
        kinds = "NaN, inf, an empty cell or a line cut short" if data.kind == "csv" else "NaN or inf"
        raise DataError(
            f"{data.path}: {name} has {counted(count, 'non-finite value')} ({kinds}) in "
            f"{counted(int(rows.sum()), 'row')}, the first at {_where(data, name, first)}; "
            "clean the data, or pass --allow-nonfinite-data to train on it anyway"
        )


def _check_weights(data: Dataset) -> None:
    """Sample weights must be finite and not negative, whatever --allow-nonfinite-data says: a
    weight scales a row's loss, and NaN or a negative weight trains on nothing a user meant."""
    for start, chunk in _chunks(data.w):
        at = first_bad_weight(chunk)
        if at is not None:
            raise DataError(f"{data.path}: {_where(data, SAMPLE_WEIGHT, in_whole(start, at))} is "
                            f"{np.asarray(chunk)[at]:g}; {WEIGHTS_RULE}")


def _nonfinite(array):
    """(mask of the rows with NaN/inf or None, how many values, index of the first) of an
    array, or of a streamed one a chunk at a time (streams.NpzMember.chunks)."""
    rows, count, first = None, 0, None
    for start, chunk in _chunks(array):
        finite = np.isfinite(chunk)
        if finite.all():
            continue
        if rows is None:
            rows = np.zeros(len(array), bool)
        count += int(chunk.size - np.count_nonzero(finite))
        rows[start:start + len(chunk)] = ~finite.reshape(len(chunk), -1).all(axis=1)
        if first is None:
            at = first_true(~finite)
            first = in_whole(start, at)
    return rows, count, first


def _chunks(array):
    """(first row, rows) of an array in one piece, or of a streamed one a chunk at a time."""
    return array.chunks() if hasattr(array, "chunks") else [(0, array)]


def _where(data: Dataset, name: str, index: tuple) -> str:
    if data.columns is not None:  # a CSV: the line in the file (header is line 1) and the column name
        features, target = data.columns
        column = target if name == "y" else SAMPLE_WEIGHT if name == SAMPLE_WEIGHT else features[index[1]]
        return f"line {index[0] + 2}, column {column!r}"
    return indexed(name, index)


def take(x, rows):
    """Rows of one input (or target) array or of every array of several."""
    if isinstance(x, dict):
        return {k: v[rows] for k, v in x.items()}
    return x[rows]


def fit_to_model(dataset: Dataset, model, target_spec=None) -> Dataset:
    """Check the data's shape against the model's input(s) (and its targets against a model's
    several outputs) and cast it to the model's dtypes (:mod:`.casts`: nothing lost on the way)."""
    try:
        return _fit_to_model(dataset, model, target_spec)
    except CastError as exc:
        raise DataError(f"{dataset.path}: {exc.text(lambda name, index: _where(dataset, name, index))}") from None


def _fit_to_model(dataset: Dataset, model, target_spec) -> Dataset:
    x, y = dataset.x, dataset.y
    outputs = getattr(model, "output_names", None)
    if outputs and not isinstance(y, dict):
        raise DataError(f"the model has {len(outputs)} outputs ({', '.join(outputs)}) but {dataset.path} holds one "
                        "target; give an .npz with one array per output (named after them, or --y-key a,b), or a "
                        "tf.data folder of (x, dict)")
    spec = model.input_spec
    if isinstance(spec, dict):
        if not isinstance(x, dict):
            raise DataError(
                f"the model takes {len(spec)} inputs ({', '.join(spec)}) but {dataset.path} holds one; "
                "give an .npz with one array per input (named after them, or --x-key a,b) or a tf.data folder of (dict, y)"
            )
        x = {name: _fit_input(x[name], input_spec, f"input {name!r}", f"x[{name!r}]") for name, input_spec in spec.items()}
    elif isinstance(x, dict) and len(x) == 1 and dataset.stream is None:
        x = next(iter(x.values()))  # {name: array} for a model of one input: that input, as [x] is
    elif isinstance(x, dict):
        fix = ("keep one of them" + (" (--x-key NAME picks it from an .npz)" if dataset.kind == "npz" else "")
               if len(x) > 1 else "store x as the array itself, or read the data into memory (--no-stream)")
        raise DataError(f"{dataset.path} holds {counted(len(x), 'input')} ({', '.join(sorted(map(str, x)))}) in a dict, but "
                        f"the model takes one array; {fix}")
    if not isinstance(x, dict):  # one array: to the model's input, or float64 to float32 where it names none
        x = _fit_input(x, spec, "x") if spec is not None else cast(x, np.float32, "x") if x.dtype == np.float64 else x
    if target_spec is not None:
        y = _cast(y, target_spec.dtype, "y")
    else:  # Keras' own casting of a target: floats (and bools) as float32, integers as they are
        y = {k: _float32_target(v, f"y[{k!r}]") for k, v in y.items()} if isinstance(y, dict) else _float32_target(y)
    w = None if dataset.w is None else cast(dataset.w, np.float32, SAMPLE_WEIGHT)
    fitted = Dataset(x, y, dataset.kind, dataset.path, stream=dataset.stream, w=w)
    fitted.columns = dataset.columns  # a CSV's names, for its cells in errors and its target in the start line
    for name, array in fitted.inputs() + fitted.targets() + ([(SAMPLE_WEIGHT, w)] if w is not None else []):
        if isinstance(array, streams.NpzMember) and can_overflow(array.stored, array.dtype):
            try:
                for _ in array.chunks():  # a value beyond the model's dtype: said now, not in the middle of training
                    pass
            except CastError as exc:  # named as the in-memory array is (x['ids'], not the .npz key)
                raise CastError(name, exc.target, exc.index, exc.value) from None
    return fitted


def _float32_target(y, name: str = "y"):
    return cast(y, np.float32, name) if y.dtype == np.float64 or y.dtype == np.bool_ else y


def _fit_input(array: np.ndarray, spec, name: str, key: str = "x") -> np.ndarray:
    """``name`` words the input in a sentence ("input 'ids'"), ``key`` indexes it (``x['ids'][3, 1]``)."""
    if spec.shape.rank is None:
        return cast(array, np.float32, key) if array.dtype == np.float64 else array
    wanted = spec.shape
    got = (None,) + tuple(array.shape[1:])
    if wanted.rank != len(got) or any(w is not None and w != g for w, g in zip(wanted.as_list()[1:], got[1:])):
        where = "data x" if name == "x" else f"data for {name}"
        fix = "reshape the data or pick another --endpoint"
        if len(got) == 2 and wanted.rank == 2 and np.issubdtype(array.dtype, np.integer) and wanted[1] is not None:
            fix = f"for a text corpus, pass --num-steps {wanted[1]} (the model's window), or reshape the data"
        raise DataError(f"{where} has shape {_shape(got)} per batch but the model expects {_shape(wanted.as_list())}; {fix}")
    return _cast(array, spec.dtype, name, key)


def is_text(array) -> bool:
    """Strings: NumPy's fixed-width unicode or bytes (.npz), or the bytes objects a tf.data
    folder's tf.string elements read as (the only way data here can hold objects, since
    .npz files are read without pickle): the inputs of a model that takes text."""
    return array.dtype.kind in "USO"


def _cast(array: np.ndarray, dtype, name: str, key: str | None = None) -> np.ndarray:
    import tensorflow as tf

    if dtype == tf.string or is_text(array):
        if dtype != tf.string:
            raise DataError(f"the data's {name} is text ({array.dtype}) but the model takes {dtype.name} there; store "
                            "numbers, or give the model whose input takes strings (a TextVectorization layer inside)")
        if not is_text(array):
            raise DataError(f"the model takes text for {name} but the data has {array.dtype}; store strings")
        return array
    target = np.dtype(dtype.as_numpy_dtype)
    # bool is 0/1 for an integer input, as Keras casts it (keras-hub's padding_mask is bool)
    if np.issubdtype(target, np.integer) and not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise DataError(f"the model expects integer {name} ({target}) but the data has {array.dtype}; store ids as integers")
    return cast(array, target, key or name)


def _shape(dims) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in dims) + ")"


def check_targets(data: Dataset, loss: str | dict | None, classes: int | dict | None) -> None:
    """Targets that do not fit the loss (targets.TargetCheck: class ids outside [0, classes),
    binary targets outside [0, 1], shapes the loss would broadcast, ...), read a chunk at a
    time. For several outputs ``loss`` and ``classes`` may be {output name: ...}: each target
    is checked against its output's loss and units."""
    if data.stream is not None:
        return  # checked as it was counted (streams._stream)
    keys = list(data.y) if isinstance(data.y, dict) else [None]
    for key, (name, y) in zip(keys, data.targets()):
        check = targets.for_target(data.path, name, key, loss, classes)
        if check.active:
            for start, chunk in _chunks(y):
                check.feed(start, chunk)
            check.finish()


# --- batch order ----------------------------------------------------------------------------


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return n_rows // batch_size


def epoch_order(n_rows: int, epoch: int, shuffle: bool, seed: int) -> np.ndarray:
    """Row order of 1-based epoch ``epoch``: file order, or a permutation fixed by (seed, epoch)."""
    if not shuffle:
        return np.arange(n_rows)
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


def batches(data: Dataset, batch_size: int, total_steps: int, shuffle: bool, seed: int):
    """Yield ``(epoch, x_batch, y_batch)`` for ``total_steps`` steps, epoch after epoch."""
    per_epoch = steps_per_epoch(len(data), batch_size)
    step = 0
    epoch = 0
    while step < total_steps:
        epoch += 1
        order = epoch_order(len(data), epoch, shuffle, seed)
        for k in range(per_epoch):
            if step >= total_steps:
                return
            rows = order[k * batch_size : (k + 1) * batch_size]
            if not shuffle:
                window = slice(k * batch_size, (k + 1) * batch_size)
                yield epoch, take(data.x, window), take(data.y, window)
            else:
                yield epoch, take(data.x, rows), take(data.y, rows)
            step += 1
