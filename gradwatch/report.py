"""Rich tables, verdicts, sparklines and plots made from recorded rows (never changes them).

No TensorFlow here: `gradwatch report` renders saved CSVs through this module.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from .records import META_COLUMNS, SUMMARY_COLUMNS, summarize

BLOCKS = "▁▂▃▄▅▆▇█"
# Strategies whose recorded threshold is a global norm, so it belongs on the grad-norm axis.
GLOBAL_NORM_STRATEGIES = ("global", "autoclip", "zclip")


@dataclass
class Variant:
    """One run of a comparison, as the report sees it."""

    clip: str  # strategy name ("none" for the baseline, "run" for a run CSV without it)
    param: float | None  # the strategy's parameter (N, V, λ, p or Z); None for the baseline
    rows: list
    stopped: str = "finished"  # "nonfinite": --on-nonfinite stop ended it early
    meta: dict = field(default_factory=dict)  # records.META_COLUMNS: model, data, optimizer, loss_fn
    given_summary: dict | None = None  # read from a --summary-csv file, which has no rows
    layers: object = None  # diagnose.LayerWatch, when per-variable norms were recorded

    @property
    def label(self) -> str:
        if self.clip in ("none", "run") or self.param is None:
            return self.clip
        return f"{self.clip} {self.param:g}"

    @property
    def shown_label(self) -> str:
        """The label in tables: marked when --on-nonfinite stop ended the variant early."""
        return f"{self.label} (stopped: non-finite)" if self.stopped == "nonfinite" else self.label

    @property
    def is_baseline(self) -> bool:
        return self.clip == "none"

    @property
    def summary(self) -> dict:
        if self.given_summary is not None:
            return self.given_summary
        if not hasattr(self, "_summary"):
            self._summary = summarize(self.rows)
        return self._summary


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    return str(value)


def sparkline(values, width: int = 24) -> str:
    """Loss per step in `width` characters: each the highest loss of its stretch of steps
    (so spikes show), `!` where a stretch holds a non-finite loss."""
    values = list(values)
    if not values:
        return ""
    width = min(width, len(values))
    buckets = [values[i * len(values) // width : (i + 1) * len(values) // width] for i in range(width)]
    peaks = [max(b) if all(math.isfinite(v) for v in b) else math.nan for b in buckets]
    finite = [p for p in peaks if math.isfinite(p)]
    if not finite:
        return "!" * width
    low, high = min(finite), max(finite)
    span = high - low or 1.0
    return "".join(
        "!" if not math.isfinite(p) else BLOCKS[min(len(BLOCKS) - 1, int((p - low) / span * len(BLOCKS)))] for p in peaks
    )


# --- a single run -----------------------------------------------------------------------------


def run_table(summary: dict, title: str = "") -> Table:
    """One run's summary as metric / value lines (reads well in any terminal width). The CLI
    prints the title as a line of its own, so it wraps at the terminal, not at the table."""
    table = Table(title=escape(title) if title else None, show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", no_wrap=True)
    table.add_row("steps", str(summary["steps"]))
    table.add_row("loss first → last", f"{fmt(summary['loss_first'])} → {fmt(summary['loss_last'])}")
    table.add_row("loss best / final (last 10 %)", f"{fmt(summary['best_loss'])} / {final_text(summary)}")
    table.add_row(
        "grad norm median / p95 / max",
        f"{fmt(summary['grad_norm_median'])} / {fmt(summary['grad_norm_p95'])} / {fmt(summary['grad_norm_max'])}",
    )
    table.add_row("steps clipped", f"{summary['pct_clipped']:.1f} %")
    table.add_row("mean clip ratio", fmt(summary["mean_clip_ratio"], 3))
    table.add_row("loss spikes", str(summary["spikes"]))
    table.add_row("non-finite steps", str(summary["nonfinite"]))
    if summary.get("overflow"):
        table.add_row("float16 overflow steps (skipped, scale halved)", str(summary["overflow"]))
    share = summary.get("reg_share", float("nan"))
    if isinstance(share, float) and math.isfinite(share) and share != 0:
        table.add_row("regularization share of the loss (median)", f"{100 * share:.1f} %")
    table.add_row("wall time", f"{summary['wall_s']:.1f} s")
    return table


def jump_sentence(summary: dict) -> str:
    """Is the loss jumping? One sentence citing the numbers.

    Steps whose batch held non-finite input data (``--allow-nonfinite-data``) are the data's
    doing, not the training's: they are named apart and do not make the loss "jumping".
    """
    spikes, nonfinite = summary["spikes"], summary["nonfinite"]
    from_data = _data_sentence(summary)
    if from_data:
        spikes -= summary.get("spikes_from_data", 0)
        nonfinite -= summary.get("nonfinite_from_data", 0)
        if spikes == 0 and nonfinite == 0:
            return f"loss is stable apart from the input data: {from_data}"
        spike_steps = summary.get("spike_steps_clean", summary["spike_steps"])
        return _jumping(spikes, nonfinite, spike_steps, summary) + f"; besides, {from_data}"
    if spikes == 0 and nonfinite == 0:
        return "loss is stable: no spikes, no non-finite steps"
    return _jumping(spikes, nonfinite, summary["spike_steps"], summary)


def _data_sentence(summary: dict) -> str:
    bad = summary.get("bad_input_steps", 0)
    if not bad:
        return ""
    n = summary.get("nonfinite_from_data", 0)
    return (
        f"{bad} step{'s' * (bad != 1)} trained on batches with NaN/inf input values, "
        f"{n} of them non-finite: the data, not the training, produced {'them' if n != 1 else 'it'}"
    )


def _jumping(spikes: int, nonfinite: int, spike_steps: list, summary: dict) -> str:
    parts = [f"{spikes} spike{'s' * (spikes != 1)}"]
    if spike_steps:
        parts[0] += f" (first at step {spike_steps[0]})"
    if nonfinite:
        parts.append(f"{nonfinite} non-finite step{'s' * (nonfinite != 1)}")
    if summary["largest_jump_step"] is not None and summary["largest_jump"] > 0:
        parts.append(f"largest jump +{fmt(summary['largest_jump'])} at step {summary['largest_jump_step']}")
    return "loss is jumping: " + ", ".join(parts)


def clip_sentence(summary: dict) -> str:
    """Was clipping active? Made from the rows alone, so a saved CSV reads like the live run."""
    if summary["pct_clipped"] == 0:
        return f"no step was clipped (grad norm max {fmt(summary['grad_norm_max'])})"
    return (
        f"clipping was active on {summary['pct_clipped']:.0f}% of steps "
        f"(grad norm median {fmt(summary['grad_norm_median'])}, mean clip ratio {fmt(summary['mean_clip_ratio'], 3)})"
    )


def run_verdict(summary: dict) -> str:
    sentence = jump_sentence(summary)
    return f"Verdict: {sentence[0].upper()}{sentence[1:]}; {clip_sentence(summary)}."


# --- comparisons ------------------------------------------------------------------------------

COMPARE_COLUMNS = SUMMARY_COLUMNS + META_COLUMNS


def summary_rows(variants: list[Variant]) -> list[dict]:
    """The side-by-side table as plain rows (for --summary-csv and --format)."""
    out = []
    for v in variants:
        s = v.summary
        out.append({"clip": v.clip, "param": v.param, **{k: s[k] for k in SUMMARY_COLUMNS[2:]},
                    **{c: v.meta.get(c, "") for c in META_COLUMNS}})
    return out


COMPARE_HEADERS = [
    ("variant", "left"), ("final loss", "right"), ("best", "right"), ("spikes", "right"),
    ("largest jump", "right"), ("nonfinite", "right"), ("% clipped", "right"), ("clip ratio", "right"),
    ("grad norm med", "right"), ("p95", "right"), ("max", "right"), ("wall s", "right"),
]


def compare_cells(v: Variant) -> list[str]:
    """One variant's numbers as the tables show them (never cut: see print_compare)."""
    s = v.summary
    return [
        escape(v.shown_label), fmt(s["final_loss"]) if math.isfinite(s["final_loss"]) else "diverged",
        fmt(s["best_loss"]), str(s["spikes"]), fmt(s["largest_jump"]), str(s["nonfinite"]),
        f"{s['pct_clipped']:.1f}", fmt(s["mean_clip_ratio"], 3), fmt(s["grad_norm_median"]),
        fmt(s["grad_norm_p95"]), fmt(s["grad_norm_max"]), f"{s['wall_s']:.1f}",
    ]


def compare_table(variants: list[Variant], title: str = "gradwatch compare", spark: int = 24) -> Table:
    """Variants as rows; the last column a loss sparkline of ``spark`` characters (0: none)."""
    table = Table(title=escape(title), header_style="bold")
    rows = [compare_cells(v) for v in variants]
    for name, justify in COMPARE_HEADERS:
        table.add_column(name, justify=justify, no_wrap=True)  # print_compare makes sure it fits
    if spark:
        table.add_column("loss", justify="left", no_wrap=True)
    for v, row in zip(variants, rows):
        table.add_row(*row, *([sparkline([r["loss"] for r in v.rows], spark)] if spark else []))
    return table


def stacked_compare_table(variants: list[Variant], title: str) -> Table:
    """The same numbers with variants as columns: for terminals too narrow for one row each."""
    table = Table(title=escape(title) if title else None, header_style="bold")
    table.add_column("", no_wrap=True)
    cells = [compare_cells(v) for v in variants]
    for v, column in zip(variants, cells):
        table.add_column(column[0], justify="right", no_wrap=True)
    for k, (name, _) in enumerate(COMPARE_HEADERS[1:], start=1):
        table.add_row(name, *[column[k] for column in cells])
    return table


def print_compare(console, variants: list[Variant], title: str) -> None:
    """The comparison at the console's width with every number whole: the full table; else
    with a shorter, then no sparkline; else stacked (variants as columns, in groups that fit)."""
    def natural_width(table) -> int:  # what it needs, not what the console would squeeze it to
        return Measurement.get(console, console.options.update_width(1_000_000), table).maximum

    for spark in (24, 12, 0) if all(v.rows for v in variants) else (0,):
        table = compare_table(variants, title, spark)
        if natural_width(table) <= console.width:
            console.print(table)
            return
    groups, group = [], []
    for v in variants:
        trial = stacked_compare_table(group + [v], title)
        if group and natural_width(trial) > console.width:
            groups.append(group)
            group = []
        group.append(v)
    groups.append(group)
    for k, group in enumerate(groups):
        part = f" ({k + 1}/{len(groups)})" if len(groups) > 1 else ""
        console.print(escape(title + part), style="italic")  # a line of its own: the narrow table would wrap it
        console.print(stacked_compare_table(group, ""))


def instability(summary: dict) -> int:
    return summary["spikes"] + summary["nonfinite"]


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


def best_variant(variants: list[Variant]) -> Variant:
    """Fewest spikes + non-finite steps; among those, the lowest final loss."""
    return min(variants, key=lambda v: (instability(v.summary), _final(v.summary)))


def compare_verdict(variants: list[Variant]) -> list[str]:
    """Sentences under the comparison table: does the baseline jump, and is any variant clearly better.

    The rule (also in the README): a variant is clearly better than unclipped when it does not
    end worse (its final loss is not higher by more than 1 %) and either jumps less (fewer spikes
    + non-finite steps) or, as stable, ends lower by more than 1 %. Among those, the one with
    the fewest jumps, then the lowest final loss, is named. Otherwise no variant is recommended.
    """
    lines = []
    baseline = next((v for v in variants if v.is_baseline), None)
    if baseline is not None:
        b = baseline.summary
        lines.append(f"Unclipped: {jump_sentence(b)}; final loss {final_text(b)}.")
    clipped = [v for v in variants if not v.is_baseline] or variants
    if baseline is None:
        best = best_variant(clipped)
        lines.append(f"Most stable: {best.label} ({_reason(best.summary)}).")
        return lines
    b = baseline.summary

    def clearly_better(v: Variant) -> bool:
        s = v.summary
        if clearly_lower(_final(b), _final(s)):  # it ends worse than unclipped
            return False
        return instability(s) < instability(b) or clearly_lower(_final(s), _final(b))

    better = [v for v in clipped if clearly_better(v)]
    if better:
        best = best_variant(better)
        s = best.summary
        if instability(s) == 0:
            how = "calms the loss" if instability(b) else "ends lower, as stable"
        else:
            how = f"jumps less ({instability(s)} spikes/non-finite steps against {instability(b)})"
        lines.append(f"Most stable: {best.label} {how} ({_reason(s)}; unclipped {final_text(b)}).")
        lines += _keras_form(best)
        return lines
    pick = best_variant(clipped)
    s = pick.summary
    if instability(b) == 0 and clearly_lower(_final(b), _final(s)):
        lines.append(
            f"The unclipped run does not jump, and clipping slows progress here: best clipped variant "
            f"{pick.label} ends at {final_text(s)} against {final_text(b)} unclipped."
        )
    elif instability(s) < instability(b):
        lines.append(
            f"No variant is clearly better: {pick.label} jumps less ({instability(s)} against {instability(b)}) "
            f"but ends worse ({final_text(s)} against {final_text(b)} unclipped)."
        )
    else:
        lines.append(
            f"No variant is clearly better than unclipped: none jumps less, and none ends more than "
            f"{FINAL_LOSS_MARGIN:.0%} lower (best final loss {final_text(s)}, {pick.label}; unclipped {final_text(b)})."
        )
    return lines


def calmest(results):
    """Of training results (train.loop.RunResult), the one best_variant picks."""
    shown = [Variant(r.clipping.strategy, r.clipping.param, r.rows) for r in results]
    return results[shown.index(best_variant(shown))]


def _keras_form(v: Variant) -> list[str]:
    """The recommended threshold as the user types it into Keras, where that is another number."""
    from .diagnose.suggest import keras_sentence, keras_threshold

    if v.clip not in ("global", "norm") or v.param is None or not v.rows:
        return []
    keras = keras_threshold(v.rows, v.param, sparse_norm=v.meta.get("sparse_norm") or None)
    return [] if keras is None else [keras_sentence(v.param, keras, v.clip)]


def _reason(s: dict) -> str:
    return (f"{s['spikes']} spike{'s' * (s['spikes'] != 1)}, {s['nonfinite']} non-finite, "
            f"final loss {final_text(s)}, clipped on {s['pct_clipped']:.0f}% of steps")


# --- pictures -----------------------------------------------------------------------------------


PLOT_FORMATS = ("png", "svg", "pdf")
LOSS_AXIS_SPAN = 1e4  # the loss axis reaches at most this far above the highest variant's median loss


HEAT_LAYERS = 24  # the heat map shows at most this many layers: every spike's top layer, then the largest shares


def heat_layers(watch) -> list[dict]:
    """The layers the heat map shows (watch.by_layer() entries, largest share first): the layer
    of every spike's top variable, then the layers with the largest share, HEAT_LAYERS at most."""
    layers = watch.by_layer()
    layer_of = dict(zip(watch.variables, watch.layers))
    drivers = {layer_of[s.top[0][0]] for s in watch.spikes if s.top}
    chosen = [e for e in layers if e["layer"] in drivers][:HEAT_LAYERS]
    chosen += [e for e in layers if e["layer"] not in drivers][: HEAT_LAYERS - len(chosen)]
    return sorted(chosen, key=lambda e: -e["share"])


def _heat_map(fig, ax, variant: Variant) -> None:
    """Layers (largest share of the norm² first) x steps, log colour of the layer's gradient norm
    (largest per column of steps), spikes marked above, each layer's update/weight ratio in its label."""
    import numpy as np
    from matplotlib.colors import LogNorm

    watch = variant.layers
    layers = heat_layers(watch)
    heat = np.array([entry["heat"] for entry in layers], dtype=np.float64)
    _, starts = watch.heat()
    if heat.size == 0:
        return
    edges = np.array(list(starts) + [starts[-1] + watch.heat_width], dtype=np.float64) - 0.5
    finite = heat[np.isfinite(heat) & (heat > 0)]
    shown = np.where(np.isfinite(heat) & (heat > 0), heat, np.nan)
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size and finite.max() > finite.min() else None
    mesh = ax.pcolormesh(edges, np.arange(len(layers) + 1), shown, norm=norm, cmap="viridis", shading="flat")
    broken = np.argwhere(~np.isfinite(heat))
    if broken.size:  # non-finite norms: red cells
        ax.pcolormesh(edges, np.arange(len(layers) + 1), np.where(np.isfinite(heat), np.nan, 1.0), cmap="Reds",
                      vmin=0, vmax=1, shading="flat")
    ax.set_yticks(np.arange(len(layers)) + 0.5)
    ax.set_yticklabels([f"{e['layer']}  Δw/w {e['ratio']:.2g}" if math.isfinite(e["ratio"]) else e["layer"]
                        for e in layers], fontsize="small")
    ax.invert_yaxis()
    if watch.spikes:
        ax.scatter([s.step for s in watch.spikes], [1.02] * len(watch.spikes), marker="v", color="red", s=18,
                   clip_on=False, transform=ax.get_xaxis_transform(), zorder=3)
    total = len(watch.by_layer())
    ax.set_title(f"gradient norm per layer, {variant.label} (log colour; ▼: spike; red: non-finite)", pad=14)
    if total > len(layers):
        ax.set_ylabel(f"{len(layers)} of {total} layers: each spike's top layer, then the largest shares", fontsize="small")
    fig.colorbar(mesh, cax=ax.inset_axes([1.01, 0.0, 0.015, 1.0]), label="grad norm")  # keeps the x axis aligned


def plot(variants: list[Variant], path: str, title: str = "", fmt_name: str = "png") -> None:
    """Loss per step (spikes marked, non-finite steps marked on the top edge), grad norm before
    clipping on a log scale with each global-norm threshold as a line, and the fraction of steps
    clipped (rolling over 20 steps). A diverging run (loss to 1e35) would flatten the others:
    the loss axis then stops at LOSS_AXIS_SPAN x the highest median loss, and says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    watched = next((v for v in variants if v.layers is not None and v.is_baseline), None) or next(
        (v for v in variants if v.layers is not None), None)
    if watched is None:
        fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True, gridspec_kw={"height_ratios": [3, 2, 1]})
    else:
        shown = len(heat_layers(watched.layers))
        heat_height = 1.2 + 0.25 * shown
        fig, axes = plt.subplots(4, 1, figsize=(10, 9 + heat_height), sharex=True,
                                 gridspec_kw={"height_ratios": [3, 2, 1, heat_height]})
    if title:
        fig.suptitle(title, fontsize="medium")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, v in enumerate(variants):
        color = colors[i % len(colors)]
        steps = [r["step"] for r in v.rows]
        loss = [r["loss"] if math.isfinite(r["loss"]) else math.nan for r in v.rows]
        axes[0].plot(steps, loss, color=color, lw=1, label=v.label)
        spikes = [(r["step"], r["loss"]) for r in v.rows if r["loss_spike"] and math.isfinite(r["loss"])]
        if spikes:
            axes[0].scatter(*zip(*spikes), color=color, marker="x", s=30, zorder=3)
        broken = [r["step"] for r in v.rows if r["nonfinite"]]
        if broken:  # where the line stops: a triangle on the top edge per non-finite step
            axes[0].scatter(broken, [0.97] * len(broken), color=color, marker="v", s=25, zorder=3,
                            transform=axes[0].get_xaxis_transform(), clip_on=False)
        norms = [r["grad_norm"] if math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 else math.nan for r in v.rows]
        axes[1].plot(steps, norms, color=color, lw=1)
        if v.clip in GLOBAL_NORM_STRATEGIES:  # thresholds on the global-norm axis (fixed or moving)
            limits = [r.get("threshold", math.nan) for r in v.rows]
            axes[1].plot(steps, [t if math.isfinite(t) and t > 0 else math.nan for t in limits],
                         color=color, ls="--", lw=1)
        window = 20
        flags = [1.0 if r["clipped"] else 0.0 for r in v.rows]
        rolling = [sum(flags[max(0, k - window + 1) : k + 1]) / len(flags[max(0, k - window + 1) : k + 1]) for k in range(len(flags))]
        axes[2].plot(steps, rolling, color=color, lw=1)
    finite_losses = [r["loss"] for v in variants for r in v.rows if math.isfinite(r["loss"])]
    if finite_losses and min(finite_losses) > 0 and max(finite_losses) / min(finite_losses) > 10:
        axes[0].set_yscale("log")  # a diverged baseline would flatten the clipped curves
    medians = [statistics.median_high(finite) for v in variants
               if (finite := [r["loss"] for r in v.rows if math.isfinite(r["loss"])])]
    medians = [m for m in medians if m > 0]
    if finite_losses and medians and max(finite_losses) > LOSS_AXIS_SPAN * max(medians):
        top = LOSS_AXIS_SPAN * max(medians)
        axes[0].set_ylim(top=top)
        axes[0].text(0.01, 0.02, f"axis cut at {top:.3g}; the loss reaches {max(finite_losses):.3g}",
                     transform=axes[0].transAxes, va="bottom", fontsize="small")
    axes[0].set_ylabel("loss")
    axes[0].set_title("loss per step (x: spike, ▼: non-finite step)")
    axes[0].legend(loc="upper right", fontsize="small")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("grad norm (before clipping)")
    axes[1].set_title("global gradient norm; dashed: threshold")
    axes[2].set_ylabel("clipped")
    axes[2].set_ylim(-0.05, 1.05)
    axes[2].set_title("fraction of steps clipped (last 20 steps)")
    axes[-1].set_xlabel("step")
    if watched is not None:
        _heat_map(fig, axes[3], watched)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.3 if title else 0.0) / fig.get_figheight()))  # room for the title
    fig.savefig(path, dpi=100, format=fmt_name)
    plt.close(fig)

