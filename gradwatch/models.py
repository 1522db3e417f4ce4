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
from pathlib import Path
from typing import Any, Callable

from .errors import ModelError, first_line

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
    input_spec: Any  # tf.TensorSpec of the input (leading batch dim), or None if unknown
    assets: Path | None = None
    keep_alive: Any = field(default=None, repr=False)
    output_dim: int | None = None  # static last dimension of the output (classes of a classifier), if known

    @property
    def input_length(self) -> int | None:
        """Static length of the second input dimension (the window of a word LM), if known."""
        spec = self.input_spec
        if spec is None or spec.shape.rank is None or spec.shape.rank < 2:
            return None
        return spec.shape[1]


def load(path: str, endpoint: str | None = None, output: str | None = None) -> LoadedModel:
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
    import keras

    try:
        model = keras.saving.load_model(str(p), safe_mode=True)
    except Exception as exc:  # Keras raises many types for bad archives and unsafe content
        raise ModelError(f"cannot load {p} ({first_line(exc)}); re-save it with Keras 3 model.save()") from None
    if not model.trainable_variables:
        raise ModelError(f"{p} has no trainable variables; set layer.trainable = True before saving")
    own_loss = None
    compiled = getattr(model, "loss", None)
    if compiled is not None and not isinstance(compiled, (dict, list, tuple)):
        loss_obj = keras.losses.get(compiled)
        own_loss = lambda x, y: loss_obj(y, model(x, training=True))  # noqa: E731
    spec = None
    outputs = getattr(model, "outputs", None)
    output_dim = outputs[0].shape[-1] if outputs and len(outputs) == 1 and outputs[0].shape else None
    inputs = getattr(model, "inputs", None)
    if inputs and len(inputs) == 1:
        import tensorflow as tf

        spec = tf.TensorSpec(inputs[0].shape, inputs[0].dtype)
    return LoadedModel(
        path=str(p),
        kind="keras",
        endpoint="call",
        forward=lambda x: model(x, training=True),
        own_loss=own_loss,
        trainable=list(model.trainable_variables),
        variables=list(model.variables),
        input_spec=spec,
        keep_alive=model,
        output_dim=output_dim,
    )


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
    forward = _output_picker(fn, spec, is_keyword, output, name, p)

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
    import tensorflow as tf

    args, kwargs = concrete[0].structured_input_signature
    tensors = [a for a in tf.nest.flatten(args) if isinstance(a, tf.TensorSpec)]
    keyword = {k: v for k, v in (kwargs or {}).items() if isinstance(v, tf.TensorSpec)}
    if len(tensors) == 1 and not keyword:
        return tensors[0], False
    if not tensors and len(keyword) == 1:
        return next(iter(keyword.values())), next(iter(keyword))
    n = len(tensors) + len(keyword)
    raise ModelError(f"endpoint {name!r} of {p} takes {n} tensor inputs; gradwatch trains models with one input tensor")


def _output_picker(fn, spec, keyword, output: str | None, name: str, p: Path) -> Callable:
    def forward(x):
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
