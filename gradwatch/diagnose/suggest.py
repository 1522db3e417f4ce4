"""Which threshold for clip_by_global_norm? A rule on the norms of an unclipped probe.

The rule (also in the README and printed by ``gradwatch suggest``):

- The **calm steps** are the probe's steps before its first spike of either kind (loss spike,
  or gradient spike: the spike rule on the global norm) or its first non-finite step: once a
  run has diverged, its norms say nothing about healthy training. Without either, every step.
- The proposed threshold is the **median** of the calm steps' global norms, rounded to two
  significant digits: clipping then binds on about half of healthy steps and cuts every burst
  to a typical step's size. (The PTB tutorial's 5 sits near the median raw norm of its clipped
  run.) The candidates are half, one and two times it.
- With fewer than ``MIN_CALM`` (20, one spike window) calm steps the unclipped probe broke
  down too early to say what a healthy step's norm is (:class:`TooFewCalmSteps`). ``suggest``
  then probes again from the same start clipped by AutoClip (p = 10, which needs no threshold)
  and proposes the median raw norm of that probe's steps before its first loss spike or
  non-finite step (its gradient bursts are clipped, so they do not end its calm stretch): the
  norms of a clipped training, where a threshold does its work. With fewer than ``MIN_CALM``
  of those too, or from a saved CSV, there is no proposal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import counted

MIN_CALM = 20


class TooFewCalmSteps(ValueError):
    """The probe's calm stretch is too short to propose from; the message says why and what to do."""

    def __init__(self, message: str, calm: int, first: int | None):
        super().__init__(message)
        self.calm, self.first = calm, first


@dataclass
class Suggestion:
    threshold: float
    rule: str  # which of the rules above gave it, in words
    calm_steps: int  # how many steps the threshold comes from
    first_spike: int | None  # the step that ended the calm stretch
    stats: dict  # median, p90, max of the global norm: "calm" and "all" finite steps
    candidates: list[tuple[float, float, float]]  # (threshold, % of calm steps clipped, % of all finite steps clipped)
    keras: float | None = None  # the same threshold for Keras' global_clipnorm, where it differs (keras_threshold)

    def findings(self, rows, unclipped: "TooFewCalmSteps | None" = None) -> list:
        """probe_diverged when the unclipped probe (``rows``) went non-finite or diverged, with
        what the proposal rests on (a list of findings.Finding); empty for a healthy probe.
        ``unclipped``: it broke down too early, and the proposal comes from the AutoClip probe."""
        from ..record.rows import summarize
        from .findings import Finding, _diverged, fmt

        summary = summarize(rows)
        broken = sum(1 for r in rows if r["nonfinite"])
        parts = [f"went non-finite on {broken} of {len(rows)} steps"] if broken else []
        if _diverged(summary):
            parts.append(f"diverged (final loss {fmt(summary['final_loss'])}, first {fmt(summary['loss_first'])})")
        if unclipped is not None:
            parts.append(f"was calm for only {counted(unclipped.calm, 'step')} (its first spike or non-finite step: step {unclipped.first})")
        if not parts:
            return []
        rests = (f"the proposal comes from a second probe clipped by AutoClip, from {self.calm_steps} of its steps"
                 if unclipped is not None else f"the proposal rests on the {self.calm_steps} calm steps before step {self.first_spike}")
        said = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
        return [Finding("probe_diverged", "none", f"the unclipped probe {said}; {rests}",
                        (unclipped.first if unclipped is not None else self.first_spike,),
                        {"nonfinite": broken, "steps": len(rows), "calm_steps": self.calm_steps,
                         "final_loss": summary["final_loss"]})]


def round2(value: float) -> float:
    """Two significant digits: 7.196 -> 7.2, 0.01234 -> 0.012, 1234 -> 1200."""
    if value <= 0 or not math.isfinite(value):
        return value
    digits = 1 - int(math.floor(math.log10(value)))
    return round(value, digits)


def suggest_threshold(rows, grad_spikes: list[int] | None = None, sparse_norm: str | None = None,
                      clipped_probe: str | None = None) -> Suggestion:
    """The rule above on an unclipped run's rows (step, grad_norm, loss_spike); ``grad_spikes``:
    the steps the gradient-spike rule flagged (diagnose.LayerWatch, or diagnose.spikes.SpikeRule on the norms).
    ``clipped_probe``: the rows are those of the AutoClip probe, so named; gradient spikes do not
    end its calm stretch."""
    from .spikes import SpikeRule

    steps = np.array([int(r["step"]) for r in rows])
    # Under --sparse-norm rows the threshold clips the norm Keras measures: propose it on that one.
    sparse_norm = sparse_norm or _sparse_norm(rows)
    column = "grad_norm_rows" if sparse_norm == "rows" else "grad_norm"
    norms = np.array([float(r[column]) for r in rows], dtype=np.float64)
    if clipped_probe:
        grad_spikes = []
    elif grad_spikes is None:
        grad_spikes = [int(s) for s, hit in zip(steps, SpikeRule().mark(norms)) if hit]
    broken = {int(r["step"]) for r in rows if r["nonfinite"] or not math.isfinite(float(r["loss"]))}
    spikes = sorted({int(r["step"]) for r in rows if r["loss_spike"]} | set(grad_spikes) | broken)
    first = spikes[0] if spikes else None
    finite = np.isfinite(norms)
    calm = finite & (steps < first) if first is not None else finite
    if calm.sum() < MIN_CALM:
        also = "or compare thresholds directly with gradwatch compare --thresholds none,1,5,10"
        if first is None:  # every step calm: the probe is only too short, and the learning rate is not the cause
            message = (f"no threshold proposed: the probe's {int(calm.sum())} steps were all calm, fewer than the "
                       f"{MIN_CALM} a proposal rests on; probe longer (--steps {MIN_CALM} or more) and run suggest "
                       f"again, {also}")
        else:  # a longer probe would break down at the same step
            probe = f"; the probe was non-finite on {len(broken)} of {len(rows)} steps" if broken else ""
            message = (f"no threshold proposed: its first spike or non-finite step came at step {first}, leaving "
                       f"{int(calm.sum())} calm steps, fewer than the {MIN_CALM} a proposal rests on{probe}; lower "
                       f"--lr and run suggest again, {also}")
        raise TooFewCalmSteps(message, int(calm.sum()), first)
    center = float(np.median(norms[calm]))
    if clipped_probe:
        rule = (f"median raw global norm of the {int(calm.sum())} steps of {clipped_probe}"
                + (f" before its first loss spike or non-finite step (step {first})" if first is not None else ""))
    else:
        rule = (f"median global norm of the {int(calm.sum())} calm steps"
                + (f" before the first spike or non-finite step (step {first})" if first is not None else " (no spike)"))
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
    """Of a CSV's variants (record.rows.split_variants), the key of the unclipped one suggest reads:
    compare's ``none`` baseline, else a ``run`` that never clipped."""
    from ..errors import GradwatchError

    key = next((k for k in groups if k[0] == "none"), None)
    if key is None:
        key = next((k for k in groups if k[0] == "run" and not any(r["clipped"] for r in groups[k])), None)
    if key is None:
        raise GradwatchError(f"{path} holds no unclipped run; suggest needs the norms before any clipping: "
                             "record one with gradwatch run --csv (no --clip) or compare --csv (with the none baseline)")
    return key
