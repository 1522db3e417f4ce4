"""Which threshold for clip_by_global_norm? A rule on the norms of an unclipped probe.

The rule (also in the README and printed by ``gradwatch suggest``):

- The **calm steps** are the probe's steps before its first spike of either kind (loss spike,
  or gradient spike: the global norm above the spike factor × its rolling median): once a run
  has diverged, its norms say nothing about healthy training. Without a spike, every finite step.
- The proposed threshold is the **median** of the calm steps' global norms, rounded to two
  significant digits: clipping then binds on about half of healthy steps and cuts every burst
  to a typical step's size. (The PTB tutorial's 5 sits near the median raw norm of its clipped
  run.) The candidates are half, one and two times it.
- With fewer than ``MIN_CALM`` calm steps, the 10th percentile of all finite norms
  (AutoClip's default percentile) stands in for the median.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_CALM = 3


@dataclass
class Suggestion:
    threshold: float
    rule: str  # which of the rules above gave it, in words
    calm_steps: int  # how many steps the threshold comes from
    first_spike: int | None  # the step that ended the calm stretch
    stats: dict  # median, p90, max of the global norm: "calm" and "all" finite steps
    candidates: list[tuple[float, float, float]]  # (threshold, % of calm steps clipped, % of all finite steps clipped)
    keras: float | None = None  # the same threshold for Keras' global_clipnorm, where it differs (keras_threshold)


def round2(value: float) -> float:
    """Two significant digits: 7.196 -> 7.2, 0.01234 -> 0.012, 1234 -> 1200."""
    if value <= 0 or not math.isfinite(value):
        return value
    digits = 1 - int(math.floor(math.log10(value)))
    return round(value, digits)


def suggest_threshold(rows, grad_spikes: list[int] | None = None, sparse_norm: str | None = None) -> Suggestion:
    """The rule above on an unclipped run's rows (step, grad_norm, loss_spike); ``grad_spikes``:
    the steps the gradient-spike rule flagged (diagnose.LayerWatch or records.SpikeRule on the norms)."""
    from .spikes import SpikeRule

    steps = np.array([int(r["step"]) for r in rows])
    # Under --sparse-norm rows the threshold clips the norm Keras measures: propose it on that one.
    sparse_norm = sparse_norm or _sparse_norm(rows)
    column = "grad_norm_rows" if sparse_norm == "rows" else "grad_norm"
    norms = np.array([float(r[column]) for r in rows], dtype=np.float64)
    if grad_spikes is None:
        grad_spikes = [int(s) for s, hit in zip(steps, SpikeRule().mark(norms)) if hit]
    spikes = sorted({int(r["step"]) for r in rows if r["loss_spike"]} | set(grad_spikes))
    first = spikes[0] if spikes else None
    finite = np.isfinite(norms)
    calm = finite & (steps < first) if first is not None else finite
    if not finite.any():
        raise ValueError("no step of the probe has a finite gradient norm")
    if calm.sum() >= MIN_CALM:
        center = float(np.median(norms[calm]))
        rule = (f"median global norm of the {int(calm.sum())} calm steps"
                + (f" before the first spike (step {first})" if first is not None else " (no spike)"))
    else:
        center = float(np.percentile(norms[finite], 10))
        calm = finite
        rule = (f"10th percentile of all {int(finite.sum())} finite steps' global norms "
                f"(fewer than {MIN_CALM} steps before the first spike, step {first})")
    threshold = round2(center)
    pick = [round2(threshold / 2), threshold, round2(threshold * 2)]

    def stats(values):
        return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90)), "max": float(values.max())}

    return Suggestion(
        threshold=threshold,
        rule=rule,
        calm_steps=int(calm.sum()),
        first_spike=first,
        stats={"calm": stats(norms[calm]), "all": stats(norms[finite])},
        candidates=[(t, 100.0 * float(np.mean(norms[calm] > t)), 100.0 * float(np.mean(norms[finite] > t))) for t in pick],
        keras=keras_threshold(rows, threshold, calm, sparse_norm),
    )


KERAS_MARGIN = 0.01  # the two forms of a threshold are named apart when they differ by more than this


def _sparse_norm(rows) -> str:
    """What a run's clipping measured by (the sparse_norm column; files before it: summed)."""
    return (rows[0].get("sparse_norm") or "summed") if rows else "summed"


def keras_threshold(rows, threshold: float, steps=None, sparse_norm: str | None = None) -> float | None:
    """The threshold to type into Keras' ``global_clipnorm`` / ``clipnorm`` (or
    ``tf.clip_by_global_norm``) for the same clipping as ``threshold`` on gradwatch's summed norm,
    when the two differ by more than 1 %; None when they do not (no repeated embedding rows), or
    when the run already measured by rows (``--sparse-norm rows``: its threshold is Keras' own).

    Keras measures an embedding's repeated rows one by one (``grad_norm_rows``), gradwatch by
    default the summed rows (``grad_norm``): the same clipping is ``threshold`` times the median
    ratio of the two over the run's finite steps (or over ``steps``, a boolean mask).
    """
    if not rows or (sparse_norm or _sparse_norm(rows)) == "rows":
        return None
    summed = np.array([float(r["grad_norm"]) for r in rows], dtype=np.float64)
    by_rows = np.array([float(r.get("grad_norm_rows", math.nan)) for r in rows], dtype=np.float64)
    ok = np.isfinite(summed) & np.isfinite(by_rows) & (summed > 0)
    if steps is not None:
        ok &= np.asarray(steps, dtype=bool)
    if not ok.any():
        return None
    ratio = float(np.median(by_rows[ok] / summed[ok]))
    if abs(ratio - 1.0) <= KERAS_MARGIN:
        return None
    return round2(threshold * ratio)


def keras_sentence(threshold: float, keras: float, strategy: str = "global") -> str:
    """The sentence that gives a threshold in the form the user types into Keras."""
    option = "global_clipnorm" if strategy == "global" else "clipnorm"
    return (f"In Keras, which measures an embedding's repeated rows one by one, the same clipping is "
            f"compile(optimizer=...({option}={keras:g})) (or tf.clip_by_global_norm(grads, {keras:g})), not {threshold:g}; "
            f"with --sparse-norm rows gradwatch clips on that norm too.")


def unclipped_variant(groups: dict, path) -> tuple:
    """Of a CSV's variants (records.split_variants), the key of the unclipped one suggest reads:
    compare's ``none`` baseline, else a ``run`` that never clipped."""
    from ..errors import GradwatchError

    key = next((k for k in groups if k[0] == "none"), None)
    if key is None:
        key = next((k for k in groups if k[0] == "run" and not any(r["clipped"] for r in groups[k])), None)
    if key is None:
        raise GradwatchError(f"{path} holds no unclipped run; suggest needs the norms before any clipping: "
                             "record one with gradwatch run --csv (no --clip) or compare --csv (with the none baseline)")
    return key
