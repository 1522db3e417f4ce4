"""The verdict of a run or a comparison as findings, and the compare rule: which variant of a
comparison is clearly better than unclipped, if any (the rule the README states).

A variant here is anything with ``label``, ``clip``, ``param``, ``rows``, ``meta``,
``is_baseline`` and ``summary`` (report.tables.Variant). No TensorFlow.
"""

from __future__ import annotations

import math

from ..errors import counted
from .findings import Finding, fmt, no_baseline, rank_rows, recurring_finding, run_findings, who
from .suggest import keras_sentence, keras_threshold


def compare_findings(variants, data=None) -> list[Finding]:
    """Every variant's findings, then the comparison's: the compare rule
    (:func:`compare_decision`) says which variant is clearly better, if any."""
    out = []
    for v in variants:
        out += run_findings(v, data)
    out += compare_decision(variants, out, data)
    return out


def findings_of(variants, data=None, command: list | None = None) -> list[Finding]:
    """A run (one variant) or a comparison: the findings the verdict prints. ``command``: the
    user's ``gradwatch run ...`` as parts, without clipping (session.run_line_from_options), for
    the compare command no_baseline gives; without it, the one the rows' META_COLUMNS describe."""
    variants = list(variants)
    if len(variants) == 1:
        found = run_findings(variants[0], data)
        if not variants[0].is_baseline and variants[0].clip != "run":
            found.append(no_baseline(variants[0], command))
        return found
    found = compare_findings(variants, data)
    if not any(v.is_baseline for v in variants):
        found.append(no_baseline(variants[0], command))
    return found


def instability(summary: dict) -> int:
    """Loss spikes + non-finite steps: each step counted once (a non-finite step is no spike)."""
    return summary["loss_spikes"] + summary["nonfinite"]


def _final(summary: dict) -> float:
    value = summary["final_loss"]
    return value if math.isfinite(value) else math.inf


def final_text(summary: dict) -> str:
    """The final loss, or what happened instead of one."""
    value = summary["final_loss"]
    return fmt(value) if math.isfinite(value) else "diverged (non-finite)"


# How much lower a final loss must be to count as better: 1 % of the larger magnitude.
FINAL_LOSS_MARGIN = 0.01


def clearly_lower(a: float, b: float) -> bool:
    """Is final loss ``a`` lower than ``b`` by more than the margin? (inf: diverged)"""
    if math.isinf(b) and not math.isinf(a):
        return True
    if math.isinf(a):
        return False
    return b - a > FINAL_LOSS_MARGIN * max(abs(a), abs(b))


def best_variant(variants: list):
    """Fewest loss spikes + non-finite steps; among those, the lowest final loss."""
    return min(variants, key=lambda v: (instability(v.summary), _final(v.summary)))


def _codes(found: list[Finding], v) -> set:
    return {f.code for f in found if f.variant == v.label}


def _calm(found: list[Finding], v) -> bool:
    return not _codes(found, v) & {"loss_spikes", "nonfinite", "diverged", "spikes_from_data"}


def compare_decision(variants: list, found: list[Finding], data=None) -> list[Finding]:
    """The comparison's findings, from its variants' own (``found``).

    The rule (also in the README): a variant is clearly better than unclipped when it does not
    end worse (its final loss, the median of the last 10 % of steps, is not higher by more than
    1 %) and either jumps less (fewer loss spikes + non-finite steps) or, as stable, ends lower by
    more than 1 %. Among those, one that did not diverge is preferred, then one whose clipping is
    not a learning-rate cut (clip_always_binds); then the fewest jumps, then the lowest final loss
    (``recommended``; one that diverged all the same says so). When every
    variant jumps: ``no_variant_calm``, with ``spikes_from_data`` when the same steps spike in all.
    """
    out = []
    baseline = next((v for v in variants if v.is_baseline), None)
    clipped = [v for v in variants if not v.is_baseline] or variants
    if not any(_calm(found, v) for v in variants):
        common = sorted(set.intersection(*(set(v.summary["spike_steps_clean"]) for v in variants)))
        why = ""
        if common:
            steps = {"kind": "every variant", "steps": common, "positions": [], "rows": []}
            if data is not None:
                rows = sorted({k for t in common for k in data.rows_of_step(t).tolist()})
                steps["rows"] = rank_rows(data, rows)
            same = ("comes at the same step", "come at the same steps")  # one spike, several
            out.append(recurring_finding("", steps, tuple(f"{w} in every variant, clipped or not" for w in same)))
            why = f"; {counted(len(common), 'loss spike')} {same[len(common) != 1]} in all of them (spikes_from_data)"
        counts = ", ".join(f"{who(v)} {instability(v.summary)}" for v in variants)
        out.append(Finding("no_variant_calm", "", f"no variant is calm: each has loss spikes, non-finite steps or "
                           f"diverged (loss spikes + non-finite steps: {counts}){why}", tuple(common),
                           {"instability": {v.label: instability(v.summary) for v in variants}}))
    if baseline is None:
        best = best_variant(clipped)
        out.append(Finding("no_clear_winner", "", f"most stable of these: {best.label} ({_reason(best.summary)})",
                           (), {"variant": best.label}))
        return out
    b = baseline.summary

    def clearly_better(v) -> bool:
        s = v.summary
        if clearly_lower(_final(b), _final(s)):  # it ends worse than unclipped
            return False
        return instability(s) < instability(b) or clearly_lower(_final(s), _final(b))

    better = [v for v in clipped if clearly_better(v)]
    if better:
        # one that did not diverge first, then one whose clipping is not a learning-rate cut
        kept = [v for v in better if "diverged" not in _codes(found, v)]
        honest = [v for v in kept if "clip_always_binds" not in _codes(found, v)]
        best = best_variant(honest or kept or better)
        s = best.summary
        if instability(s) == 0:
            how = "calms the loss" if instability(b) else "ends lower, as stable"
        else:
            how = f"jumps less (loss spikes + non-finite steps: {instability(s)} against {instability(b)})"
        cut = ""
        if "diverged" in _codes(found, best):
            cut = "; but it diverged too, so clipping alone does not fix this run (diverged)"
        elif "clip_always_binds" in _codes(found, best):
            cut = "; but it clips nearly every step, so its calm is a learning-rate cut (clip_always_binds)"
        out.append(Finding("recommended", best.label,
                           f"recommended: {best.label} {how} ({_reason(s)}; unclipped {final_text(b)}){cut}", (),
                           {"variant": best.label, "final_loss": s["final_loss"], "baseline_final_loss": b["final_loss"],
                            "instability": instability(s), "baseline_instability": instability(b),
                            "pct_clipped": s["pct_clipped"]}))
        out += _keras_form(best)
        return out
    pick = best_variant(clipped)
    s = pick.summary
    if instability(b) == 0 and clearly_lower(_final(b), _final(s)):
        out.append(Finding("clipping_slows", "",
                           f"unclipped does not jump, and clipping slows progress here: the best clipped variant, "
                           f"{pick.label}, ends at {final_text(s)} against {final_text(b)} unclipped", (),
                           {"variant": pick.label, "final_loss": s["final_loss"], "baseline_final_loss": b["final_loss"]}))
    elif instability(s) < instability(b):
        out.append(Finding("no_clear_winner", "",
                           f"no variant is clearly better: {pick.label} jumps less ({instability(s)} against "
                           f"{instability(b)}) but ends worse ({final_text(s)} against {final_text(b)} unclipped)", (),
                           {"variant": pick.label}))
    else:
        out.append(Finding("no_clear_winner", "",
                           f"no variant is clearly better than unclipped: none jumps less, and none ends more than "
                           f"{FINAL_LOSS_MARGIN:.0%} lower (best final loss {final_text(s)}, {pick.label}; unclipped "
                           f"{final_text(b)})", (), {"variant": pick.label}))
    return out


def _keras_form(v) -> list[Finding]:
    """The recommended threshold as the user types it into Keras, where that is another number."""
    if v.clip not in ("global", "norm") or v.param is None or not v.rows:
        return []
    keras = keras_threshold(v.rows, v.param, sparse_norm=v.meta.get("sparse_norm") or None)
    if keras is None:
        return []
    sentence = keras_sentence(v.param, keras, v.clip)
    return [Finding("keras_threshold", v.label, sentence[0].lower() + sentence[1:].rstrip("."), (),
                    {"threshold": v.param, "keras": keras})]


def _reason(s: dict) -> str:
    spikes = s["loss_spikes"]
    return (f"{counted(spikes, 'loss spike')}, {s['nonfinite']} non-finite, "
            f"final loss {final_text(s)}, clipped on {s['pct_clipped']:.0f}% of steps")
