"""gradwatch as a library: ``run`` and ``compare`` return the CLI's rows as pandas DataFrames.

    import gradwatch
    rows = gradwatch.run("model.keras", "train.npz", clip="global", norm=5, steps=200)
    long = gradwatch.compare(model, (x, y), variants=["none", "global:1", "global:5"], loss="mse")
    print(gradwatch.summarize(long))

``model`` is a SavedModel folder, a ``.keras`` file or an in-memory ``keras.Model`` (its weights
are put back as they were after the call); ``data`` is a path, an ``(x, y)`` pair of arrays or a
``tf.data.Dataset`` of ``(x, y)`` examples or batches. Every other option is the CLI's, as a
keyword with the same name and default (``batch_size=32``, ``lr=...``, ``on_nonfinite="skip"``).
Errors raise :class:`gradwatch.GradwatchError` subclasses; nothing prints. The CLI is a layer
over :func:`prepare_trainer` and :func:`train`, the two steps these functions take.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

import numpy as np

from .errors import Interrupted, NonFiniteStop, OptionError, refuse_blank

CLIP_OPTIONS = ("norm", "value", "factor", "percentile", "z")

_KINDS = {"int": (numbers.Integral, int, "an integer"), "float": (numbers.Real, float, "a number"),
          "bool": ((bool, np.bool_), bool, "True or False")}


def typed(name: str, value, kind: str):
    """A keyword option of the Python API as the CLI's parser would have given it (``kind``: int,
    float or bool; NumPy scalars welcome), or an OptionError naming it: ``steps=2.5`` or
    ``batch_size="8"`` would otherwise fail deep inside TensorFlow, blaming the data."""
    if value is None or kind not in _KINDS:
        return value
    accepted, convert, what = _KINDS[kind]
    if not isinstance(value, accepted) or (kind != "bool" and isinstance(value, (bool, np.bool_))):
        raise OptionError(f"`{name}` must be {what}. Received: {name}={value!r} ({type(value).__name__})")
    return convert(value)


def clipping_of(clip: str, **given):
    """A Clipping from ``clip`` and the one parameter it takes (``norm=5``), checked as the CLI checks it."""
    from .clip import STRATEGIES, Clipping

    if clip not in STRATEGIES:
        raise OptionError(f"unknown clipping strategy {clip!r}; choose one of {', '.join(STRATEGIES)}")
    option = STRATEGIES[clip].option
    extra = [f"--{name}" for name, v in given.items() if v is not None and name != option]
    if extra:
        takes = f"--{option}" if option else "no parameter"
        raise OptionError(f"--clip {clip} takes {takes}, not {', '.join(extra)}; drop {', '.join(extra)}")
    return Clipping(clip, typed(option, given.get(option), "float") if option else None)


def make_spec(model=None, data=None, sample=None, **options):
    """A resolved RunSpec from the CLI's options as keywords (unknown names are refused)."""
    from .session import RunSpec, resolve

    names = {f.name for f in fields(RunSpec)}
    for name, value in {"model": model, "data": data, **options}.items():
        refuse_blank(name, value)
    unknown = sorted(set(options) - names)
    if unknown:
        raise OptionError(f"unknown option{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                          f"the options are {', '.join(sorted(names - {'model', 'data', 'sample'}))}")
    for f in fields(RunSpec):
        if f.name in options:  # the annotation as a string ("int | None"): its first type
            options[f.name] = typed(f.name, options[f.name], str(f.type).split("|")[0].strip())
    for name in ("on_nonfinite", "sparse_norm"):
        if options.get(name) is not None:
            options[name] = getattr(options[name], "value", options[name])
    if isinstance(options.get("imports"), (str, bytes)) or hasattr(options.get("imports"), "__fspath__"):
        options["imports"] = (options["imports"],)
    if options.get("imports") is not None:
        options["imports"] = tuple(str(i) for i in options["imports"])
    if options.get("optimizer") is not None and not isinstance(options["optimizer"], str):
        options["optimizer"] = _optimizer_config(options["optimizer"])
    if options.get("opt") is not None:
        opt = options["opt"]
        options["opt"] = tuple(f"{k}={v}" for k, v in opt.items()) if isinstance(opt, dict) else tuple(opt)
    return resolve(RunSpec(model=model, data=data, sample=sample, **options))


def _optimizer_config(optimizer) -> dict:
    """A Keras optimizer object as the config gradwatch builds its own copy from (every variant
    starts from it afresh; the object itself is never trained or changed)."""
    import keras

    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise OptionError(f"`optimizer` must be a Keras optimizer identifier (such as 'adam') or a "
                          f"keras.optimizers.Optimizer. Received: {type(optimizer).__name__}")
    return {"class_name": type(optimizer).__name__, "config": optimizer.get_config()}


def prepare_trainer(spec, variants, per_variable: bool = False):
    """Load model and data, build the Trainer and trace every variant's step (imports TensorFlow)."""
    from .session import prepare

    trainer = prepare(spec)
    trainer.per_variable = per_variable
    for clipping in variants:
        trainer.trace(clipping.impl)
    return trainer


def describe_run(spec, trainer) -> dict:
    """The META_COLUMNS of a run: model, data, optimizer, loss_fn."""
    from .session import run_meta

    return {**run_meta(spec), "optimizer": trainer.optimizer_text, "loss_fn": trainer.loss_source}


def train(trainer, variants, on_rows=None, on_progress=None, on_variables=None, on_capture=None, on_stop=None):
    """Every variant from the same start on the same batches; each callback gets the variant first.

    One variant: ``--on-nonfinite stop`` raises NonFiniteStop (``.result``). Several: that
    variant stops, ``on_stop(clipping, error)`` is told and the others run (``training.compare``).
    """
    from .train.loop import compare as compare_runs

    if len(variants) == 1:
        (c,) = variants
        return [trainer.run(
            c,
            on_rows=on_rows and (lambda rows: on_rows(c, rows)),
            on_progress=on_progress and (lambda done, total: on_progress(c, done, total)),
            on_variables=on_variables and (lambda rows, norms: on_variables(c, rows, norms)),
            on_capture=on_capture and (lambda step, grads: on_capture(c, step, grads)),
        )]
    return compare_runs(trainer, variants, on_rows=on_rows, on_progress=on_progress, on_stop=on_stop,
                        on_variables=on_variables, on_capture=on_capture)


def frame(results, meta: dict):
    """Results as the CLI's CSV holds them: one row per variant and step, record.rows.CSV_COLUMNS."""
    import pandas as pd

    from .record.rows import CSV_COLUMNS

    rows = [{"clip": r.clipping.strategy, "param": r.clipping.param, **row, **meta} for r in results for row in r.rows]
    out = pd.DataFrame(rows, columns=CSV_COLUMNS)
    out["param"] = out["param"].astype("float64")
    return out


def _train_frame(model, data, sample, variants, options):
    spec = make_spec(model, data, sample, **options)
    trainer = prepare_trainer(spec, variants)
    try:
        try:
            results = train(trainer, variants)
        except NonFiniteStop as stop:  # run(): the rows so far, as the CLI writes them before exit 3
            results = [stop.result]
        except Interrupted as stop:  # Ctrl-C in a notebook: control returns, with the rows so far
            stop.rows = frame(stop.results, describe_run(spec, trainer))
            raise
        return frame(results, describe_run(spec, trainer))
    finally:
        if not isinstance(spec.model, str):
            trainer.reset()  # the caller's keras.Model keeps its weights


def run(model=None, data=None, clip: str = "none", norm=None, value=None, factor=None, percentile=None, z=None,
        *, sample=None, **options):
    """Train with one clipping strategy; the rows of every step as a DataFrame (``run --csv``).

    With ``on_nonfinite="stop"`` the frame ends at the first non-finite step."""
    clipping = clipping_of(clip, norm=norm, value=value, factor=factor, percentile=percentile, z=z)
    return _train_frame(model, data, sample, [clipping], options)


def compare(model=None, data=None, variants=None, *, clip=None, thresholds=None, baseline: bool = True,
            sample=None, **options):
    """Every variant from the same start on the same batches; the long DataFrame (``compare --csv``).

    ``variants``: a list such as ``["none", "global:5", "agc:0.01"]`` (or one comma-separated
    string), or ``clip="global,norm"`` with ``thresholds="none,1,5"`` as in the CLI (each also a
    list: ``clip=["global"], thresholds=[None, 1, 5]``)."""
    from .clip import parse_variant_list, parse_variants

    if variants is not None:
        if clip is not None or thresholds is not None:
            raise OptionError("give variants, or clip with thresholds, not both")
        chosen = parse_variant_list(_listed(variants, "variants"))
    else:
        chosen = parse_variants(_listed(clip, "clip") if clip is not None else "global",
                                _listed(thresholds, "thresholds") if thresholds is not None else "none,1,5,10", baseline)
    return _train_frame(model, data, sample, chosen, options)


def _listed(value, name: str) -> str:
    """``compare``'s list options as the CLI's comma-separated text: a string as it is, a number,
    or a list of strings and numbers (None is the unclipped baseline, ``none``)."""
    import numbers

    def item(v):
        if v is None:
            return "none"
        if isinstance(v, (str, numbers.Real)) and not isinstance(v, bool):
            return str(v)
        raise OptionError(f"`{name}` items must be strings or numbers (None for the baseline). Received: {v!r} "
                          f"({type(v).__name__})")

    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, (list, tuple)):
        return ",".join(item(v) for v in value)
    raise OptionError(f"`{name}` must be a comma-separated string or a list. Received: {value!r} ({type(value).__name__})")


@dataclass
class Summary:
    """What the CLI's tables say about a frame of rows: ``table`` one row per variant (the
    ``--summary-csv`` columns), ``findings`` the verdict as data (dicts with ``code``, ``kind``,
    ``variant``, ``steps``, ``numbers``, ``message``: the CLI's ``--findings``), ``verdict`` the
    lines the CLI prints from them, ``variants`` the full summary of each (``{label: dict}``)."""

    table: object  # pandas.DataFrame
    verdict: list
    variants: dict
    findings: list

    def __str__(self) -> str:
        return self.table.to_string(index=False) + "\n" + "\n".join(self.verdict)


def summarize(rows, rule=None) -> Summary:
    """The summary and findings of a frame from :func:`run` or :func:`compare` (or a read CSV).

    ``rule``: the spike rule the gradient spikes are found by (``diagnose.spikes.SpikeRule``;
    default, the default rule; loss spikes are the frame's ``loss_spike`` column)."""
    import math

    import pandas as pd

    from .diagnose.verdict import findings_of
    from .record.rows import META_COLUMNS
    from .report.tables import COMPARE_COLUMNS, Variant, summary_rows, verdict_lines

    records = rows.to_dict("records")
    groups: dict = {}
    for row in records:
        param = row.get("param")
        param = None if param is None or (isinstance(param, float) and math.isnan(param)) else float(param)
        groups.setdefault((row.get("clip", "run"), param), []).append(row)
    variants = [Variant(clip, param, group, meta={c: group[0].get(c, "") for c in META_COLUMNS}, rule=rule)
                for (clip, param), group in groups.items()]
    found = findings_of(variants)
    table = pd.DataFrame(summary_rows(variants), columns=COMPARE_COLUMNS)
    lines = [line.strip() for line in verdict_lines(found, len(variants) == 1)[1:]]  # without the "Verdict:" heading
    return Summary(table, lines, {v.label: v.summary for v in variants}, [f.as_dict() for f in found])
