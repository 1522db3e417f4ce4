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

from ..diagnose.findings import COMPARISON_CODES, Finding, fmt
from ..diagnose.verdict import best_variant, final_text, instability
from ..record.rows import META_COLUMNS, SUMMARY_COLUMNS, summarize

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
    meta: dict = field(default_factory=dict)  # record.rows.META_COLUMNS: model, data, optimizer, loss_fn
    given_summary: dict | None = None  # read from a --summary-csv file, which has no rows
    layers: object = None  # diagnose.LayerWatch, when per-variable norms were recorded
    rule: object = None  # the run's diagnose.spikes.SpikeRule (None: the default rule)

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
            self._summary = summarize(self.rows, self.rule)
        return self._summary


def sparkline(values, width: int = 24) -> str:
    """Loss per step in `width` characters: each the highest loss of its stretch of steps
    (so spikes show), scaled from the series' lowest loss (▁) to its highest (█) at every width,
    on a log scale when they are positive and more than 10x apart; `!` where a stretch holds a
    non-finite loss."""
    values = list(values)
    if not values:
        return ""
    width = min(width, len(values))
    buckets = [values[i * len(values) // width : (i + 1) * len(values) // width] for i in range(width)]
    peaks = [max(b) if all(math.isfinite(v) for v in b) else math.nan for b in buckets]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "!" * width
    low, high = min(finite), max(finite)
    if low > 0 and high / low > 10:  # a loss over orders of magnitude: log scale, as the plot's axis
        peaks = [math.log10(p) if math.isfinite(p) else p for p in peaks]
        low, high = math.log10(low), math.log10(high)
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
    table.add_row("steps clipped (non-finite ones never are)", f"{summary['pct_clipped']:.1f} %")
    table.add_row("mean clip ratio", fmt(summary["mean_clip_ratio"], 3))
    table.add_row("loss spikes", str(summary["loss_spikes"]))
    table.add_row("gradient spikes", str(summary["grad_spikes"]))
    table.add_row("non-finite steps", str(summary["nonfinite"]))
    if summary.get("overflow"):
        table.add_row("float16 overflow steps (skipped, scale halved)", str(summary["overflow"]))
    share = summary.get("reg_share", float("nan"))
    if isinstance(share, float) and math.isfinite(share) and share != 0:
        table.add_row("regularization share of the loss (median)", f"{100 * share:.1f} %")
    table.add_row("wall time", f"{summary['wall_s']:.1f} s")
    return table


SHOWN_KINDS = ("problem", "warning")  # what the verdict shows of a clipped variant in a comparison (and clip_never_binds)


def verdict_lines(findings: list[Finding], single: bool = True) -> list[str]:
    """The verdict under a table, one line per finding: its message, then its code in brackets
    (the code --fail-on and --findings use). A comparison names each line's variant and shows,
    of the clipped variants, their problems and warnings; --findings holds every finding."""
    def line(f: Finding) -> str:
        name = "" if single or not f.variant or f.code in COMPARISON_CODES else (
            "unclipped" if f.variant == "none" else f.variant) + ": "
        text = name + f.message
        return f"{text[0].upper()}{text[1:]}. [{f.code}]"

    if single:
        return ["Verdict:"] + ["  " + line(f) for f in findings]
    overall = [f for f in findings if f.code in COMPARISON_CODES or not f.variant]
    base = [f for f in findings if f.variant == "none" and f not in overall]
    trouble = [f for f in base if f.kind == "problem"]
    others = [f for f in findings if f.variant and f.variant != "none" and f not in overall
              and (f.kind in SHOWN_KINDS or f.code == "clip_never_binds")]
    shown = trouble + overall + [f for f in base if f not in trouble] + others  # the answer right after the trouble
    return ["Verdict:"] + ["  " + line(f) for f in shown]


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
    ("variant", "left"), ("final loss", "right"), ("best", "right"), ("loss spikes", "right"), ("grad spikes", "right"),
    ("largest jump", "right"), ("nonfinite", "right"), ("% clipped", "right"), ("clip ratio", "right"),
    ("grad norm med", "right"), ("p95", "right"), ("max", "right"), ("wall s", "right"),
]


def compare_cells(v: Variant) -> list[str]:
    """One variant's numbers as the tables show them (never cut: see print_compare)."""
    s = v.summary
    return [
        escape(v.shown_label), fmt(s["final_loss"]) if math.isfinite(s["final_loss"]) else "diverged",
        fmt(s["best_loss"]), str(s["loss_spikes"]), fmt(s["grad_spikes"]), fmt(s["largest_jump"]), str(s["nonfinite"]),
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

    sparks = all(v.rows for v in variants)
    for spark in (24, 12, 0) if sparks else (0,):
        table = compare_table(variants, title, spark)
        if natural_width(table) <= console.width:
            console.print(table)
            if sparks and not spark:
                print_loss_lines(console, variants)
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
    if sparks:
        print_loss_lines(console, variants)


def print_loss_lines(console, variants: list[Variant]) -> None:
    """The loss sparklines alone, one line per variant, as wide as the terminal allows (at most
    48): the picture of a table too wide to carry it."""
    label = max(len(v.shown_label) for v in variants)
    spark = max(8, min(48, console.width - label - 4))
    console.print("loss per step: each character the highest loss of its steps, ▁ lowest, █ highest", style="italic")
    table = Table(show_header=False, box=None, padding=(0, 1, 0, 0))
    table.add_column("variant", no_wrap=True)
    table.add_column("loss", no_wrap=True)
    for v in variants:
        table.add_row(escape(v.shown_label), sparkline([r["loss"] for r in v.rows], spark))
    console.print(table)


def calmest(results):
    """Of training results (train.loop.RunResult), the one best_variant picks."""
    shown = [Variant(r.clipping.strategy, r.clipping.param, r.rows) for r in results]
    return results[shown.index(best_variant(shown))]


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
    ax.set_title(f"gradient norm per layer, {variant.label} (log colour; ▼: spike or non-finite step; red: non-finite)", pad=14)
    if total > len(layers):
        ax.set_ylabel(f"{len(layers)} of {total} layers: each spike's top layer, then the largest shares", fontsize="small")
    fig.colorbar(mesh, cax=ax.inset_axes([1.01, 0.0, 0.015, 1.0]), label="grad norm")  # keeps the x axis aligned


def heat_variants(variants: list[Variant], found: list[Finding] | None = None) -> list[Variant]:
    """The variants whose per-layer heat maps a picture shows: a run's own; in a comparison the
    chosen variant (recommended, else the calmest) and the worst one that did not diverge (a
    diverged variant's map is one block of non-finite cells), each once."""
    watched = [v for v in variants if v.layers is not None]
    if len(watched) <= 1:
        return watched
    found = found if found is not None else []
    diverged = {f.variant for f in found if f.code == "diverged"}
    chosen_label = next((f.variant for f in found if f.code == "recommended"), None)
    chosen = next((v for v in watched if v.label == chosen_label), None) or best_variant(watched)
    alive = [v for v in watched if v.label not in diverged] or watched
    worst = max(alive, key=lambda v: (instability(v.summary), v.is_baseline))
    return [chosen] if worst is chosen else [worst, chosen]


def loss_axis(variants: list[Variant]) -> tuple[bool, float | None]:
    """The loss panel's axis: log scale or not, and where to cut it (None: nowhere).

    Log when the finite losses of the variants that did not diverge are positive and span more
    than 10x. When a variant diverged above them, the axis stops just above the highest loss of
    the others (3x on a log axis, 1.1x on a linear one); with every variant diverged, at
    LOSS_AXIS_SPAN x the highest median loss."""
    from ..diagnose.findings import _diverged

    finite = [r["loss"] for v in variants for r in v.rows if math.isfinite(r["loss"])]
    calm = [v for v in variants if not _diverged(v.summary)]
    calm_losses = [r["loss"] for v in calm for r in v.rows if math.isfinite(r["loss"])]
    shown = calm_losses or finite
    log = bool(shown) and min(shown) > 0 and max(shown) / min(shown) > 10
    if calm_losses and len(calm) < len(variants) and max(finite) > max(calm_losses):
        high = max(calm_losses)
        return log, (high * (3.0 if log else 1.1) if high > 0 else high + 1.0)
    medians = [m for v in variants if (f := [r["loss"] for r in v.rows if math.isfinite(r["loss"])])
               and (m := statistics.median_high(f)) > 0]
    if finite and medians and max(finite) > LOSS_AXIS_SPAN * max(medians):
        return log, LOSS_AXIS_SPAN * max(medians)
    return log, None


def _same_losses(a: Variant, b: Variant) -> bool:
    la, lb = [r["loss"] for r in a.rows], [r["loss"] for r in b.rows]
    return len(la) == len(lb) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(la, lb))


def plot(variants: list[Variant], path: str, title: str = "", fmt_name: str = "png", found=None) -> None:
    """Loss per step (spikes marked, non-finite steps marked on the top edge), grad norm before
    clipping on a log scale with each global-norm threshold as a line, the fraction of steps
    clipped (rolling over 20 steps), and the per-layer heat maps of :func:`heat_variants`.

    Every variant stays visible: earlier variants are drawn wider, so one drawn over an identical
    one still shows both, and the legend says which are identical. A diverging variant (loss to
    1e35, finite or not) would flatten the others: the loss axis then stops just above the
    highest loss of the variants that did not diverge, and says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    watched = heat_variants(variants, found)
    heights = [1.2 + 0.25 * len(heat_layers(v.layers)) for v in watched]
    fig, axes = plt.subplots(3 + len(watched), 1, figsize=(10, 9 + sum(heights)), sharex=True,
                             gridspec_kw={"height_ratios": [3, 2, 1] + heights})
    if title:
        fig.suptitle(title, fontsize="medium")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n = len(variants)
    for i, v in enumerate(variants):
        color = colors[i % len(colors)]
        width = 1.0 + 2.0 * (n - 1 - i) / max(n - 1, 1)  # the first widest: a later identical line shows inside it
        twin = next((u for u in variants[:i] if _same_losses(u, v)), None)
        label = v.label + (f" (= {twin.label})" if twin is not None else "")
        steps = [r["step"] for r in v.rows]
        loss = [r["loss"] if math.isfinite(r["loss"]) else math.nan for r in v.rows]
        axes[0].plot(steps, loss, color=color, lw=width, label=label, ls="--" if twin is not None else "-")
        spikes = [(r["step"], r["loss"]) for r in v.rows if r["loss_spike"] and math.isfinite(r["loss"])]
        if spikes:
            axes[0].scatter(*zip(*spikes), color=color, marker="x", s=30, zorder=3)
        broken = [r["step"] for r in v.rows if r["nonfinite"]]
        if broken:  # where the line stops: a triangle on the top edge per non-finite step
            axes[0].scatter(broken, [0.97] * len(broken), color=color, marker="v", s=25, zorder=3,
                            transform=axes[0].get_xaxis_transform(), clip_on=False)
        norms = [r["grad_norm"] if math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 else math.nan for r in v.rows]
        axes[1].plot(steps, norms, color=color, lw=width)
        if v.clip in GLOBAL_NORM_STRATEGIES:  # thresholds on the global-norm axis (fixed or moving)
            limits = [r.get("threshold", math.nan) for r in v.rows]
            axes[1].plot(steps, [t if math.isfinite(t) and t > 0 else math.nan for t in limits],
                         color=color, ls="--", lw=1)
        window = 20
        flags = [1.0 if r["clipped"] else 0.0 for r in v.rows]
        rolling = [sum(flags[max(0, k - window + 1) : k + 1]) / len(flags[max(0, k - window + 1) : k + 1]) for k in range(len(flags))]
        axes[2].plot(steps, rolling, color=color, lw=width)
    finite_losses = [r["loss"] for v in variants for r in v.rows if math.isfinite(r["loss"])]
    log, top = loss_axis(variants)
    if log:
        axes[0].set_yscale("log")  # a jumping baseline would flatten the clipped curves
    if top is not None:
        axes[0].set_ylim(top=top)
        axes[0].text(0.01, 0.02, f"axis cut at {top:.3g}; the loss reaches {max(finite_losses):.3g}",
                     transform=axes[0].transAxes, va="bottom", fontsize="small")
    axes[0].set_ylabel("loss")
    axes[0].set_title("loss per step (x: loss spike, ▼: non-finite step)")
    axes[0].legend(loc="upper right", fontsize="small")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("grad norm (before clipping)")
    axes[1].set_title("global gradient norm; dashed: threshold")
    axes[2].set_ylabel("clipped")
    axes[2].set_ylim(-0.05, 1.05)
    axes[2].set_title("fraction of steps clipped (last 20 steps)")
    axes[-1].set_xlabel("step")
    for ax, v in zip(axes[3:], watched):
        _heat_map(fig, ax, v)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.3 if title else 0.0) / fig.get_figheight()))  # room for the title
    fig.savefig(path, dpi=100, format=fmt_name)
    plt.close(fig)
