"""Per-variable norms of one run, accumulated as the run goes in memory that does not grow with
the number of steps: spike attribution, update/weight ratios, a down-sampled heat map.

The rules (also in the README):

- **Loss spike**: the run's spike rule (``diagnose.spikes.SpikeRule``), the ``loss_spike`` column.
- **Gradient spike**: the same rule on the global gradient norm before clipping.
- **Non-finite step**: the loss or a gradient not finite; listed with what drove it (the
  variables whose gradient was not finite), counted apart from the spikes.
- **What drove it**: each variable's share of the global norm² at that step (the shares sum to
  1) and its norm against the median of its own previous ``window`` norms. The table names the
  variables with the largest shares.
- **Update/weight ratio**: ‖Δw‖/‖w‖ per variable, summarised by its geometric mean over the
  steps that updated it. A variable whose ratio is more than ``RATIO_FLAG`` × the median ratio of
  its kind is flagged: the learning rate may be too high for it. The kinds (:data:`KINDS`): the
  variables that started at zero (biases, normalization offsets, and also the rank-2 biases of
  an ``EinsumDense`` such as ``MultiHeadAttention``'s query/key/value), whose ‖w‖ grows from 0
  so their ratios are large by nature; the other matrices (kernels, embeddings: rank ≥ 2); the
  other vectors and scalars (normalization scales, biases with a random or constant start).
  "Started at zero": its weight norm before the first step seen is 0.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .spikes import SpikeRule

# The --layers-csv columns, one row per step and variable (compare: clip and param first).
LAYER_COLUMNS = ["clip", "param", "step", "variable", "layer", "grad_norm", "clipped_norm", "weight_norm",
                 "update_norm", "shape"]


def layer_rows(clipping, names: tuple[list[str], list[str]], shapes: list[tuple], rows, norms) -> list[dict]:
    """One --layers-csv row (LAYER_COLUMNS) per step and variable: ``names`` are the (variables,
    layers) of the per-variable records, ``norms`` a block's (n, 4, V) matrix beside its ``rows``."""
    variables, layers = names
    shapes = ["x".join(map(str, s)) for s in shapes]
    out = []
    for row, per in zip(rows, norms.tolist()):
        grad, clipped, weight, update = per
        for k, (variable, layer) in enumerate(zip(variables, layers)):
            out.append({"clip": clipping.strategy, "param": clipping.param, "step": row["step"], "variable": variable,
                        "layer": layer, "grad_norm": grad[k], "clipped_norm": clipped[k], "weight_norm": weight[k],
                        "update_norm": update[k], "shape": shapes[k]})
    return out


RATIO_FLAG = 10.0  # flag a variable whose update/weight ratio is this many times the median of its kind
KINDS = ("variables that started at zero", "matrices", "vectors")  # the groups compared, as the findings name them
HEAT_COLUMNS = 400  # the heat map keeps at most this many columns of steps, whatever the run's length
TOP = 3  # variables named per spike


@dataclass
class Spike:
    """One spike step and what drove it."""

    step: int
    kinds: list[str]  # "loss", "grad" (both possible), or "nonfinite" alone
    loss: float
    loss_median: float  # the median the spike rule compared the loss with (NaN before enough history)
    grad_norm: float
    grad_median: float
    top: list[tuple[str, float, float]] = field(default_factory=list)  # (variable, share of norm², norm / own median)

    @property
    def jump(self) -> str:
        """The jump that made it a spike, as the table shows it."""
        parts = []
        if "nonfinite" in self.kinds:
            return f"loss {_fmt(self.loss)}, grad norm {_fmt(self.grad_norm)}"
        if "loss" in self.kinds:
            parts.append(_jump("loss", self.loss, self.loss_median))
        if "grad" in self.kinds:
            parts.append(_jump("grad norm", self.grad_norm, self.grad_median))
        return "; ".join(parts)

    @property
    def kind(self) -> str:
        """The kind as the tables name it."""
        return {"loss": "loss spike", "grad": "gradient spike", "nonfinite": "non-finite"}[self.kinds[0]] if len(
            self.kinds) == 1 else "loss + gradient spike"


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))


def _jump(what: str, value: float, median: float) -> str:
    """'loss 32.53 (×4.1 its median 7.896)': this step's value against the median it rose above."""
    if not math.isfinite(value) or not math.isfinite(median):
        return f"{what} {_fmt(value)}"
    if median > 0:
        return f"{what} {_fmt(value)} (×{value / median:.2g} its median {_fmt(median)})"
    return f"{what} {_fmt(value)} (+{_fmt(value - median)} above its median {_fmt(median)})"


class LayerWatch:
    """Fed one block of steps at a time (:meth:`update`); keeps O(window × V + HEAT_COLUMNS × V)."""

    def __init__(self, variables: list[str], layers: list[str], rule: SpikeRule | None = None,
                 shapes: list[tuple] | None = None):
        self.variables, self.layers = list(variables), list(layers)
        self.shapes = [tuple(s) for s in shapes] if shapes is not None else [()] * len(self.variables)
        self.rule = rule or SpikeRule()
        n = len(self.variables)
        self._norms: deque[np.ndarray] = deque(maxlen=self.rule.window)  # previous steps' per-variable grad norms
        self._losses = self.rule.detector()  # only for the median a loss spike rose above
        self._grads = self.rule.detector()  # the gradient-spike rule
        self.spikes: list[Spike] = []
        self.steps = 0
        self._log_ratio = np.zeros(n)  # Σ log10(‖Δw‖/‖w‖) over steps that updated the variable
        self._ratio_steps = np.zeros(n, dtype=np.int64)
        self._share = np.zeros(n)  # Σ share of the global norm² over finite steps
        self._share_steps = 0
        self._grad_sq = np.zeros(n)  # Σ grad norm² (for each variable's RMS norm)
        self._zero_start: np.ndarray | None = None  # weight norm 0 before the first step seen
        # Heat map: columns of `width` steps each hold every variable's largest grad norm.
        self.heat_width = 1
        self._heat: list[np.ndarray] = []
        self._heat_steps: list[int] = []  # first step of each column
        self._open: np.ndarray | None = None
        self._open_count = 0

    # -- feeding --------------------------------------------------------------------------------

    def update(self, rows: list[dict], norms: np.ndarray) -> None:
        """``rows``: the block's rows (step, loss, grad_norm, loss_spike, nonfinite);
        ``norms``: (n, 4, V) as training.PER_VARIABLE (grad, clipped, weight, update).

        The spike rules run step by step (each step's medians are those of the steps before
        it); the sums behind the shares, the update ratios and the heat map take the block
        at once."""
        if not rows:
            return
        norms = np.asarray(norms, dtype=np.float64)
        grads, weights, updates = norms[:, 0], norms[:, 2], norms[:, 3]
        if self._zero_start is None:
            self._zero_start = weights[0] == 0
        finite = np.all(np.isfinite(grads), axis=1)
        for row, grad, ok in zip(rows, grads, finite.tolist()):
            self._spikes_at(row, grad)
            if ok:
                self._norms.append(grad)
        squared = grads[finite] ** 2
        self._grad_sq += squared.sum(axis=0)
        total = squared.sum(axis=1)
        counted = total > 0
        self._share += (squared[counted] / total[counted, None]).sum(axis=0)
        self._share_steps += int(counted.sum())
        applied = np.array([not row.get("nonfinite", False) for row in rows])[:, None]
        with np.errstate(invalid="ignore"):
            moved = applied & (updates > 0) & (weights > 0) & np.isfinite(updates) & np.isfinite(weights)
        self._log_ratio += np.log10(np.where(moved, updates, 1.0) / np.where(moved, weights, 1.0)).sum(axis=0)
        self._ratio_steps += moved.sum(axis=0)
        self._heat_add([int(row["step"]) for row in rows], np.where(np.isfinite(grads), grads, np.inf))

    def _spikes_at(self, row: dict, grad: np.ndarray) -> None:
        """One step through the spike rules; a spike step is listed with what drove it."""
        self.steps += 1
        loss, norm = float(row["loss"]), float(row["grad_norm"])
        self._losses.update(loss)
        grad_spike = self._grads.update(norm)
        broken = bool(row.get("nonfinite", False)) or not (math.isfinite(loss) and math.isfinite(norm))
        if row.get("overflow", False):  # float16's loss scale at work: normal, counted apart
            kinds = []
        elif broken:
            kinds = ["nonfinite"]
        else:
            kinds = (["loss"] if row["loss_spike"] else []) + (["grad"] if grad_spike else [])
        if kinds:
            self.spikes.append(Spike(
                int(row["step"]), kinds, loss, self._losses.median, norm, self._grads.median, self._top(grad)))

    def _top(self, grad: np.ndarray) -> list[tuple[str, float, float]]:
        """The variables with the largest share of this step's norm² (non-finite ones first)."""
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            squared = grad**2
            total = float(np.sum(squared[np.isfinite(squared)]))
            share = np.where(np.isfinite(squared), squared / total if total > 0 else 0.0, np.inf)
            medians = np.median(np.stack(self._norms), axis=0) if self._norms else np.full_like(grad, np.nan)
            ratio = np.where(medians > 0, grad / medians, np.nan)
        order = np.argsort(-share, kind="stable")[:TOP]
        return [(self.variables[k], float(share[k]), float(ratio[k])) for k in order]

    def _heat_add(self, steps: list[int], grads: np.ndarray) -> None:
        """Each column holds the largest norm of ``heat_width`` consecutive steps (``grads``
        with non-finite norms as inf); at 2 × HEAT_COLUMNS columns neighbours merge."""
        at = 0
        while at < len(steps):
            if self._open is None:
                self._open = np.full(len(self.variables), np.nan)
                self._heat_steps.append(steps[at])
            take = min(self.heat_width - self._open_count, len(steps) - at)
            self._open = np.fmax(self._open, grads[at:at + take].max(axis=0))
            self._open_count += take
            at += take
            if self._open_count == self.heat_width:
                self._heat.append(self._open)
                self._open, self._open_count = None, 0
                if len(self._heat) == 2 * HEAT_COLUMNS:  # halve the resolution: merge neighbouring columns
                    self._heat = [np.fmax(a, b) for a, b in zip(self._heat[::2], self._heat[1::2])]
                    self._heat_steps = self._heat_steps[::2]
                    self.heat_width *= 2

    # -- results --------------------------------------------------------------------------------

    def heat(self) -> tuple[np.ndarray, list[int]]:
        """(V, columns) of each variable's largest grad norm per column of steps (inf: non-finite),
        and the first step of each column."""
        columns = self._heat + ([self._open] if self._open is not None else [])
        if not columns:
            return np.zeros((len(self.variables), 0)), []
        return np.stack(columns, axis=1), list(self._heat_steps)

    def update_ratios(self) -> np.ndarray:
        """Geometric mean of ‖Δw‖/‖w‖ per variable over the steps that updated it (NaN: never)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self._ratio_steps > 0, 10 ** (self._log_ratio / np.maximum(self._ratio_steps, 1)), np.nan)

    def mean_shares(self) -> np.ndarray:
        """Each variable's mean share of the global norm² over the finite steps."""
        return self._share / self._share_steps if self._share_steps else np.full(len(self.variables), np.nan)

    def kinds(self) -> np.ndarray:
        """Each variable's kind, an index into KINDS: started at zero, else matrix or vector."""
        zero = self._zero_start if self._zero_start is not None else np.zeros(len(self.variables), dtype=bool)
        matrix = np.array([len(s) >= 2 for s in self.shapes], dtype=bool)
        return np.where(zero, 0, np.where(matrix, 1, 2))

    def flagged(self) -> list[tuple[str, float, float, str]]:
        """Variables whose update/weight ratio is more than RATIO_FLAG × the median of their kind:
        (name, ratio, that median, the kind as KINDS names it)."""
        ratios, kinds = self.update_ratios(), self.kinds()
        out = []
        for index, name in enumerate(KINDS):
            kind = kinds == index
            values = ratios[kind & np.isfinite(ratios)]
            if values.size < 2:
                continue
            median = float(np.median(values))
            out += [(self.variables[k], float(ratios[k]), median, name) for k in np.flatnonzero(kind)
                    if math.isfinite(ratios[k]) and median > 0 and ratios[k] > RATIO_FLAG * median]
        return out

    def by_layer(self) -> list[dict]:
        """One dict per layer: its variables, mean share of norm², update ratio (that of its
        largest variable, e.g. the kernel), the heat map row (layer norm = √Σ its variables'
        norm²), ordered by share."""
        heat, _ = self.heat()
        shares, ratios = self.mean_shares(), self.update_ratios()
        out = {}
        for k, layer in enumerate(self.layers):
            entry = out.setdefault(layer, {"layer": layer, "variables": [], "share": 0.0, "ratio": float("nan"),
                                           "heat": np.zeros(heat.shape[1]), "size": -1})
            entry["variables"].append(self.variables[k])
            entry["share"] += float(shares[k]) if math.isfinite(shares[k]) else 0.0
            size = int(np.prod(self.shapes[k])) if self.shapes[k] else 1
            if size > entry["size"]:
                entry["size"], entry["ratio"] = size, float(ratios[k])
            entry["heat"] = entry["heat"] + heat[k] ** 2
        for entry in out.values():
            entry["heat"] = np.sqrt(entry["heat"])
        return sorted(out.values(), key=lambda e: -e["share"])


def read_layers(path, variants: dict, rule: SpikeRule | None = None) -> dict:
    """Rebuild each variant's LayerWatch from a --layers-csv file and the variants' rows
    (``{(clip, param): rows}`` as ``record.rows.split_variants`` gives). Streams the file: memory
    stays that of the LayerWatches, whatever the file's size."""
    import csv
    from pathlib import Path

    from ..errors import GradwatchError
    from ..record.rows import _parse

    path = Path(path)
    if not path.is_file():
        raise GradwatchError(f"no such file: {path}; give the CSV written by --layers-csv")
    watches: dict = {}
    keys = list(variants)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None) or []
            missing = [c for c in LAYER_COLUMNS if c not in header and c != "shape"]
            if missing:
                raise GradwatchError(f"{path} is not a --layers-csv file: missing columns {', '.join(missing)}")
            at = {c: header.index(c) for c in LAYER_COLUMNS if c in header}
            current, block = None, []  # rows of one (variant, step)

            def flush():
                if not block:
                    return
                (clip, param), step = current
                key = (clip, param) if (clip, param) in variants else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise GradwatchError(f"{path} holds variant {clip} {param}, which the run's CSV does not; "
                                         "give the --layers-csv written by the same command")
                rows = variants[key]
                if key not in watches:
                    shapes = [tuple(int(d) for d in r[3].split("x")) if r[3] else () for r in block]
                    watches[key] = (LayerWatch([r[0] for r in block], [r[1] for r in block], rule, shapes), {
                        int(row["step"]): row for row in rows})
                watch, by_step = watches[key]
                if step in by_step:
                    norms = np.array([[r[2][k] for r in block] for k in range(4)])
                    watch.update([by_step[step]], norms[None])

            for line_no, record in enumerate(reader, start=2):
                if not record:
                    continue
                try:
                    key = ((_parse("clip", record[at["clip"]]), _parse("param", record[at["param"]])), int(record[at["step"]]))
                    values = [float(record[at[c]]) for c in ("grad_norm", "clipped_norm", "weight_norm", "update_norm")]
                    entry = (record[at["variable"]], record[at["layer"]], values, record[at["shape"]] if "shape" in at else "")
                except (ValueError, IndexError) as exc:
                    raise GradwatchError(f"{path} line {line_no} is malformed ({exc})") from None
                if key != current:
                    flush()
                    current, block = key, []
                block.append(entry)
            flush()
    except UnicodeDecodeError:
        raise GradwatchError(f"{path} is not a text CSV; give the CSV written by --layers-csv") from None
    return {key: watch for key, (watch, _) in watches.items()}
