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


def round2(value: float) -> float:
    """Two significant digits: 7.196 -> 7.2, 0.01234 -> 0.012, 1234 -> 1200."""
    if value <= 0 or not math.isfinite(value):
        return value
    digits = 1 - int(math.floor(math.log10(value)))
    return round(value, digits)


def suggest_threshold(rows, grad_spikes: list[int] | None = None) -> Suggestion:
    """The rule above on an unclipped run's rows (step, grad_norm, loss_spike); ``grad_spikes``:
    the steps the gradient-spike rule flagged (diagnose.LayerWatch or records.SpikeRule on the norms)."""
    from ..records import SpikeRule

    steps = np.array([int(r["step"]) for r in rows])
    norms = np.array([float(r["grad_norm"]) for r in rows], dtype=np.float64)
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
    )
