"""What a run minimises and how: the loss and the optimizer, the user's own or named on the command line.

* Loss: ``--loss`` takes any Keras loss identifier (``mse``, ``huber``, ``kl_divergence``,
  ``SparseCategoricalCrossentropy``, ...). Without it, a compiled ``.keras`` model trains with its
  compiled loss through Keras' own ``model.compute_loss`` (so ``model.losses``: regularizers and
  ``add_loss`` terms are in it, as in ``fit``), and a SavedModel with ``loss(inputs, targets)``
  with that function.
* Optimizer: ``--optimizer`` takes any Keras optimizer identifier (``sgd``, ``adamw``, ``lion``, ...,
  and ``momentum`` for SGD with momentum 0.9) with ``--opt NAME=VALUE`` hyperparameters. Without
  it, a compiled ``.keras`` model trains with its compiled optimizer (class, hyperparameters,
  learning-rate schedule; a fresh state), otherwise SGD. The optimizer's own clipping options
  (``clipnorm``, ``clipvalue``, ``global_clipnorm``) are always removed: gradwatch's strategy clips.

Nothing here runs at import time; Keras is imported inside the functions.
"""

from __future__ import annotations

import math

from .errors import OptionError

MOMENTUM = 0.9  # of --optimizer momentum (SGD with momentum, as in Keras)
CLIP_OPTIONS = ("clipnorm", "clipvalue", "global_clipnorm")
DEFAULT_LR = 0.01


def make_loss(name, from_logits: bool = False):
    """A Keras Loss object (reduction: mean over the batch, as ``compile`` uses) for an identifier
    (the Python API also takes a Keras Loss object or a function ``fn(y_true, y_pred)``)."""
    import keras

    try:
        found = keras.losses.get(name)
    except (ValueError, TypeError):
        found = None
    if found is None:
        raise OptionError(
            f"unknown loss {name!r}; give a Keras loss identifier, e.g. mse, huber, binary_crossentropy, "
            "sparse_categorical_crossentropy, kl_divergence"
        )
    cls = _loss_class(found)
    if from_logits:
        if cls is None or "from_logits" not in cls.__init__.__code__.co_varnames:
            raise OptionError(f"--from-logits applies to crossentropy-like losses, not {name}; drop it")
        return cls(from_logits=True)
    if isinstance(found, keras.losses.Loss):
        return found
    if cls is not None:
        return cls()
    if not isinstance(name, str):  # a function of the user's: its name, as a TensorFlow scope may be named
        import re

        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", getattr(name, "__name__", type(name).__name__)).strip("_") or "loss"
    return _FunctionLoss(found, name)


def loss_name(loss) -> str | None:
    """The Keras name of a loss given as an identifier (``mse``) or made from one (a Loss
    object's ``name``, ``mean_squared_error``), for the checks of its targets (load.targets)."""
    if loss is None or isinstance(loss, str):
        return loss
    return getattr(loss, "name", None)


def regularization(losses):
    """The regularization part of a Keras model's loss: the sum of ``model.losses`` (weight and
    activity regularizers, ``add_loss`` terms), in float32; 0 where there are none. Written once
    for gradwatch's own step (train.loop) and for GradientWatch inside ``fit``."""
    import tensorflow as tf

    terms = [tf.reduce_sum(tf.cast(t, tf.float32)) for t in losses]
    return tf.add_n(terms) if terms else tf.constant(0.0)


def _loss_class(found):
    """The Keras Loss class behind an identifier (``mse`` -> MeanSquaredError), if there is one."""
    import keras

    if isinstance(found, type) and issubclass(found, keras.losses.Loss):
        return found
    if isinstance(found, keras.losses.Loss):
        found = getattr(found, "fn", None) or found
        if isinstance(found, keras.losses.Loss):
            return type(found)
    name = _class_named(keras.losses, keras.losses.Loss, getattr(found, "__name__", "").replace("_", ""))
    return getattr(keras.losses, name) if name else None


def _class_named(module, base: type, name: str, exclude: tuple = ()) -> str | None:
    """The attribute of ``module`` that is a subclass of ``base`` named ``name`` in any case
    (``adamw`` -> ``AdamW``, ``meansquarederror`` -> ``MeanSquaredError``), or None."""
    for attr in dir(module):
        candidate = getattr(module, attr)
        if (isinstance(candidate, type) and issubclass(candidate, base) and attr.lower() == name.lower()
                and attr not in exclude):
            return attr
    return None


def _FunctionLoss(fn, name):  # noqa: N802  (a factory that reads like the class it returns)
    import keras

    class FunctionLoss(keras.losses.Loss):
        """A plain loss function with Keras' default reduction (mean over the batch)."""

        def call(self, y_true, y_pred):
            return fn(y_true, y_pred)

    return FunctionLoss(name=name)


def parse_opt_args(items: list[str] | None) -> dict:
    """``--opt beta_1=0.8 --opt amsgrad=true`` -> {'beta_1': 0.8, 'amsgrad': True}."""
    args = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise OptionError(f"--opt {item!r} is not NAME=VALUE; write e.g. --opt beta_1=0.8")
        text = text.strip()
        lowered = text.lower()
        if lowered in ("true", "false"):
            value = lowered == "true"
        elif lowered in ("none", "null"):
            value = None
        else:
            try:
                value = int(text)
            except ValueError:
                try:
                    value = float(text)
                except ValueError:
                    value = text
        args[key] = value
    return args


COMPILED = "the model's compiled optimizer"  # optimizer_config's source for a .keras file's own


def optimizer_config(name: str | None, lr: float | None, args: dict, compiled: dict | None) -> tuple[dict, str]:
    """The Keras config (``{"class_name", "config"}``) of the run's optimizer, and where it came from.

    ``name`` (``--optimizer``, or the ``{"class_name", "config"}`` of an optimizer object) wins; else the model's ``compiled`` optimizer; else SGD. ``lr``
    (``--lr``) and ``args`` (``--opt``) override its hyperparameters; clipping options are removed.
    """
    if isinstance(name, dict):  # a Keras optimizer object given to the Python API, as its config
        config = {"class_name": name["class_name"], "config": dict(name["config"])}
        source = f"the given {name['class_name']} (a copy: the object itself is not changed)"
    elif name is not None:
        key = name.strip()
        extra = {"momentum": MOMENTUM} if key.lower() == "momentum" else {}
        class_name = "SGD" if key.lower() == "momentum" else key
        config = {"class_name": class_name, "config": {**extra}}
        source = "--optimizer"
    elif compiled is not None:
        config = {"class_name": compiled["class_name"], "config": dict(compiled["config"])}
        source = COMPILED
    else:
        config = {"class_name": "SGD", "config": {}}
        source = "default"
    inner = config["config"]
    if lr is not None:
        inner["learning_rate"] = lr
    elif "learning_rate" not in inner:
        inner["learning_rate"] = DEFAULT_LR
    inner.update(args)
    dropped = [f"{option}={inner[option]:g}" for option in CLIP_OPTIONS if inner.get(option) is not None]
    for option in CLIP_OPTIONS:
        inner.pop(option, None)
    if dropped:
        source += f" (its {', '.join(dropped)} dropped: --clip decides the clipping)"
    return config, source


def make_optimizer(config: dict, source: str = "--optimizer", typed=()):
    """Build a Keras optimizer from a config (``source`` as :func:`optimizer_config` says it); bad
    names and hyperparameters become OptionErrors. ``typed``: the option names the user gave with
    ``--opt``, so that a refusal of one of them says to drop it, not to recompile the model."""
    import keras

    class_name = config["class_name"]
    resolved = _optimizer_class_name(class_name)
    if resolved is None:
        raise OptionError(
            f"unknown optimizer {class_name!r}; give a Keras optimizer identifier, e.g. sgd, momentum, adam, "
            "adamw, rmsprop, adagrad, nadam, lion"
        )
    _check_numbers(getattr(keras.optimizers, resolved), config["config"], class_name)
    lr = config["config"].get("learning_rate")  # a number (--lr, --opt, compiled), or a schedule's config
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        check_lr(lr)
    try:
        # the class itself: keras.optimizers.get() does not know every optimizer Keras ships (Lamb, Muon)
        optimizer = getattr(keras.optimizers, resolved).from_config(dict(config["config"]))
    except (ValueError, TypeError) as exc:
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise OptionError(f"optimizer {class_name}: {message}; check --opt NAME=VALUE") from None
    compiled = source.startswith(COMPILED)  # "... (its clipnorm=1 dropped ...)" may follow

    def fix(name: str) -> str:
        if name in typed:
            return f"drop --opt {name}"
        return "compile the model without it, or train with another: --optimizer NAME" if compiled else f"drop {name}"

    refuse_hidden_options(optimizer, f"{COMPILED} {class_name}" if compiled else f"optimizer {class_name}", fix)
    return optimizer


# float32's largest number and half its smallest subnormal: a learning rate outside them is inf or 0
# in the optimizer's float32 arithmetic (1e39 trains on inf, 1e-46 silently not at all).
F32_MAX, F32_TINY = 3.4028234663852886e38, 0.7006492321624085e-45


def check_lr(lr: float) -> None:
    """The rule for a learning rate, given as --lr, --opt learning_rate=... or compiled."""
    if not (math.isfinite(lr) and F32_TINY < lr <= F32_MAX):
        raise OptionError(f"the learning rate must be a number > 0 that float32 holds (at most {F32_MAX:.3g}; the "
                          f"optimizer computes in float32); check --lr or --opt learning_rate. Received: lr={lr}")


def _check_numbers(cls, given: dict, class_name: str) -> None:
    """A hyperparameter whose default is a number must be given as one (``--opt beta_1=abc`` would
    fail only when the step is traced, and look like a problem of the loss or the data)."""
    try:
        defaults = cls().get_config()
    except Exception:  # an optimizer that needs arguments: Keras checks them itself
        return
    for key, value in given.items():
        default = defaults.get(key)
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        shown = str(value).lower() if isinstance(value, bool) else repr(value)  # as typed: true, 'yes', 1
        if numeric and isinstance(value, (str, bool)):  # momentum=true would train as momentum 1.0
            raise OptionError(f"--opt {key}={shown}: optimizer {class_name}'s {key} is a number "
                              f"(default {default:g}); write e.g. --opt {key}={default:g}")
        if isinstance(default, bool) and not isinstance(value, bool):  # nesterov=no is a true string
            raise OptionError(f"--opt {key}={shown}: optimizer {class_name}'s {key} is true or false "
                              f"(default {str(default).lower()}); write --opt {key}=true or --opt {key}=false")


def _optimizer_class_name(name: str) -> str | None:
    """``adamw`` -> ``AdamW`` (Keras' get() takes lower-case names only for some); None if unknown."""
    import keras

    return _class_named(keras.optimizers, keras.optimizers.Optimizer, name, exclude=("Optimizer", "LossScaleOptimizer"))


# Optimizer options that change the applied gradient behind the recorded one: refused (README).
REFUSED_OPTIONS = {
    "gradient_accumulation_steps": "the optimizer would apply the mean of several steps' gradients, not the one recorded",
    "loss_scale_factor": "the optimizer would scale the loss and divide the gradients behind the recorded norms",
    "use_ema": "the weights would be overwritten by their moving average behind the recorded updates",
}


def refuse_hidden_options(optimizer, where: str, fix=None) -> None:
    """A one-line error for an optimizer option that would make the recorded gradient not the
    applied one: the one rule for ``--optimizer``/``--opt``, a compiled optimizer and ``GradientWatch.wrap``.
    ``fix(name)`` says what the user can do about option ``name`` (default: drop it)."""
    inner = getattr(optimizer, "inner_optimizer", None) or optimizer
    for name, why in REFUSED_OPTIONS.items():
        value = getattr(inner, name, None)
        if value not in (None, False, 0):
            raise OptionError(f"{where} has {name}={value}: {why}; gradwatch refuses it: {fix(name) if fix else f'drop {name}'}")


def has_schedule(optimizer) -> bool:
    """Does the optimizer compute its learning rate from a schedule (and so from its step count)?"""
    import keras

    return isinstance(getattr(optimizer, "_learning_rate", None), keras.optimizers.schedules.LearningRateSchedule)


def describe_optimizer(optimizer, source: str) -> str:
    """'AdamW(learning_rate=0.001, weight_decay=0.004), the model's compiled optimizer'."""
    config = optimizer.get_config()
    lr = config.get("learning_rate")
    if isinstance(lr, dict):
        lr_text = f"schedule {lr.get('class_name', '?')}"
    else:
        lr_text = f"{float(lr):.4g}"
    shown = [f"learning_rate={lr_text}"]
    for key in ("momentum", "weight_decay", "beta_1", "beta_2"):
        if config.get(key) not in (None, 0, 0.0):
            shown.append(f"{key}={config[key]:g}" if isinstance(config[key], float) else f"{key}={config[key]}")
    where = "" if source in ("--optimizer", "default") else f", {source}"
    return f"{type(optimizer).__name__}({', '.join(shown)}){where}"
