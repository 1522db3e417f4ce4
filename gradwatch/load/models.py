"""SavedModel folders and Keras ``.keras`` files -> one small object gradwatch can train.

Loading a model runs code stored in it (traced TF graphs, and for ``.keras`` files Keras layer
configs; Keras ``safe_mode`` stays on, so no arbitrary Python lambdas are deserialised).
Files on disk are only read, never written.

Supported:

* ``tf.saved_model.save`` of a ``tf.Module`` with a ``tf.function`` ``__call__``;
* Keras 3 ``model.export()`` (endpoint ``serve``);
* ``tf.saved_model.save(keras_model)``, which only has ``signatures["serving_default"]``
  (keyword inputs, dict outputs: the single output is used, or ``--output NAME``);
* a Keras 3 ``.keras`` file, called with ``training=True``.

A SavedModel with a callable ``loss(inputs, targets)`` brings its own loss; ``--loss`` overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import os
from pathlib import Path
from typing import Any, Callable

from ..errors import ModelError, first_line

ENDPOINT_ORDER = ("__call__", "serve", "serving_default")


@dataclass
class LoadedModel:
    path: str
    kind: str  # "savedmodel" or "keras"
    endpoint: str
    forward: Callable  # x -> predictions
    own_loss: Callable | None  # (x, y) -> scalar, if the model brings one
    trainable: list  # variables that training may change
    variables: list  # every variable (trainable or not): the state restored between variants
    input_spec: Any  # tf.TensorSpec of the input (leading batch dim), {name: spec} for several inputs, or None
    assets: Path | None = None
    keep_alive: Any = field(default=None, repr=False)
    output_dim: int | dict | None = None  # static last dimension of the output (classes of a classifier), if
    # known; {output name: dimension} for a Keras model with several outputs
    output_names: tuple | None = None  # a Keras model with several outputs: the names its targets go by
    # Keras models only: Keras' own compute_loss(x, y, y_pred) when compiled with a loss, the
    # extra losses (regularizers, add_loss) of the last call, the compiled optimizer's config,
    # and whether layers compute in float16 (mixed precision: the loss must be scaled).
    compiled_loss: Callable | None = None
    extra_losses: Callable | None = None
    compiled_optimizer: dict | None = None
    loss_scaling: bool = False
    # The training state the file (or object) carries: its compiled optimizer once it has trained
    # (slots, iteration count), and a LossScaleOptimizer's (scale, good steps); None: none saved.
    saved_optimizer: Any = None
    compiled_loss_name: str | dict | None = None  # the compiled loss's Keras name (mse, categorical_crossentropy),
    # if known; {output name: name or None} for several outputs
    saved_loss_scale: tuple | None = None
    warnings: list = field(default_factory=list)  # said once on stderr before training

    @property
    def input_length(self) -> int | None:
        """Static length of the second input dimension (the window of a word LM), if known."""
        spec = self.input_spec
        if spec is None or isinstance(spec, dict) or spec.shape.rank is None or spec.shape.rank < 2:
            return None
        return spec.shape[1]

    @property
    def input_names(self) -> tuple | None:
        """Names of the inputs, in order, for a model with several; None for one."""
        return tuple(self.input_spec) if isinstance(self.input_spec, dict) else None


def import_modules(names) -> None:
    """``--import``: the user's modules that define a model's custom classes, imported before it
    loads (their ``@keras.saving.register_keras_serializable`` runs then). A name is imported as
    Python would from the current folder; a path ending in ``.py`` is run as that file."""
    import importlib
    import importlib.util
    import sys

    for name in names:
        try:
            if name.endswith(".py"):
                path = Path(name)
                if not path.is_file():
                    raise ModelError(f"--import {name}: no such file; give a .py file or a module name")
                existing = sys.modules.get(path.stem)
                if existing is not None:
                    where = getattr(existing, "__file__", None)
                    if where and Path(where).resolve() == path.resolve():
                        continue  # imported already (an earlier call): its classes are registered
                    raise ModelError(f"--import {name}: Python already has a module named {path.stem} "
                                     f"({where or 'built in'}), which this file would replace; rename the file")
                spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module
                spec.loader.exec_module(module)
            else:
                if "" not in sys.path and "." not in sys.path and os.getcwd() not in sys.path:
                    sys.path.insert(0, os.getcwd())  # as `python -c` would: the current folder first
                importlib.import_module(name)
        except ModelError:
            raise
        except ModuleNotFoundError as exc:
            raise ModelError(f"--import {name}: {first_line(exc)}; give a module importable from here, or its .py file") from None
        except Exception as exc:  # the user's module failed as it ran: say what it raised
            raise ModelError(f"--import {name}: importing it raised {type(exc).__name__}: {first_line(exc)}") from None


def _custom_classes(p: Path) -> list[str]:
    """The classes a .keras archive's config names that Keras cannot find on its own: outside
    Keras and the libraries it imports itself (keras_hub, ...), and not registered in this process."""
    import json
    import zipfile

    import keras

    found: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            module, name = node.get("module"), node.get("class_name")
            if isinstance(name, str) and "config" in node and ("module" in node or "registered_name" in node):
                package = (module or "").split(".")[0]
                registered = node.get("registered_name") or name
                known = keras.saving.get_registered_object(registered) is not None
                if package not in ("keras", "keras_hub", "keras_cv", "keras_nlp", "builtins") and not known:
                    label = name if registered == name else f"{name} (registered as {registered})"
                    if label not in found:
                        found.append(label)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    try:
        with zipfile.ZipFile(p) as archive:
            walk(json.loads(archive.read("config.json")))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return []
    return found


def load(path: str, endpoint: str | None = None, output: str | None = None) -> LoadedModel:
    if not isinstance(path, (str, Path)):
        return _from_keras_object(path)
    p = Path(path)
    if not p.exists():
        raise ModelError(f"no such model: {p}; give a SavedModel folder or a .keras file")
    if p.is_file():
        if p.suffix == ".keras":
            return _load_keras(p)
        if p.suffix in (".h5", ".hdf5"):
            raise ModelError(f"{p} is a legacy HDF5 file; re-save it with model.save('model.keras')")
        raise ModelError(f"{p} is a file but not a .keras model; give a SavedModel folder or a .keras file")
    if not (p / "saved_model.pb").exists() and not (p / "saved_model.pbtxt").exists():
        raise ModelError(f"{p} is not a SavedModel (no saved_model.pb inside); give the folder written by tf.saved_model.save")
    return _load_saved_model(p, endpoint, output)


def _load_keras(p: Path) -> LoadedModel:
    import zipfile

    import keras

    if not zipfile.is_zipfile(p):
        raise ModelError(f"{p} is not a complete .keras archive (truncated, or not written by model.save); "
                         "save the model again with model.save('model.keras')")

    import warnings

    try:
        with warnings.catch_warnings():
            # Keras warns when the saved optimizer state does not match: gradwatch builds a fresh one.
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            # ... and that it did not compile a class with its own compile(): _compile_as_saved does
            warnings.filterwarnings("ignore", message="`compile\\(\\)` was not called as part of model loading")
            model = keras.saving.load_model(str(p), safe_mode=True)
    except Exception as exc:  # Keras raises many types for bad archives and unsafe content
        text = first_line(exc)
        if "Lambda" in text and "safe_mode" in text:
            raise ModelError(
                f"cannot load {p}: it has a Lambda layer holding a Python lambda, and Keras' safe_mode (which "
                "gradwatch keeps on: loading runs the model's code) refuses to deserialize arbitrary Python; "
                "replace the Lambda with a registered custom layer, or export a SavedModel"
            ) from None
        custom = _custom_classes(p)
        if custom:
            raise ModelError(
                f"cannot load {p}: it uses custom class{'es' * (len(custom) > 1)} {', '.join(custom)}, which this "
                "process does not know; pass --import MODULE (the module, or its .py file, that defines "
                f"{'them' if len(custom) > 1 else 'it'} with @keras.saving.register_keras_serializable)"
            ) from None
        raise ModelError(f"cannot load {p} ({text}); re-save it with Keras 3 model.save()") from None
    failed = _compile_as_saved(model, p)
    loaded = _wrap_keras(model, p)
    if failed:
        loaded.warnings.append(failed)
    return loaded


def _compile_as_saved(model, p: Path) -> str | None:
    """Compile with the file's own compile config where Keras skipped it: a class that overrides
    ``compile()`` but not ``compile_from_config()`` (keras-hub's tasks: ``GPT2CausalLM``,
    ``BertTextClassifier``, ...) loads uncompiled, or with its class's default optimizer and loss,
    and Keras warns "call compile() manually after loading". gradwatch does that, so the run uses
    the optimizer and loss the model was compiled with, as ``fit`` did before it was saved.
    Returns a warning when that compile fails (the model then keeps what Keras gave it)."""
    import json
    import warnings
    import zipfile

    import keras

    cls = type(model)
    if cls.compile is keras.Model.compile or cls.compile_from_config is not keras.Model.compile_from_config:
        return  # Keras compiled it from the file itself (or the class knows how)
    try:
        with zipfile.ZipFile(p) as archive:
            config = json.loads(archive.read("config.json")).get("compile_config")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return
    if not config:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.compile(**keras.saving.deserialize_keras_object(config, safe_mode=True))
    except Exception as exc:  # the class's compile refuses the saved arguments: keep what Keras gave
        return (f"Keras does not restore {p.name}'s compile config ({cls.__name__} overrides compile()) and "
                f"compiling with it failed ({first_line(exc)}); the model keeps the optimizer and loss it has "
                "after loading: pass --optimizer and --loss to choose")
    return None


def label_of(model) -> str:
    """How the files and tables name a model: its path, or ``keras.Model NAME``."""
    if isinstance(model, (str, Path)):
        return str(model)
    return f"keras.Model {getattr(model, 'name', type(model).__name__)}"


def _from_keras_object(model) -> LoadedModel:
    """An in-memory ``keras.Model``: trained as it is (its compiled loss and optimizer, if any)."""
    import keras

    if not isinstance(model, keras.Model):
        raise ModelError(f"model must be a path or a keras.Model, got {type(model).__name__}")
    if not model.built:
        raise ModelError(f"keras.Model {model.name} is not built; call it on a batch (or build it) first")
    return _wrap_keras(model, label_of(model))


def _wrap_keras(model, p) -> LoadedModel:
    if not model.trainable_variables:
        raise ModelError(f"{p} has no trainable variables; set layer.trainable = True before saving")
    _refuse_own_train_step(model, p)
    outputs = getattr(model, "outputs", None)
    output_names = _output_names(model) if outputs and len(outputs) > 1 else None
    compiled_loss = None
    if getattr(model, "_compile_loss", None) is not None:
        # Keras' own loss of fit: the compiled loss plus model.losses (regularizers, add_loss).
        as_outputs = _as_model_outputs(model, output_names)
        compiled_loss = lambda x, y, y_pred, w=None: model.compute_loss(  # noqa: E731
            x=x, y=as_outputs(y), y_pred=y_pred, sample_weight=w, training=True)
        if output_names is not None:
            _build_compiled_loss(model, as_outputs, output_names)
    compiled_optimizer = saved_optimizer = saved_loss_scale = None
    if getattr(model, "optimizer", None) is not None:
        inner = getattr(model.optimizer, "inner_optimizer", None) or model.optimizer  # unwrap a LossScaleOptimizer
        # get_config() serializes a learning-rate schedule too, so it is rebuilt with the optimizer.
        compiled_optimizer = {"class_name": type(inner).__name__, "config": inner.get_config()}
        if getattr(inner, "built", False) and int(inner.iterations.numpy()) > 0:
            saved_optimizer = inner  # Keras restored its slots and iteration count with the weights
            if inner is not model.optimizer and getattr(model.optimizer, "built", False):
                saved_loss_scale = (float(model.optimizer.dynamic_scale.numpy()), int(model.optimizer.step_counter.numpy()))
    policy = getattr(model, "dtype_policy", None)
    loss_scaling = getattr(policy, "name", "") == "mixed_float16" or any(
        getattr(getattr(layer, "dtype_policy", None), "compute_dtype", None) == "float16" for layer in model._flatten_layers()
    )
    def last_dim(tensor):
        return tensor.shape[-1] if tensor.shape else None

    if output_names is None:
        output_dim = last_dim(outputs[0]) if outputs else None
    else:
        output_dim = dict(zip(output_names, map(last_dim, _outputs_in_name_order(model, output_names))))
    import tensorflow as tf

    spec = None
    inputs = getattr(model, "inputs", None)
    if inputs and len(inputs) == 1:
        spec = tf.TensorSpec(inputs[0].shape, inputs[0].dtype)
    elif inputs:
        spec = {t.name: tf.TensorSpec(t.shape, t.dtype, name=t.name) for t in inputs}
    return LoadedModel(
        path=str(p),
        kind="keras",
        endpoint="call",
        forward=lambda x: model(x, training=True),
        own_loss=None,
        trainable=list(model.trainable_variables),
        variables=list(model.variables),
        input_spec=spec,
        keep_alive=model,
        output_dim=output_dim,
        compiled_loss=compiled_loss,
        extra_losses=lambda: model.losses,
        compiled_optimizer=compiled_optimizer,
        loss_scaling=loss_scaling,
        saved_optimizer=saved_optimizer,
        output_names=output_names,
        compiled_loss_name=_loss_names(getattr(model, "loss", None), output_names) if compiled_loss is not None else None,
        saved_loss_scale=saved_loss_scale,
    )


def _refuse_own_train_step(model, p) -> None:
    """A model class with its own train_step() trains as that method says, and gradwatch's step
    (forward, compute_loss, clip, apply) would be another training: refused, with the way to
    record the real one. An own compute_loss() is followed: gradwatch calls it."""
    import keras

    if type(model).train_step is keras.Model.train_step:
        return
    owner = next(c for c in type(model).__mro__ if "train_step" in vars(c))
    raise ModelError(f"{p}: {owner.__name__} has its own train_step(), which gradwatch's step would not follow, "
                     "so its numbers would not be your training's; record your own fit instead: "
                     "model.compile(optimizer=watch.wrap(optimizer), ...) and "
                     "model.fit(..., callbacks=[watch]) with watch = gradwatch.keras.GradientWatch(...)")


def _output_names(model) -> tuple:
    """The names a multi-output Keras model's targets go by, in its order: the keys of the dict it
    returns, else its output layers' names (``model.output_names``), as ``fit`` takes a dict ``y``."""
    try:
        structure = model.output  # a functional model's outputs as it was built: a dict or a list
    except (AttributeError, ValueError):
        structure = None
    if isinstance(structure, dict):
        return tuple(structure)
    return tuple(model.output_names)


def _as_model_outputs(model, names: tuple | None):
    """{output name: targets} -> the structure the model returns (a dict, or a list in its order),
    the one Keras' compiled loss matches targets to outputs by; one output's targets as they are."""
    if names is None:
        return lambda y: y
    if isinstance(getattr(model, "output", None), dict):
        return lambda y: {n: y[n] for n in names}
    return lambda y: [y[n] for n in names]


def _build_compiled_loss(model, as_outputs, names: tuple) -> None:
    """Build Keras' compiled loss of a model with several outputs now, while the model loads (in a
    tf.distribute strategy's scope, where there is one): it then makes its per-output loss
    trackers, variables that a replica's traced step cannot create."""
    import keras

    outputs = _outputs_in_name_order(model, names)
    zeros = as_outputs({n: keras.ops.zeros([1 if d is None else d for d in t.shape], t.dtype)
                        for n, t in zip(names, outputs)})
    model._compile_loss.build(zeros, zeros)


def _outputs_in_name_order(model, names: tuple) -> list:
    structure = getattr(model, "output", None)
    return [structure[n] for n in names] if isinstance(structure, dict) else list(model.outputs)


def _loss_names(loss, output_names: tuple | None):
    """The compiled loss's Keras name; for several outputs {output name: name, or None where that
    output has no loss}: one loss is every output's, as Keras applies it."""
    if output_names is None:
        return _loss_name(loss)
    if isinstance(loss, dict):
        return {n: _loss_name(loss.get(n)) for n in output_names}
    if isinstance(loss, (list, tuple)):
        return {n: _loss_name(item) for n, item in zip(output_names, loss)}
    return dict.fromkeys(output_names, _loss_name(loss))


def _loss_name(loss) -> str | None:
    """The Keras name of what compile(loss=...) was given: a string, a Loss object or a function."""
    if isinstance(loss, str):
        return loss
    return getattr(loss, "name", None) or getattr(loss, "__name__", None) if loss is not None else None


def _load_saved_model(p: Path, endpoint: str | None, output: str | None) -> LoadedModel:
    import tensorflow as tf

    try:
        obj = tf.saved_model.load(str(p))
    except Exception as exc:  # corrupted protos, missing ops, unreadable variables
        raise ModelError(f"cannot load SavedModel {p} ({first_line(exc)})") from None

    name, fn, concrete = _pick_endpoint(obj, endpoint)
    own_loss = getattr(obj, "loss", None)
    own_loss_concrete = _concrete_functions(own_loss) if own_loss is not None else []
    if own_loss is not None and not own_loss_concrete:
        own_loss = None  # an attribute called loss that is not a restored function

    spec, is_keyword = _input_spec(concrete, name, p)
    forward = _output_picker(fn, concrete, is_keyword, output, name, p)
    warnings = []
    if _inference_mode(concrete[0]):
        warnings.append(
            f"endpoint {name!r} of {p} was traced in inference mode: its BatchNormalization uses the moving "
            "statistics and never updates them (and Dropout, if any, is off), so this is not the training fit "
            "runs; export a training endpoint (README, 'Training endpoints') and pick it with --endpoint"
        )

    trainable = _unique(getattr(obj, "trainable_variables", None) or [])
    if not trainable:
        trainable = _unique(v for f in concrete + own_loss_concrete for v in f.trainable_variables)
    if not trainable:
        raise ModelError(
            f"{p} has no trainable variables (endpoint {name!r} captures none); "
            "export the model with trainable tf.Variables (tf.Variable(..., trainable=True))"
        )
    variables = _unique(
        list(getattr(obj, "variables", None) or [])
        + [v for f in concrete + own_loss_concrete for v in f.variables]
        + trainable
    )
    assets = p / "assets" if (p / "assets").is_dir() else None
    return LoadedModel(
        path=str(p),
        kind="savedmodel",
        endpoint=name,
        forward=forward,
        own_loss=own_loss,
        trainable=trainable,
        variables=variables,
        input_spec=spec,
        assets=assets,
        keep_alive=obj,
        output_dim=_output_dim(concrete, output),
        warnings=warnings,
    )


def _concrete_functions(fn) -> list:
    if fn is None:
        return []
    if hasattr(fn, "structured_input_signature") and hasattr(fn, "trainable_variables"):
        return [fn]  # a signature: already concrete
    return list(getattr(fn, "concrete_functions", None) or [])


def _pick_endpoint(obj, endpoint: str | None):
    signatures = dict(getattr(obj, "signatures", {}) or {})
    candidates = [endpoint] if endpoint else list(ENDPOINT_ORDER)
    for name in candidates:
        # Keras' serving_default exists only as a signature; other names are attributes first.
        fn = None if name == "serving_default" else getattr(obj, name, None)
        if not _concrete_functions(fn) and name in signatures:
            fn = signatures[name]
        concrete = _concrete_functions(fn)
        if concrete:
            return name, fn, concrete
    available = sorted(
        {n for n in dir(obj) if not n.startswith("_") and _concrete_functions(getattr(obj, n, None))}
        | set(signatures)
        | ({"__call__"} if _concrete_functions(getattr(obj, "__call__", None)) else set())
    )
    if endpoint:
        raise ModelError(f"the model has no endpoint {endpoint!r}; available: {', '.join(available) or 'none'}")
    raise ModelError(
        f"the model has no __call__, serve or serving_default endpoint; pass --endpoint NAME "
        f"(available: {', '.join(available) or 'none'})"
    )


def _input_spec(concrete: list, name: str, p: Path):
    """(spec, how to call): one TensorSpec and False (positional) or its keyword; several inputs:
    {name: spec} and "keywords" (a signature's keyword inputs) or "positional" (in order)."""
    import tensorflow as tf

    args, kwargs = concrete[0].structured_input_signature
    tensors = [a for a in tf.nest.flatten(args) if isinstance(a, tf.TensorSpec)]
    keyword = {k: v for k, v in (kwargs or {}).items() if isinstance(v, tf.TensorSpec)}
    if len(tensors) == 1 and not keyword:
        return tensors[0], False
    if not tensors and len(keyword) == 1:
        return next(iter(keyword.values())), next(iter(keyword))
    if keyword and not tensors:
        return dict(sorted(keyword.items())), "keywords"
    if tensors and not keyword:
        return {(t.name or f"input_{i + 1}"): t for i, t in enumerate(tensors)}, "positional"
    raise ModelError(f"endpoint {name!r} of {p} mixes positional and keyword inputs; export one kind")


def _output_picker(fn, concrete, keyword, output: str | None, name: str, p: Path) -> Callable:
    import tensorflow as tf

    args_structure = concrete[0].structured_input_signature[0]

    def forward(x):
        if keyword == "keywords":
            result = fn(**x)
        elif keyword == "positional":  # the inputs in the nesting the endpoint was traced with
            result = fn(*tf.nest.pack_sequence_as(args_structure, list(x.values())))
        else:
            result = fn(**{keyword: x}) if keyword else fn(x)
        if isinstance(result, dict):
            if output is not None:
                if output not in result:
                    raise ModelError(f"endpoint {name!r} has no output {output!r}; outputs: {', '.join(result)}")
                return result[output]
            if len(result) != 1:
                raise ModelError(f"endpoint {name!r} returns outputs {', '.join(result)}; pick one with --output NAME")
            return next(iter(result.values()))
        if isinstance(result, (list, tuple)):
            if len(result) != 1:
                raise ModelError(f"endpoint {name!r} returns {len(result)} outputs; gradwatch needs one")
            return result[0]
        return result

    return forward


ASSIGN_OPS = {"AssignVariableOp", "AssignSubVariableOp", "AssignAddVariableOp", "AssignMovingAvg"}


def _inference_mode(concrete) -> bool:
    """Is this a BatchNormalization graph traced with training=False? Seen where it can be: a fused
    batch norm op with is_training false, or moving-statistics variables read but never assigned."""
    graph_def = concrete.graph.as_graph_def()
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    for node in nodes:
        if node.op.startswith("FusedBatchNorm") and "is_training" in node.attr and not node.attr["is_training"].b:
            return True
    moving = [v for v in concrete.variables if "moving_mean" in v.name or "moving_variance" in v.name]
    return bool(moving) and not any(node.op in ASSIGN_OPS for node in nodes)


def _output_dim(concrete: list, output: str | None) -> int | None:
    """Static last dimension of the endpoint's (picked) output, when the trace knows it."""
    outputs = concrete[0].structured_outputs
    if isinstance(outputs, dict):
        outputs = outputs.get(output) if output is not None else (next(iter(outputs.values())) if len(outputs) == 1 else None)
    elif isinstance(outputs, (list, tuple)):
        outputs = outputs[0] if len(outputs) == 1 else None
    shape = getattr(outputs, "shape", None)
    if shape is None or shape.rank is None or shape.rank == 0:
        return None
    return shape[-1]


def _unique(variables) -> list:
    seen, out = set(), []
    for v in variables:
        key = v.ref() if hasattr(v, "ref") else id(v)
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out
