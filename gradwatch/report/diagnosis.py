"""The per-variable diagnosis as the terminal shows it: spikes and what drove them, a per-layer
table with sparklines, layers whose updates are too large. No TensorFlow here."""

from __future__ import annotations

import math

from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from .tables import fmt, sparkline

SPIKES_TITLE = "Loss spikes, gradient spikes and non-finite steps: what drove them"

SPIKES_SHOWN = 10  # spikes listed per run; the rest are counted
LAYERS_SHOWN = 12  # layers listed, by share of the norm²


def _driver(name: str, share: float, ratio: float) -> str:
    share_text = "non-finite" if math.isinf(share) else f"{100 * share:.0f}%"
    ratio_text = f" (×{ratio:.3g})" if math.isfinite(ratio) else ""
    return f"{name} {share_text}{ratio_text}"


def _plural(kind: str) -> str:
    """'loss spike' -> 'loss spikes', 'loss + gradient spike' -> 'loss + gradient spikes'; 'non-finite' stays."""
    return kind + "s" if kind.endswith("spike") else kind


def spikes_table(watch, title: str = SPIKES_TITLE, limit: int = SPIKES_SHOWN) -> Table | None:
    """Step, kind (loss spike, gradient spike, both, non-finite), the jump against the median it
    rose above, and the variables with the largest share of that step's norm²."""
    if not watch.spikes:
        return None
    shown = watch.spikes[:limit]
    more = len(watch.spikes) - len(shown)
    counts = {}
    for spike in watch.spikes:
        counts[spike.kind] = counts.get(spike.kind, 0) + 1
    listed = ", ".join(f"{n} {_plural(kind) if n != 1 else kind}" for kind, n in counts.items())
    caption = (f"the first {len(shown)} of {len(watch.spikes)} steps ({listed}); --layers-csv records every step of "
               "every variable" if more else None)
    table = Table(title=escape(title), caption=caption, header_style="bold", title_justify="left")
    table.add_column("step", justify="right", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("this step (× the median it rose above)", overflow="fold")
    table.add_column("drove it: share of the norm² (× its own median norm)", overflow="fold")
    for spike in shown:
        table.add_row(str(spike.step), spike.kind, escape(spike.jump),
                      escape(", ".join(_driver(*t) for t in spike.top)))
    return table


def layers_table(watch, title: str = "Gradient norm per layer", spark: int = 24) -> Table:
    """Layers by mean share of the global norm², their update/weight ratio and a sparkline of
    the layer's gradient norm (each character the largest norm of its stretch of steps, log scale)."""
    layers = watch.by_layer()
    shown = layers[:LAYERS_SHOWN]
    caption = f"{len(shown)} of {len(layers)} layers, by share" if len(layers) > len(shown) else None
    table = Table(title=escape(title), caption=caption, header_style="bold", title_justify="left")
    longest = max((len(entry["layer"]) for entry in shown), default=5)
    table.add_column("layer", overflow="fold", min_width=min(longest, 32))
    table.add_column("share of norm²", justify="right", no_wrap=True)
    table.add_column("max norm", justify="right", no_wrap=True)
    table.add_column("update/weight", justify="right", no_wrap=True)
    if spark:
        table.add_column("grad norm per step (log)" if spark >= 24 else "norm (log)", no_wrap=True)
    for entry in shown:
        heat = entry["heat"]
        finite = heat[[math.isfinite(v) for v in heat]] if len(heat) else heat
        top = fmt(float(finite.max())) if len(finite) else "-"
        if len(finite) < len(heat):
            top += " (non-finite)"
        line = [sparkline([math.log10(v + 1e-30) if math.isfinite(v) else v for v in heat], spark)] if spark else []
        table.add_row(escape(entry["layer"]), f"{100 * entry['share']:.1f} %", top, fmt(entry["ratio"], 3), *line)
    return table


def print_section(console, variants) -> None:
    """Under the summary of a run or comparison (report.tables.Variant with ``layers``): each run's
    spikes and what drove them, flagged update ratios, then the per-layer table of the
    unclipped baseline (else the first variant)."""
    with_layers = [v for v in variants if v.layers is not None]
    if not with_layers:
        return
    single = len(variants) == 1
    for v in with_layers:
        name = "" if single else ("unclipped (none)" if v.is_baseline else v.label)
        print_diagnosis(console, v.layers, name, SPIKES_SHOWN if single else SPIKES_SHOWN // 2)
    base = next((v for v in with_layers if v.is_baseline), with_layers[0])
    title = "Gradient norm per layer" + ("" if single else f": {'unclipped (none)' if base.is_baseline else base.label}")
    for spark in (24, 12, 0):  # the sparkline shrinks before a name or number would wrap
        table = layers_table(base.layers, title, spark)
        if Measurement.get(console, console.options.update_width(1_000_000), table).maximum <= console.width or not spark:
            break
    console.print(table)


def print_diagnosis(console, watch, name: str = "", limit: int = SPIKES_SHOWN) -> None:
    """The spikes of one run and what drove them (``name``: the variant, in a comparison); the
    update/weight flags are findings (update_too_large), in the verdict."""
    suffix = f", {name}" if name else ""
    table = spikes_table(watch, f"{SPIKES_TITLE}{suffix}", limit)
    if table is not None:
        console.print(table)
    else:
        console.print(escape(f"No loss spike, gradient spike or non-finite step{' in ' + name if name else ''}."))
