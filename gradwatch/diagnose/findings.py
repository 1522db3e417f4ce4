"""Every sentence of a verdict is a finding: a code, the variant, the steps, the numbers, the message.

The CLI's verdict lines, ``--findings`` and ``--format json``, the API's ``summarize(...).findings``
and ``GradientWatch.summary().findings`` are all made here, from the recorded rows, so they read
the same everywhere. :data:`CODES` holds each code's rule in one line (the README's table is
written from the same rules); ``--fail-on CODE`` exits with :data:`FAIL_ON_EXIT` when one appears.
No TensorFlow here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import counted
from ..load.data import is_text

FAIL_ON_EXIT = 4  # `--fail-on` found one of its codes (documented in the README's exit codes)

# code -> (kind, the rule). kind: "problem" (the training is in trouble), "warning" (a result
# that hides its cost or says nothing), "info" (what a result rests on), "ok".
CODES = {
    "stable": ("ok", "no loss spike, no non-finite step, no divergence"),
    "too_short": ("warning", "no loss spike, no non-finite step, no divergence, but the run is too short for the spike rule to judge any step (it judges a loss by the 3 finite ones before it): nothing is said about its stability"),
    "loss_spikes": ("problem", "the spike rule (README: The spike rule) fired on the loss of a step that did not train on NaN/inf input"),
    "gradient_spikes": ("info", "the spike rule fired on the global gradient norm before clipping"),
    "nonfinite": ("problem", "the loss or a gradient was not finite on a step"),
    "diverged": ("problem", "the final loss (median of the last 10 % of steps) is not finite, or more than 10x the first loss above it"),
    "spikes_from_data": ("problem", "steps whose batch held NaN/inf inputs; or loss spikes that recur at the same batch, or on the same rows, in at least 2 epochs; or (compare) loss spikes at the same step in every variant"),
    "clip_always_binds": ("warning", "a clipping variant clipped at least 90 % of its steps: a smaller learning rate rather than clipping of bursts"),
    "clip_never_binds": ("info", "a clipping variant clipped no step: it trained as the unclipped run"),
    "clip_active": ("info", "how often a clipping variant clipped, between those two"),
    "warmup_not_reached": ("warning", "zclip met its first loss spike or non-finite step within its 25 warm-up steps, in which it does not clip"),
    "regularization_dominates": ("warning", "the regularization is at least 99 % of the loss (median over steps)"),
    "update_too_large": ("warning", "a variable's update/weight ratio is more than 10x the median of its kind: the variables that started at zero, the other matrices, the other vectors (README: Update/weight)"),
    "no_baseline": ("info", "no unclipped run to compare with: one clipped run cannot say whether clipping helps"),
    "recommended": ("ok", "compare: the variant that is clearly better than unclipped (README: The compare verdict)"),
    "keras_threshold": ("info", "the recommended threshold as Keras' global_clipnorm / clipnorm measures it, where that is another number"),
    "no_clear_winner": ("info", "compare: no variant is clearly better than unclipped"),
    "clipping_slows": ("info", "compare: unclipped does not jump, and every clipping variant ends higher"),
    "no_variant_calm": ("problem", "compare: every variant has loss spikes, non-finite steps or diverged"),
    "loss_not_recorded": ("warning", "no step recorded a loss (NaN on every step whose gradient was finite): a GradientWatch in a fit whose train_step calls neither self.compute_loss nor optimizer.scale_loss; the verdicts on the loss are not made"),
    "probe_diverged": ("warning", "suggest: the unclipped probe had a non-finite step or diverged; the proposal rests only on the steps before"),
}

# The codes about a comparison as a whole (their variant, if any, is the one they name).
COMPARISON_CODES = ("recommended", "keras_threshold", "no_clear_winner", "clipping_slows", "no_variant_calm")
ALWAYS_BINDS = 90.0  # % of steps clipped from which clipping is a learning-rate cut
REG_DOMINATES = 0.99  # share of the loss from which the data loss is absent
DIVERGE_FACTOR = 10.0  # final loss this many times the first: diverged
ROWS_NAMED = 5  # data rows named per spikes_from_data finding


@dataclass(frozen=True)
class Finding:
    code: str
    variant: str  # the variant's label ("none" for unclipped; "" for the comparison as a whole)
    message: str  # one sentence, as the verdict prints it
    steps: tuple = ()  # the steps it is about (all of them, in order)
    numbers: dict = field(default_factory=dict)  # what the message cites, by name

    @property
    def kind(self) -> str:
        return CODES[self.code][0]

    def as_dict(self) -> dict:
        return {"code": self.code, "kind": self.kind, "variant": self.variant, "steps": list(self.steps),
                "numbers": {k: _plain(v) for k, v in self.numbers.items()}, "message": self.message}


def _plain(value):
    """JSON-ready: NumPy scalars as Python numbers, NaN/inf as None."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def fmt(value, digits: int = 4) -> str:
    """A number as every table and sentence shows it: 4 significant digits, '-' for none."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    return str(value)


def _first(steps) -> str:
    return f" (first at step {steps[0]})" if steps else ""


def who(variant) -> str:
    """How a sentence names a variant: 'unclipped' for the baseline."""
    return "unclipped" if variant.is_baseline else variant.label


# --- one run --------------------------------------------------------------------------------


def run_findings(variant, data=None) -> list[Finding]:
    """The findings of one run (a report.tables.Variant: label, clip, param, rows, summary, layers, meta).

    ``data``: a :class:`DataView` of the rows it trained on, to name the rows behind
    spikes_from_data; without it, spikes that recur at the same batch are named by position.
    """
    s, label, out = variant.summary, variant.label, []
    if not variant.rows and variant.given_summary is not None:
        return _summary_only(variant)
    if _loss_not_recorded(variant.rows):
        trouble = [Finding("loss_not_recorded", label, "no loss was recorded (the model's train_step calls neither "
                           "self.compute_loss(...) nor self.optimizer.scale_loss(...)), so nothing is said about the "
                           "loss: no spikes, no divergence, no stability; the gradient norms and the clipping are "
                           "recorded")]
        trouble += [f for f in _trouble(variant, data) if f.code == "nonfinite"]  # the gradient's own
    else:
        trouble = _trouble(variant, data)
    out += trouble
    if s["grad_spikes"]:
        steps = s["grad_spike_steps"]
        spike_steps = set(steps)
        at_spikes = [r for r in variant.rows if r["step"] in spike_steps]
        clipped = sum(1 for r in at_spikes if r["clipped"])
        # the highest the norm jumped to: at a spike, not the run's maximum (often step 1, no spike)
        highest = max(float(r["grad_norm"]) for r in at_spikes)
        cut = f"; clipping cut {clipped} of them" if not variant.is_baseline else ""
        out.append(Finding("gradient_spikes", label,
                           f"{counted(s['grad_spikes'], 'gradient spike')}: the global norm before clipping jumped"
                           f"{_first(steps)}, to at most {fmt(highest)} against the run's median of "
                           f"{fmt(s['grad_norm_median'])}{cut}", tuple(steps),
                           {"count": s["grad_spikes"], "first": steps[0], "clipped": clipped,
                            "spike_grad_norm_max": highest, "grad_norm_max": s["grad_norm_max"],
                            "grad_norm_median": s["grad_norm_median"]}))
    if not any(f.kind == "problem" or f.code == "loss_not_recorded" for f in trouble):
        if s["judged_losses"] == 0:
            history = s["spike_history"]
            out.insert(0, Finding("too_short", label, f"too short to say whether the loss is stable: the spike rule "
                                  f"judges a loss by the {counted(history, 'finite loss', 'finite losses')} before it, and "
                                  f"this run has {counted(s['steps'], 'step')}; run more --steps",
                                  (), {"steps": s["steps"], "spike_history": history}))
        else:
            quiet = ", although the gradient norm spiked" if s["grad_spikes"] else ""
            out.insert(0, Finding("stable", label, f"loss is stable: no loss spikes, no non-finite steps{quiet}"))
    out += _clipping(variant)
    share = s.get("reg_share", math.nan)
    if math.isfinite(share) and share >= REG_DOMINATES:
        out.append(Finding("regularization_dominates", label,
                           f"the regularization is {100 * share:.0f} % of the loss (median over steps): the data "
                           "loss is zero or does not depend on the trained weights; check --loss, --target and "
                           "the model's output", (), {"reg_share": share}))
    if variant.layers is not None:
        from .attribution import RATIO_FLAG

        for name, ratio, median, kind in variant.layers.flagged():
            out.append(Finding("update_too_large", label,
                               f"update/weight: {name} changes by {ratio:.3g} of its norm per step, more than "
                               f"{RATIO_FLAG:g}x the median {median:.3g} of the {kind}; its learning rate may be too high",
                               (), {"variable": name, "ratio": ratio, "median": median, "kind": kind}))
    return out


def _summary_only(variant) -> list[Finding]:
    """A --summary-csv row: only what its counts say."""
    s, label = variant.summary, variant.label
    out = []
    if s.get("loss_spikes"):
        out.append(Finding("loss_spikes", label, f"{counted(s['loss_spikes'], 'loss spike')}", (), {"count": s["loss_spikes"]}))
    if s.get("nonfinite"):
        out.append(Finding("nonfinite", label, f"{counted(s['nonfinite'], 'non-finite step')}", (), {"count": s["nonfinite"]}))
    if not out:
        out.append(Finding("stable", label, "loss is stable: no loss spikes, no non-finite steps"))
    return out


def _trouble(variant, data) -> list[Finding]:
    """diverged, nonfinite, loss_spikes, spikes_from_data: each step counted once, under one code."""
    s, label, out = variant.summary, variant.label, []
    rows = variant.rows
    final, first = s["final_loss"], s["loss_first"]
    if _diverged(s):
        onset = _divergence_onset(rows)
        why = ("no finite loss in the last 10 % of steps" if not math.isfinite(final)
               else f"its final loss {fmt(final)} is more than {DIVERGE_FACTOR:g}x the first, {fmt(first)}")
        out.append(Finding("diverged", label, f"the run diverged: {why}" + (f", from step {onset}" if onset else ""),
                           (onset,) if onset else (), {"final_loss": final, "loss_first": first, "onset": onset}))
    bad_input = [r["step"] for r in rows if r.get("nonfinite_input", False)]
    broken = s["nonfinite_steps"]
    from_data = set(bad_input)
    own = [t for t in broken if t not in from_data]
    if own:
        out.append(Finding("nonfinite", label, f"the loss or a gradient was not finite on {counted(len(own), 'step')}"
                           f"{_first(own)}", tuple(own), {"count": len(own), "first": own[0]}))
    if bad_input:
        hit = set(s["spike_steps"]) | set(broken)
        spiked = [t for t in bad_input if t in hit]
        out.append(Finding("spikes_from_data", label,
                           f"{counted(len(bad_input), 'step')} trained on batches with NaN/inf input values, "
                           f"{len(spiked)} of them non-finite or a loss spike: the data, not the training, "
                           f"produced {'it' if len(spiked) == 1 else 'them'}", tuple(bad_input),
                           {"count": len(bad_input), "nonfinite_or_spike": len(spiked), "cause": "nonfinite_input"}))
    spikes = s["spike_steps_clean"]
    if spikes:
        # the largest rise onto a spike, not the run's largest rise, which may be at no spike
        rise = s["spike_rise"]
        if len(spikes) == 1:
            said = f"1 loss spike, at step {spikes[0]}" + (f", a rise of +{fmt(rise)}" if math.isfinite(rise) else "")
        else:
            said = f"{counted(len(spikes), 'loss spike')}{_first(spikes)}" + (
                f"; the largest rise among them +{fmt(rise)} at step {s['spike_rise_step']}" if math.isfinite(rise) else "")
        out.append(Finding("loss_spikes", label, f"loss is jumping: {said}",
                           tuple(spikes), {"count": len(spikes), "first": spikes[0], "spike_rise": rise,
                                           "spike_rise_step": s["spike_rise_step"], "largest_jump": s["largest_jump"],
                                           "largest_jump_step": s["largest_jump_step"]}))
    recurring = recurring_spikes(rows, spikes, data)
    if recurring is not None:
        out.append(recurring_finding(label, recurring))
    return out


def _loss_not_recorded(rows) -> bool:
    """No row holds a loss, and some were finite steps: a loss NaN on a step that is not marked
    non-finite was never seen (gradwatch's own step always has one, and marks a NaN one)."""
    return bool(rows) and not any(math.isfinite(r["loss"]) for r in rows) and not all(r["nonfinite"] for r in rows)


def _diverged(s: dict) -> bool:
    final, first = s["final_loss"], s["loss_first"]
    return not math.isfinite(final) or (math.isfinite(first) and final - first > (DIVERGE_FACTOR - 1) * abs(first) > 0)


def _divergence_onset(rows) -> int | None:
    """The first step of the run's last stretch of non-finite losses, else its first loss spike
    after which the loss never came back under 10x the first loss; None when unclear."""
    loss = np.array([r["loss"] for r in rows], dtype=np.float64)
    steps = [r["step"] for r in rows]
    bad = ~np.isfinite(loss)
    if bad.any():
        return int(steps[int(np.flatnonzero(bad)[0])])
    first = loss[0]
    high = loss - first > (DIVERGE_FACTOR - 1) * abs(first)
    calm = np.flatnonzero(~high)
    after = int(calm[-1]) + 1 if calm.size else 0
    return int(steps[after]) if after < len(steps) else None


def _clipping(variant) -> list[Finding]:
    """What the clipping of a clipped variant did: always, never, or how often it bound."""
    if variant.is_baseline or variant.clip == "run" and not any(r["clipped"] for r in variant.rows):
        return []
    s, label = variant.summary, variant.label
    pct, ratio = s["pct_clipped"], s["mean_clip_ratio"]
    out = []
    if variant.clip == "zclip":
        out += _warmup(variant)
    if pct >= ALWAYS_BINDS:
        optimizer = (variant.meta or {}).get("optimizer", "") or ""
        clipped = [r["clip_ratio"] for r in variant.rows if r["clipped"] and math.isfinite(r["clip_ratio"])]
        factor = float(np.mean(clipped)) if clipped else math.nan
        if optimizer.startswith("SGD") or not optimizer:
            effect = (f"with SGD that is the learning rate x {fmt(factor, 3)}"
                      + (f" (about {1 / factor:.3g}x smaller)" if factor > 0 else "")
                      + ", not a cut of the bursts; a lower --lr, unclipped, tells the two apart")
        else:
            name = optimizer.split("(")[0]
            effect = (f"{name} divides a constant scale of the gradient back out, so this clipping mostly "
                      "evens out the size of every step rather than cutting the bursts")
        out.append(Finding("clip_always_binds", label,
                           f"the clipping bound on {pct:.0f} % of steps, at a mean clip ratio of {fmt(factor, 3)} on them: {effect}",
                           (), {"pct_clipped": pct, "lr_factor": factor, "mean_clip_ratio": ratio}))
    elif pct == 0:
        out.append(Finding("clip_never_binds", label,
                           f"the clipping never bound (grad norm max {fmt(s['grad_norm_max'])}): it trained as unclipped would",
                           (), {"grad_norm_max": s["grad_norm_max"]}))
    else:
        out.append(Finding("clip_active", label,
                           f"the clipping bound on {pct:.0f} % of steps (grad norm median {fmt(s['grad_norm_median'])}, "
                           f"mean clip ratio {fmt(ratio, 3)})", (), {"pct_clipped": pct, "mean_clip_ratio": ratio}))
    return out


def _warmup(variant) -> list[Finding]:
    """ZClip does not clip in its warm-up: a run that broke down inside it is unclipped's."""
    from ..clip.adaptive import ZCLIP_WARMUP

    s, rows = variant.summary, variant.rows
    broken = s["nonfinite_steps"][:1] + ([_divergence_onset(rows)] if _diverged(s) else [])
    broken = sorted(t for t in broken if t is not None)
    if not broken or broken[0] - rows[0]["step"] >= ZCLIP_WARMUP:
        return []
    at = broken[0]
    return [Finding("warmup_not_reached", variant.label,
                    f"ZClip does not clip in its first {ZCLIP_WARMUP} steps (its warm-up), and the run "
                    f"broke down at step {at}, inside them: this result says nothing about ZClip; compare a fixed "
                    "global threshold, or a lower --lr", (at,), {"warmup": ZCLIP_WARMUP, "step": at})]


# --- spikes that come from the data ----------------------------------------------------------


@dataclass
class DataView:
    """What the findings may know of the data: which rows each step trained on, and the arrays
    to say how far a row sits from the others. Made by the caller that has the data."""

    rows_of_step: object  # callable(step) -> np.ndarray of row indices
    x: object  # the inputs: an array (or a dict/list of arrays)
    y: object  # the targets


def _recurrences(rows, spikes):
    """Loss-spike positions within an epoch that spike in at least 2 epochs and in at least half
    of the epochs that reached that position: {position: [steps]}."""
    epoch_start, reached = {}, {}
    for r in rows:
        epoch_start.setdefault(r["epoch"], r["step"])
    position = {r["step"]: r["step"] - epoch_start[r["epoch"]] for r in rows}
    if len(epoch_start) < 2:
        return {}
    for r in rows:
        reached[position[r["step"]]] = reached.get(position[r["step"]], 0) + 1
    by_position: dict = {}
    for step in spikes:
        by_position.setdefault(position[step], []).append(step)
    return {p: steps for p, steps in by_position.items() if len(steps) >= 2 and 2 * len(steps) >= reached[p]}


def recurring_spikes(rows, spikes, data: DataView | None = None) -> dict | None:
    """Loss spikes that come back with the data, as {"kind", "steps", "positions", "rows"}.

    With the data: the rows that were in the batch of at least 2 spikes, and in a spike batch on
    at least half of the steps that trained them (any shuffle); without it, the batch positions
    within an epoch that spike in at least 2 epochs (unshuffled data). None when neither holds.
    """
    if len(spikes) < 2:
        return None
    if data is not None:
        counts: dict = {}
        trained: dict = {}
        spike_set = set(spikes)
        for r in rows:
            for k in data.rows_of_step(r["step"]).tolist():
                trained[k] = trained.get(k, 0) + 1
                if r["step"] in spike_set:
                    counts[k] = counts.get(k, 0) + 1
        suspects = [k for k, c in counts.items() if c >= 2 and 2 * c >= trained[k]]
        if suspects:
            steps = sorted(t for t in spikes if set(data.rows_of_step(t).tolist()) & set(suspects))
            return {"kind": "rows", "steps": steps, "rows": rank_rows(data, suspects), "positions": []}
        return None
    recur = _recurrences(rows, spikes)
    if not recur:
        return None
    steps = sorted(t for ts in recur.values() for t in ts)
    return {"kind": "positions", "steps": steps, "positions": sorted(recur), "rows": []}


def recurring_finding(label: str, found: dict, why: tuple = ("recurs with the same data", "recur with the same data")) -> Finding:
    """``why``: what the spikes do, for one spike and for several."""
    steps = found["steps"]
    if found["rows"]:
        named = found["rows"][:ROWS_NAMED]
        rows_text = "; ".join(
            f"row {r['row']} ({fmt(r['input_mads'], 3)} MADs from the median in its inputs, {fmt(r['target_mads'], 3)} "
            "in its targets)" if r["input_mads"] is not None else
            f"row {r['row']} ({fmt(r['target_mads'], 3)} MADs from the median in its targets; its inputs are text)"
            for r in named)
        more = f", and {len(found['rows']) - len(named)} more" if len(found["rows"]) > len(named) else ""
        where = f"the batches holding {rows_text}{more}"
    else:
        where = "batch position" + "s" * (len(found["positions"]) > 1) + " " + ", ".join(
            str(p + 1) for p in found["positions"]) + " of every epoch"
    message = (f"{counted(len(steps), 'loss spike')} {why[len(steps) != 1]} ({'step' if len(steps) == 1 else 'steps'} "
               f"{', '.join(map(str, steps[:8]))}"
               f"{', ...' if len(steps) > 8 else ''}): {where}; the data, not the optimisation, is the likely cause: "
               "look at those rows before changing the clipping")
    return Finding("spikes_from_data", label, message, tuple(steps),
                   {"cause": found["kind"], "positions": [p + 1 for p in found["positions"]], "rows": found["rows"]})


def _flat(values) -> np.ndarray | None:
    """The numbers of every row as one (rows, features) float64 matrix; text inputs (a model
    that takes strings) have no median and are left out: None when nothing else is left."""
    if isinstance(values, dict):
        values = list(values.values())
    parts = [np.asarray(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    parts = [p.reshape(len(p), -1).astype(np.float64) for p in parts if not is_text(p)]
    return np.concatenate(parts, axis=1) if parts else None


def rank_rows(data: DataView, rows: list[int]) -> list[dict]:
    """The rows, farthest from the data's median first: each row's largest distance over its
    features from that feature's median, in median absolute deviations (inputs and targets)."""
    def mads(values, picked):
        values = _flat(values)
        if values is None:  # text alone
            return np.full(len(picked), np.nan)
        sample = values if len(values) <= 50_000 else values[np.random.default_rng(0).choice(len(values), 50_000, replace=False)]
        median = np.median(sample, axis=0)
        mad = np.median(np.abs(sample - median), axis=0)
        spread = np.where(mad > 0, mad, np.where(np.std(sample, axis=0) > 0, np.std(sample, axis=0), 1.0))
        with np.errstate(invalid="ignore"):
            return np.nanmax(np.abs(values[picked] - median) / spread, axis=1)

    picked = np.array(sorted(rows), dtype=np.int64)
    inputs, targets = mads(data.x, picked), mads(data.y, picked)
    ranked = sorted(zip(picked.tolist(), inputs.tolist(), targets.tolist()), key=lambda t: -np.nanmax([t[1], t[2]]))
    return [{"row": k, "input_mads": None if math.isnan(a) else a, "target_mads": b} for k, a, b in ranked]


# --- a comparison ---------------------------------------------------------------------------


def no_baseline(variant, command: list | None = None) -> Finding:
    """The command that runs the missing baseline: the CLI's for files; for objects in memory
    (the Python API) gradwatch.compare; for a GradientWatch, the same fit watched unclipped."""
    from ..record.rows import run_line_from_meta

    meta = variant.meta or {}
    clip = variant.clip if variant.clip not in ("run", "none") else "global"
    values = f"none,{variant.param:g}" if variant.param is not None else "none"
    label = variant.label if variant.clip != "run" else ""
    lead = "without an unclipped run this cannot say whether clipping helps; "
    if meta.get("data") == "model.fit":  # GradientWatch.summary(): the fit is the user's own
        line = 'GradientWatch(clip="none")'
        return Finding("no_baseline", label, f"{lead}fit the same model again from the same weights and seed with "
                       f"{line} for the unclipped baseline", (), {"command": line})
    data = str(meta.get("data", ""))
    if not command and (str(meta.get("model", "")).startswith("keras.Model ") or data.startswith("arrays (")
                        or data == "tf.data.Dataset"):
        line = f'gradwatch.compare(model, data, clip="{clip}", thresholds="{values}")'  # objects, not files
        return Finding("no_baseline", label, f"{lead}{line} compares them on the same batches", (), {"command": line})
    parts = list(command) if command else run_line_from_meta(meta)
    parts[1] = "compare"
    import shlex

    line = " ".join(shlex.quote(str(p)) for p in parts + ["--clip", clip, "--thresholds", values])
    return Finding("no_baseline", label, f"{lead}{line} compares them on the same batches", (), {"command": line})


def failing(findings, codes) -> list[Finding]:
    """The findings whose code is one of ``codes`` (--fail-on)."""
    wanted = set(codes)
    return [f for f in findings if f.code in wanted]


def parse_codes(text: str) -> list[str]:
    """--fail-on's comma-separated codes, each checked against CODES."""
    from ..errors import OptionError

    codes = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in codes if c not in CODES]
    if unknown or not codes:
        raise OptionError(f"--fail-on: unknown finding code{'s' * (len(unknown) > 1)} {', '.join(unknown) or repr(text)}; "
                          f"choose from {', '.join(CODES)}")
    return codes
