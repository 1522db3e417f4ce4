"""Per-step rows: their columns, summary statistics, the column store and reading CSVs back.

Nothing here imports TensorFlow: `gradwatch report` reads saved CSVs through this module.
"""

from __future__ import annotations

import csv
import math
import os
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import GradwatchError

# One row per training step; the same names are CLI options, CSV columns and attributes.
COLUMNS = [
    "step",          # 1-based step number within the run
    "epoch",         # 1-based epoch number
    "loss",          # loss of the batch, before the update (regularization included)
    "reg_loss",      # its regularization part: model.losses of a Keras model (NaN when unknown)
    "grad_norm",     # global L2 norm of the raw gradients (repeated embedding rows summed)
    "grad_norm_rows",  # the same norm measured row by row, as Keras' global_clipnorm measures an embedding's
    "clipped_norm",  # global L2 norm after clipping
    "clip_ratio",    # clipped_norm / grad_norm (1.0 when nothing changed or grad_norm is 0)
    "clipped",       # did the strategy change any gradient?
    "threshold",     # the threshold the strategy used this step (NaN for none; AGC: its factor)
    "lr",            # learning rate used for the step
    "loss_scale",    # dynamic loss scale of a float16 model (1 without loss scaling)
    "overflow",      # float16 gradients overflowed: the update was skipped and the scale halved
    "nonfinite",     # loss or a gradient not finite: the update was skipped
    "nonfinite_input",  # the batch held NaN/inf input values (trained on with --allow-nonfinite-data)
    "loss_spike",    # the spike rule fired (see SpikeRule)
    "time_ms",       # wall time of the step in milliseconds
]
# Every CSV starts with these two, so one long CSV holds every variant of a comparison and a run's
# CSV says what it ran: the strategy and its parameter (N, V, λ, p or Z; empty for the baseline).
VARIANT_COLUMNS = ["clip", "param"]
# ...and ends with these, the same on every row, so a file alone says what was trained on what:
META_COLUMNS = [
    "model",      # the model path as given, or sample:NAME
    "data",       # the data path as given (a sample's data file name)
    "optimizer",  # the optimizer and its settings, e.g. SGD(learning_rate=1)
    "loss_fn",    # where the loss came from, e.g. keras sparse_categorical_crossentropy
    "sparse_norm",  # what clipping measured an embedding's repeated rows by: summed or rows (--sparse-norm)
]
# The columns of `run --csv`, `compare --csv` and `--format csv/json`.
CSV_COLUMNS = VARIANT_COLUMNS + COLUMNS + META_COLUMNS
BOOL_COLUMNS = {"clipped", "overflow", "nonfinite", "nonfinite_input", "loss_spike"}
INT_COLUMNS = {"step", "epoch"}
def describe_meta(meta: dict) -> str:
    """'MODEL on DATA' from the META_COLUMNS (file names; a sample by its name)."""
    def name(text: str) -> str:
        if text.startswith("sample:"):
            return "sample " + text[len("sample:"):] if "/" not in text else Path(text).name
        return Path(text).name if text else "?"

    return f"{name(meta.get('model', ''))} on {name(meta.get('data', ''))}"


def setup_text(meta: dict) -> str:
    """'optimizer ...; loss: ...' from the META_COLUMNS ('' when the file predates them)."""
    parts = []
    if meta.get("optimizer"):
        parts.append(f"optimizer {meta['optimizer']}")
    if meta.get("loss_fn"):
        parts.append(f"loss: {meta['loss_fn']}")
    return "; ".join(parts)


# `compare --summary-csv`: one row per variant (then the META_COLUMNS).
SUMMARY_COLUMNS = [
    "clip", "param", "steps", "final_loss", "best_loss", "loss_spikes", "grad_spikes", "largest_jump", "nonfinite",
    "pct_clipped", "mean_clip_ratio", "grad_norm_median", "grad_norm_p95", "grad_norm_max", "wall_s",
]
SUMMARY_INT_COLUMNS = {"steps", "loss_spikes", "grad_spikes", "nonfinite"}
# Summary columns renamed since 0.2 (its name then -> today's), so older summary files read.
RENAMED_SUMMARY_COLUMNS = {"spikes": "loss_spikes"}
# Columns added after 0.1.0, with the value they take when reading an older CSV.
ADDED_COLUMNS = {"nonfinite_input": False, "threshold": float("nan"), "reg_loss": float("nan"),
                 "loss_scale": 1.0, "overflow": False, "grad_norm_rows": float("nan")}


def clip_ratio(grad_norm: float, clipped_norm: float) -> float:
    if grad_norm == 0.0:
        return 1.0
    return clipped_norm / grad_norm


# --- summary statistics ---------------------------------------------------------------------


def _finite(values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    return array[np.isfinite(array)]


def _stat(fn, values) -> float:
    finite = _finite(values)
    return float(fn(finite)) if finite.size else float("nan")


def _reg_share(loss, reg) -> float:
    """Median share of the regularization in the loss over finite steps (NaN when unknown)."""
    loss, reg = np.asarray(loss, np.float64), np.asarray(reg, np.float64)
    keep = np.isfinite(loss) & np.isfinite(reg) & (loss != 0)
    return float(np.median(reg[keep] / loss[keep])) if keep.any() else float("nan")


def _largest_jump(loss: np.ndarray, steps, among=None) -> tuple[float, int | None]:
    """The largest rise of the loss between consecutive finite losses (across any non-finite
    steps between them), and the later step; (NaN, None) when the loss never rises. With
    ``among`` (steps), only the rises onto those steps count (the loss spikes')."""
    at = np.flatnonzero(np.isfinite(loss))
    if at.size < 2:
        return float("nan"), None
    rises = np.diff(loss[at])
    if among is not None:
        wanted = set(among)
        rises = np.where([int(steps[k]) in wanted for k in at[1:]], rises, -np.inf)
    k = int(np.argmax(rises))
    if not rises[k] > 0:
        return float("nan"), None
    return float(rises[k]), int(steps[at[k + 1]])


def final_loss(loss) -> float:
    """The median finite loss over the last 10 % of steps (at least one): where the run ended,
    robust to one outlier batch landing in that stretch; NaN when none of them is finite."""
    loss = np.asarray(loss, dtype=np.float64)
    if not loss.size:
        return float("nan")
    tail = max(1, int(math.ceil(loss.size * 0.1)))
    return _stat(np.median, loss[-tail:])


def summarize(rows: list[dict], rule=None) -> dict:
    """Summary of one run's rows: what the tables and the findings are made of.

    Losses and norms are summarised over finite values; non-finite steps are counted apart,
    never also as spikes. ``final_loss``: see :func:`final_loss`. ``largest_jump``: see
    :func:`_largest_jump`; ``spike_rise`` is the same over the rises onto loss spikes. Loss
    spikes are the run's ``loss_spike`` column; gradient spikes the same rule (``rule``,
    default ``SpikeRule()``) on the global norm before clipping.
    """
    from ..diagnose.spikes import SpikeRule

    n = len(rows)
    col = {c: (rows.column(c) if isinstance(rows, RowStore) else [r.get(c, ADDED_COLUMNS.get(c)) for r in rows]) for c in COLUMNS}
    loss = np.array(col["loss"], dtype=np.float64)
    grad_norm = np.array(col["grad_norm"], dtype=np.float64)
    ratio = np.array(col["clip_ratio"], dtype=np.float64)
    jump, jump_step = _largest_jump(loss, col["step"])
    bad_input = [bool(v) for v in col["nonfinite_input"]]
    loss_spike = [bool(v) and math.isfinite(x) for v, x in zip(col["loss_spike"], loss)]  # files of 0.2 marked NaN too
    rule = rule or SpikeRule()
    grad_spike = rule.mark(grad_norm)
    overflow = [bool(v) for v in col["overflow"]]
    grad_spike = [g and not o for g, o in zip(grad_spike, overflow)]
    clean = [int(step) for step, spike, bad in zip(col["step"], loss_spike, bad_input) if spike and not bad]
    spike_rise, spike_rise_step = _largest_jump(loss, col["step"], among=clean)  # (NaN, None) without spikes
    return {
        "steps": n,
        "loss_first": float(loss[0]) if n else float("nan"),
        "loss_last": float(loss[-1]) if n else float("nan"),
        "final_loss": final_loss(loss),
        "best_loss": _stat(np.min, loss),
        "largest_jump": jump,
        "largest_jump_step": jump_step,
        "loss_spikes": sum(loss_spike),
        # finite losses the spike rule could judge: each needs min_history finite ones before it
        "judged_losses": max(0, int(np.isfinite(loss).sum()) - rule.history_needed),
        "spike_history": rule.history_needed,
        "spike_steps": [int(step) for step, spike in zip(col["step"], loss_spike) if spike],
        "spike_steps_clean": clean,
        # the largest rise onto one of those spikes (the run's largest rise may be at no spike)
        "spike_rise": spike_rise,
        "spike_rise_step": spike_rise_step,
        "grad_spikes": sum(grad_spike),
        "grad_spike_steps": [int(step) for step, spike in zip(col["step"], grad_spike) if spike],
        "nonfinite": int(sum(bool(v) for v in col["nonfinite"])),
        "nonfinite_steps": [int(step) for step, v in zip(col["step"], col["nonfinite"]) if v],
        "overflow": sum(overflow),
        "reg_share": _reg_share(col["loss"], col["reg_loss"]),
        # steps whose batch held non-finite input data, and the non-finite / spike steps among them
        "bad_input_steps": sum(bad_input),
        "nonfinite_from_data": int(sum(bool(a) and b for a, b in zip(col["nonfinite"], bad_input))),
        "spikes_from_data": int(sum(a and b for a, b in zip(loss_spike, bad_input))),
        "pct_clipped": 100.0 * sum(bool(v) for v in col["clipped"]) / n if n else float("nan"),
        "mean_clip_ratio": _stat(np.mean, ratio),
        "grad_norm_median": _stat(np.median, grad_norm),
        "grad_norm_p95": _stat(lambda a: np.percentile(a, 95), grad_norm),
        "grad_norm_max": _stat(np.max, grad_norm),
        "wall_s": float(sum(col["time_ms"])) / 1000.0,
    }


# --- keeping rows in memory -------------------------------------------------------------------

_KINDS = {**{c: "q" for c in INT_COLUMNS}, **{c: "b" for c in BOOL_COLUMNS}}  # others: "d"


class RowStore(Sequence):
    """The rows of a run, kept as one typed array per column: ~67 bytes a step instead of a dict's ~1 KB.

    It reads like a list of row dicts (``len``, indexing, slicing, iteration), so summaries and
    reports need not know; a long run's memory stays near what the model itself needs.
    """

    def __init__(self, rows=()):
        self._columns = {c: array(_KINDS.get(c, "d")) for c in COLUMNS}
        self.extend(rows)

    def extend(self, rows) -> None:
        for row in rows:
            self.append(row)

    def append(self, row: dict) -> None:
        for column, values in self._columns.items():
            values.append(row[column] if column in row else ADDED_COLUMNS[column])

    def __len__(self) -> int:
        return len(self._columns["step"])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = {c: values[index] for c, values in self._columns.items()}
        for column, kind in _KINDS.items():
            if kind == "b":
                row[column] = bool(row[column])
        return row

    def column(self, name: str) -> list:
        """One column's values (cheaper than going through the rows)."""
        values = self._columns[name]
        return [bool(v) for v in values] if _KINDS.get(name) == "b" else values.tolist()


# --- reading rows back (for `gradwatch report`) --------------------------------------------


def _parse(column: str, text: str):
    if column in BOOL_COLUMNS:
        if text not in ("True", "False"):
            raise ValueError(f"{column} must be True or False, got {text!r}")
        return text == "True"
    if column in INT_COLUMNS:
        return int(text)
    if column == "clip" or column in META_COLUMNS:
        return text[1:] if text.startswith("'") else text
    if column == "param":
        return float(text) if text else None
    if column == "threshold" and text == "":
        return float("nan")
    return float(text)


def _header(path: Path) -> list[str] | None:
    if path.is_dir():
        raise GradwatchError(f"{path} is a folder; give the path of a CSV written by gradwatch run/compare --csv")
    if not path.is_file():
        raise GradwatchError(f"no such file: {path}; give the path of a CSV written by gradwatch run/compare --csv")
    not_text = GradwatchError(f"{path} is not a text CSV; give a file written by gradwatch run/compare --csv")
    try:
        with path.open("rb") as handle:
            if b"\0" in handle.read(1 << 16):  # binary: say so at once, whatever its size
                raise not_text
        with path.open(newline="", encoding="utf-8") as handle:
            return next(csv.reader(handle), None)
    except (UnicodeDecodeError, csv.Error):
        raise not_text from None


def is_summary_csv(path: str | os.PathLike) -> bool:
    """Is this the one-row-per-variant file of `compare --summary-csv` (rather than per-step rows)?"""
    header = [RENAMED_SUMMARY_COLUMNS.get(c, c) for c in _header(Path(path)) or []]
    return "step" not in header and all(c in header for c in SUMMARY_COLUMNS if c != "grad_spikes")


def read_summary(path: str | os.PathLike) -> list[dict]:
    """Read a `compare --summary-csv` file back: one dict per variant."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        records = [{RENAMED_SUMMARY_COLUMNS.get(k, k): v for k, v in r.items()} for r in csv.DictReader(handle)]
    rows = []
    for line_no, record in enumerate(records, start=2):
        try:
            row = {}
            for column in SUMMARY_COLUMNS + META_COLUMNS:
                text = record.get(column) or ""
                if column == "grad_spikes" and not text:  # a summary file of 0.2
                    row[column] = None
                elif column in SUMMARY_INT_COLUMNS:
                    row[column] = int(text)
                elif column in ("clip", "param") or column in META_COLUMNS:
                    row[column] = _parse(column, text)
                else:
                    row[column] = float(text)
        except (ValueError, TypeError) as exc:
            raise GradwatchError(f"{path} line {line_no} is malformed ({exc}); re-run gradwatch compare to write it again") from None
        rows.append(row)
    if not rows:
        raise GradwatchError(f"{path} has a header but no rows; the comparison recorded no variant")
    return rows


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Read a `run` or `compare` CSV back into rows. A run CSV of gradwatch 0.1/0.2 (no variant
    columns) gets clip='run', param=None; files without the META_COLUMNS get them empty.

    A ``.partial`` file (what a killed run leaves) may end in a row cut short: it is dropped.
    A compare CSV of gradwatch 0.1.0 (variant columns ``clip, threshold``, the threshold as
    text) reads as today's: its threshold becomes ``param`` and every step's ``threshold``.
    """
    path = Path(path)
    unfinished = path.name.endswith(".partial")
    _header(path)  # a missing or binary file says so
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise GradwatchError(f"{path} is empty; give a CSV written by gradwatch run/compare --csv")
            missing = [c for c in COLUMNS if c not in header and c not in ADDED_COLUMNS]
            if missing:
                raise GradwatchError(
                    f"{path} is not a gradwatch CSV: missing columns {', '.join(missing)}; "
                    "give a file written by gradwatch run/compare --csv"
                )
            legacy = "clip" in header and "param" not in header and "threshold" in header
            index = {c: header.index(c) for c in CSV_COLUMNS if c in header}
            if legacy:
                index["param"] = index.pop("threshold")
            records = [(n, r) for n, r in enumerate(reader, start=2) if r]
            rows = []
            for k, (line_no, record) in enumerate(records):
                try:
                    if legacy:
                        text = record[index["param"]]
                        record = list(record)
                        record[index["param"]] = "" if text in ("none", "'none") else text
                    row = {c: _parse(c, record[i]) for c, i in index.items()}
                except (ValueError, IndexError) as exc:
                    last = k == len(records) - 1
                    if unfinished and last:
                        break  # the row being written when the run was killed
                    if last and len(record) < len(header):  # a copy of a file cut short, mid-row
                        raise GradwatchError(
                            f"{path} ends in a row cut short (line {line_no}: {len(record)} of {len(header)} fields): "
                            "the file was truncated; copy or write it again") from None
                    what = f"{len(record)} of {len(header)} fields" if isinstance(exc, IndexError) else str(exc)
                    raise GradwatchError(f"{path} line {line_no} is malformed ({what}); re-run gradwatch to write it again") from None
                row.setdefault("clip", "run")
                row.setdefault("param", None)
                for column in META_COLUMNS:
                    row.setdefault(column, "")
                for column, default in ADDED_COLUMNS.items():
                    row.setdefault(column, default)
                if legacy and row["param"] is not None:
                    row["threshold"] = row["param"]
                rows.append(row)
    except (UnicodeDecodeError, csv.Error):
        raise GradwatchError(f"{path} is not a text CSV; give a file written by gradwatch run/compare --csv") from None
    if not rows:
        raise GradwatchError(f"{path} has a header but no rows; the run recorded no steps")
    return rows


def split_variants(rows: list[dict]) -> dict[tuple[str, float | None], list[dict]]:
    """Group long-format rows by (clip, param), keeping the order of first appearance."""
    groups: dict[tuple[str, float | None], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["clip"], row["param"]), []).append(row)
    return groups


def run_line_from_meta(meta: dict) -> list[str]:
    """``gradwatch run`` of what a CSV row says it trained (record.rows.META_COLUMNS)."""
    parts = ["gradwatch", "run"]
    if meta.get("model", "").startswith("sample:"):
        parts += ["--sample", meta["model"][len("sample:"):]]
    elif meta.get("model"):
        parts += [meta["model"], "--data", meta["data"]]
    else:
        parts += ["MODEL", "--data", "DATA"]
    if meta.get("sparse_norm") == "rows":
        parts += ["--sparse-norm", "rows"]
    return parts
