"""Puts a run together: a sample or the user's files -> model, data, loss, options -> Trainer.

Options left unset (None) take the sample's defaults, then gradwatch's (``DEFAULTS``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from .errors import OptionError

DEFAULTS = {
    "batch_size": 32,
    "seed": 0,
    "decay_after_epoch": 1,
    "on_nonfinite": "skip",
    "sparse_norm": "summed",
    "start_step": 0,
    "fresh_optimizer": False,
    "checkpoint_every": 100,
    "spike_factor": 2.0,
    "spike_window": 20,
    "spike_floor": 0.01,
    "from_logits": False,
    "allow_nonfinite_data": False,
    "strategy": "none",
    "shuffle_buffer": 10000,
}


@dataclass(frozen=True)
class RunSpec:
    """Everything a user can say about a run; None means "not given"."""

    model: str | None = None
    data: str | None = None
    sample: str | None = None
    endpoint: str | None = None
    output: str | None = None
    x_key: str | None = None
    y_key: str | None = None
    target: str | None = None
    vocab: str | None = None
    num_steps: int | None = None
    loss: str | None = None
    from_logits: bool | None = None
    batch_size: int | None = None
    steps: int | None = None
    epochs: int | None = None
    shuffle: bool | None = None
    seed: int | None = None
    optimizer: str | None = None
    opt: tuple | None = None  # --opt NAME=VALUE hyperparameters of the optimizer
    lr: float | None = None
    lr_decay: float | None = None
    decay_after_epoch: int | None = None
    on_nonfinite: str | None = None
    sparse_norm: str | None = None  # clipping measures an embedding's repeated rows summed or by rows (train.step)
    start_step: int | None = None  # continue as step N+1 of the user's training (N batches of the order consumed)
    fresh_optimizer: bool | None = None  # ignore the optimizer state a .keras file carries
    checkpoint: str | None = None  # a tf.train.Checkpoint(model=, optimizer=) to continue from
    save_checkpoints: str | None = None  # write the run's state there (run)
    checkpoint_every: int | None = None  # ... every N steps
    fetch_every: int | None = None
    xla: bool | None = None
    spike_factor: float | None = None
    spike_window: int | None = None
    spike_floor: float | None = None  # the spike rule's absolute floor, a fraction of the loss's largest magnitude
    allow_nonfinite_data: bool | None = None
    strategy: str | None = None  # tf.distribute: none, mirrored or multiworker (distribute.STRATEGIES)
    cpu_devices: int | None = None  # split the CPU into N logical devices (mirrored without GPUs)
    stream: bool | None = None  # read the data as a stream (None: when larger than streams.AUTO_STREAM_BYTES)
    features: str | None = None  # a TFRecord file's features, NAME:DTYPE[:SHAPE],...
    shuffle_buffer: int | None = None  # record streams: elements in the shuffle buffer
    imports: tuple | None = None  # --import MODULE: Python modules imported before the model loads (its custom layers)


def resolve(spec: RunSpec) -> RunSpec:
    """Fill a spec from its sample (MODEL and --data absent: the default sample) and DEFAULTS."""
    from . import samples

    if spec.model is None and spec.data is not None and spec.sample is None:
        raise OptionError("--data needs a MODEL argument (or drop --data to use a built-in sample)")
    if spec.model is not None and spec.sample is not None:
        raise OptionError("give a MODEL or --sample NAME, not both")
    values = {f.name: getattr(spec, f.name) for f in fields(spec)}
    if spec.model is None:
        sample = samples.get(spec.sample or samples.DEFAULT)
        model_path, data_path = samples.materialize(sample)
        values["model"] = str(model_path)
        values["sample"] = sample.name
        if spec.data is None:
            values["data"] = str(data_path)
        for key, value in sample.defaults.items():
            if values.get(key) is None:
                values[key] = value
    if values["data"] is None:
        raise OptionError("no data: pass --data PATH (.npz, .csv, .txt or a tf.data.Dataset.save folder)")
    for key, value in DEFAULTS.items():
        if values[key] is None:
            values[key] = value
    _check_counts(values)
    return replace(spec, **values)


MAX_SEED = 2**32 - 1  # NumPy's and TensorFlow's seeds both take this range
MAX_STEPS = 10**12  # a run's steps must fit the step counters (int64) with room; nothing is sized by them


def _check_counts(values: dict) -> None:
    """The integer options that would fail deep inside NumPy or TensorFlow, checked before loading."""
    seed = values.get("seed")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise OptionError(f"`--seed` must be between 0 and {MAX_SEED}. Received: seed={seed}")
    num_steps = values.get("num_steps")
    if num_steps is not None and num_steps < 1:
        raise OptionError(f"`--num-steps` must be >= 1. Received: num_steps={num_steps}")
    for name in ("steps", "epochs", "start_step"):
        value = values.get(name)
        if value is not None and value > MAX_STEPS:
            raise OptionError(f"`--{name}` must be at most {MAX_STEPS:.0e}. Received: {name}={value}")


def prepare(spec: RunSpec):
    """Load model and data of a resolved spec and build the Trainer (imports TensorFlow)."""
    from .train import distribute
    from .tf_import import tensorflow

    distribute.check_options(spec.strategy, spec.cpu_devices)
    if spec.shuffle_buffer < 1:
        raise OptionError(f"`--shuffle-buffer` must be >= 1. Received: shuffle_buffer={spec.shuffle_buffer}")
    tensorflow()
    distribution = distribute.make(spec.strategy, spec.cpu_devices)  # before TensorFlow's first op
    with distribute.scope(distribution):  # the model's and optimizer's variables live on every replica
        return _prepare(spec, distribution)


def _prepare(spec: RunSpec, distribution):
    from .load import data as data_mod
    from .load import models
    from .diagnose.spikes import SpikeRule
    from . import objective
    from .objective import make_loss, parse_opt_args
    from .train.loop import TrainOptions, Trainer

    spike_rule = SpikeRule(factor=spec.spike_factor, window=spec.spike_window, floor=spec.spike_floor)
    import keras

    # Keras layers draw their random streams (Dropout's masks, ...) from seeds set when the model is
    # built: seed them from --seed before loading, so a run is the same run every time.
    keras.utils.set_random_seed(spec.seed)
    # Every option is checked (TrainOptions) before the model and the data are loaded.
    train_options = TrainOptions(
        batch_size=spec.batch_size,
        steps=spec.steps,
        epochs=spec.epochs,
        shuffle=bool(spec.shuffle),  # set below, once the data's kind is known
        seed=spec.seed,
        optimizer=spec.optimizer,
        optimizer_args=parse_opt_args(list(spec.opt or ())),
        lr=spec.lr,
        lr_decay=spec.lr_decay,
        decay_after_epoch=spec.decay_after_epoch,
        on_nonfinite=spec.on_nonfinite,
        sparse_norm=spec.sparse_norm,
        start_step=spec.start_step,
        fresh_optimizer=spec.fresh_optimizer,
        checkpoint=None if spec.checkpoint is None else str(spec.checkpoint),
        save_checkpoints=None if spec.save_checkpoints is None else str(spec.save_checkpoints),
        checkpoint_every=spec.checkpoint_every,
        fetch_every=spec.fetch_every,
        xla=spec.xla,
        spike_rule=spike_rule,
    )
    if spec.from_logits and not spec.loss:
        raise OptionError("--from-logits needs --loss NAME (a crossentropy loss)")
    loss = make_loss(spec.loss, spec.from_logits) if spec.loss else None
    models.import_modules(spec.imports or ())  # the user's code that defines the model's custom classes
    model = models.load(spec.model, endpoint=spec.endpoint, output=spec.output)
    num_steps = spec.num_steps if spec.num_steps is not None else model.input_length
    # the user's own word for the loss (--loss mse), or a Loss object's Keras name (the Python API)
    loss_name = objective.loss_name(spec.loss if isinstance(spec.loss, str) else loss) or model.compiled_loss_name
    options = data_mod.DataOptions(
        x_key=spec.x_key,
        input_names=model.input_names,
        output_names=model.output_names,
        y_key=spec.y_key or "y",
        target=spec.target,
        vocab=spec.vocab,
        num_steps=num_steps,
        batch_size=spec.batch_size,
        stream=spec.stream,
        features=spec.features,
        shuffle_buffer=spec.shuffle_buffer,
        allow_nonfinite=spec.allow_nonfinite_data,
        targets=(loss_name, model.output_dim) if loss_name else None,
    )
    dataset = data_mod.load(spec.data, options, model.assets)
    data_mod.check_finite(dataset, spec.allow_nonfinite_data)
    if loss_name:
        data_mod.check_targets(dataset, loss_name, model.output_dim)
    if spec.shuffle is None:  # arrays shuffle, a text corpus keeps its order
        train_options = replace(train_options, shuffle=dataset.kind != "text")
    return Trainer(model, dataset, train_options, loss=loss, mark_input=bool(spec.allow_nonfinite_data),
                   distribution=distribution)


def run_meta(spec: RunSpec) -> dict:
    """What a resolved spec trains on what, as the CSVs record it (record.rows.META_COLUMNS)."""
    from . import samples

    from .load.data import label_of as data_label
    from .load.models import label_of as model_label

    model, data = model_label(spec.model), data_label(spec.data)
    if spec.sample:
        model = f"sample:{spec.sample}"
        if Path(data).resolve().is_relative_to(samples.cache_dir().resolve()):
            data = f"sample:{spec.sample}/{Path(data).name}"
    return {"model": model, "data": data, "sparse_norm": spec.sparse_norm or DEFAULTS["sparse_norm"]}


def describe(spec: RunSpec) -> str:
    """One line naming what is trained on what."""
    from .record.rows import describe_meta

    return describe_meta(run_meta(spec))


def run_line_from_options(given: dict) -> list[str]:
    """``gradwatch run`` with the user's own options (as given to a command; None: not given),
    without the run's length (a probe's length is not the training's) and without clipping."""
    parts = ["gradwatch", "run"]
    if given.get("model") is not None:
        parts.append(given["model"])
    flags = {"from_logits": "--from-logits", "allow_nonfinite_data": "--allow-nonfinite-data",
             "fresh_optimizer": "--fresh-optimizer"}
    for name in RunSpec.__dataclass_fields__:
        value = given.get(name)
        if name in ("model", "steps", "epochs", "save_checkpoints", "checkpoint_every") or value is None:
            continue
        option = "--" + name.replace("_", "-")
        if name in flags:
            parts += [flags[name]] if value else []
        elif name in ("shuffle", "xla", "stream"):
            parts.append(option if value else f"--no-{name}")
        elif name in ("opt", "imports"):
            for item in value:
                parts += ["--opt" if name == "opt" else "--import", item]
        else:
            parts += [option, getattr(value, "value", value)]
    return parts


def command_line(parts: list, clip: str, threshold: float) -> str:
    """A shell-quoted command line from ``parts`` with ``--clip CLIP --norm THRESHOLD`` at the end."""
    import shlex

    return " ".join(shlex.quote(str(p)) for p in parts + ["--clip", clip, "--norm", f"{threshold:g}"])
