"""The spike rule on hand-made series, summaries against pandas, and the CSV writer's safety."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch.errors import GradwatchError
from gradwatch.diagnose.spikes import SpikeRule
from gradwatch.record.rows import COLUMNS, read_rows, summarize
from gradwatch.record.sinks import rows_to_csv


def _numpy_rule(values, rule):
    """The README's spike rule written out with NumPy over the whole series (the reference)."""
    finite = [v for v in values if math.isfinite(v)]
    out, seen = [], 0
    for v in values:
        if not math.isfinite(v):
            out.append(False)
            continue
        before = np.array(finite[max(0, seen - rule.window):seen])
        scale = max([abs(x) for x in finite[:seen]], default=0.0)
        spike = False
        if len(before) >= min(rule.min_history, rule.window):
            median = np.median(before)
            mad = np.median(np.abs(before - median))
            rise = v - median
            spike = bool(rise > max((rule.factor - 1) * abs(median), rule.noise * mad, rule.floor * scale,
                                    64 * 2.0**-23 * scale))
        out.append(spike)
        seen += 1
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.floats(-1e6, 1e6), st.sampled_from([math.nan, math.inf, 0.0, 1.0, 2.0])), max_size=80),
       st.integers(1, 25), st.integers(1, 6), st.sampled_from([1.5, 2.0, 4.0]), st.sampled_from([0.0, 0.01]))
def test_the_spike_rule_is_the_numpy_reference_of_the_readme(values, window, min_history, factor, floor):
    rule = SpikeRule(factor=factor, window=window, min_history=min_history, floor=floor)
    assert rule.mark(values) == _numpy_rule(values, rule)


def test_smooth_decreasing_loss_has_no_spike():
    losses = [10 * 0.97**k + 0.01 * math.sin(k) for k in range(200)]
    assert not any(SpikeRule().mark(losses))


def test_jump_above_twice_the_rolling_median_is_a_spike():
    losses = [5.0] * 10 + [10.5] + [5.0] * 5 + [9.0]
    marks = SpikeRule().mark(losses)
    assert [i for i, m in enumerate(marks) if m] == [10]  # 9.0 is below 2 x median 5


def test_a_nonfinite_loss_is_counted_once_as_nonfinite_not_as_a_spike():
    assert SpikeRule().mark([float("nan")]) == [False]
    assert SpikeRule().mark([1.0, 1.0, 1.0, float("inf"), 1.0, 3.0]) == [False] * 5 + [True]  # history skips it


def test_float32_noise_around_a_converged_loss_is_no_spike():
    rng = np.random.default_rng(1)
    converged = list(1.0 * 0.8 ** np.arange(60)) + list(np.abs(rng.normal(1e-7, 1e-7, 300)))
    assert not any(SpikeRule().mark(converged))
    # 0 -> 1e-9 after a loss that started at 1 is no spike; a rise of a fifth of the start is
    assert not any(SpikeRule().mark([1.0, 0.5, 0.1] + [0.0] * 20 + [1e-9]))
    assert SpikeRule().mark([1.0, 0.5, 0.1] + [0.0] * 20 + [0.2])[-1]
    # the floor is settable: at 0 a rise of 1e-4 is a spike, above float32's resolution of the loss's
    # scale (64 ulps of 1.0) but under the default floor (1 % of 1.0); 1e-9 stays below that resolution
    assert not SpikeRule().mark([1.0, 0.5, 0.1] + [0.0] * 20 + [1e-4])[-1]
    assert SpikeRule(floor=0.0).mark([1.0, 0.5, 0.1] + [0.0] * 20 + [1e-4])[-1]
    assert not SpikeRule(floor=0.0).mark([1.0, 0.5, 0.1] + [0.0] * 20 + [1e-9])[-1]


def test_a_noisy_negative_loss_is_no_spike_but_a_jump_out_of_its_noise_is():
    rng = np.random.default_rng(2)
    trend = np.linspace(0.02, -0.30, 200)  # cosine similarity falling smoothly through zero
    noisy = trend + rng.uniform(-0.1, 0.1, 200)
    frame = pd.Series(noisy)
    rise = frame - frame.rolling(20, min_periods=3).median().shift(1)
    assert rise.max() < 0.2  # no step more than 0.2 above its running median
    assert not any(SpikeRule().mark(noisy))
    jumped = noisy.copy()
    jumped[150] = 0.9  # from about -0.23 to 0.9: far outside the noise
    assert [k for k, m in enumerate(SpikeRule().mark(jumped)) if m] == [150]


def test_no_spike_before_enough_history():
    assert SpikeRule(min_history=3).mark([1.0, 100.0, 1.0]) == [False, False, False]


def test_factor_and_window_are_honoured():
    losses = [1.0] * 5 + [1.6]
    assert SpikeRule(factor=1.5).mark(losses)[-1]
    assert not SpikeRule(factor=2.0).mark(losses)[-1]
    # a window of 2 only remembers the last two losses (both 4.0), so 7.0 is no spike
    assert not SpikeRule(window=2).mark([1.0, 1.0, 1.0, 4.0, 4.0, 7.0])[-1]
    assert SpikeRule(window=20).mark([1.0, 1.0, 1.0, 4.0, 4.0, 7.0])[-1]


def test_negative_losses_use_the_median_magnitude():
    assert SpikeRule().mark([-10.0] * 5 + [-5.0]) == [False] * 6  # -5 > -10 but by less than |median|
    assert SpikeRule().mark([-10.0] * 5 + [1.0])[-1]


@pytest.mark.parametrize("factor,window", [(1.0, 20), (2.0, 0), (float("nan"), 5)])
def test_bad_rule_parameters(factor, window):
    with pytest.raises(GradwatchError):
        SpikeRule(factor=factor, window=window)


def make_rows(losses, norms, clipped_norm_cap=None):
    rows = []
    for i, (loss, norm) in enumerate(zip(losses, norms), start=1):
        clipped = clipped_norm_cap is not None and norm > clipped_norm_cap
        cn = clipped_norm_cap if clipped else norm
        rows.append({"step": i, "epoch": 1, "loss": loss, "grad_norm": norm, "grad_norm_rows": norm, "clipped_norm": cn,
                     "clip_ratio": cn / norm if norm else 1.0, "clipped": clipped, "lr": 0.1,
                     "nonfinite": not (math.isfinite(loss) and math.isfinite(norm)),
                     "threshold": float("nan"), "nonfinite_input": False, "loss_spike": False, "time_ms": 2.0,
                     "reg_loss": 0.0, "loss_scale": 1.0, "overflow": False})
    for row, spike in zip(rows, SpikeRule().mark(losses)):
        row["loss_spike"] = spike
    return rows


def test_summary_matches_pandas():
    rng = np.random.default_rng(0)
    losses = list(5 + rng.random(50))
    losses[20] = 30.0
    losses[30] = float("nan")
    norms = list(rng.lognormal(1, 1, 50))
    rows = make_rows(losses, norms, clipped_norm_cap=3.0)
    s = summarize(rows)
    frame = pd.DataFrame(rows)
    finite = frame[np.isfinite(frame["loss"])]
    assert s["steps"] == 50
    assert s["final_loss"] == pytest.approx(frame["loss"].tail(5).median())  # robust to one outlier batch
    assert s["best_loss"] == pytest.approx(finite["loss"].min())
    assert s["grad_norm_median"] == pytest.approx(frame["grad_norm"].median())
    assert s["grad_norm_p95"] == pytest.approx(frame["grad_norm"].quantile(0.95))
    assert s["grad_norm_max"] == pytest.approx(frame["grad_norm"].max())
    assert s["pct_clipped"] == pytest.approx(100 * frame["clipped"].mean())
    assert s["mean_clip_ratio"] == pytest.approx(frame["clip_ratio"].mean())
    assert s["nonfinite"] == 1
    assert s["loss_spikes"] == int(frame["loss_spike"].sum()) >= 1 and not frame["loss_spike"][30]
    assert s["nonfinite_steps"] == [31] and 31 not in s["spike_steps"]
    assert s["largest_jump"] == pytest.approx(frame["loss"].diff().max())
    assert s["largest_jump_step"] == 21
    assert s["grad_spikes"] == sum(SpikeRule().mark(norms))
    assert s["wall_s"] == pytest.approx(0.1)


def test_largest_jump_is_a_rise_across_nonfinite_gaps_or_absent():
    s = summarize(make_rows([5.0, 4.0, 3.0, 2.0], [1.0] * 4))
    assert math.isnan(s["largest_jump"]) and s["largest_jump_step"] is None  # the loss never rises
    s = summarize(make_rows([5.0, 4.0, float("nan"), float("nan"), 9.0, 8.0], [1.0] * 6))
    assert s["largest_jump"] == 5.0 and s["largest_jump_step"] == 5  # 4 -> (NaN, NaN) -> 9


def test_csv_round_trip_is_exact_and_escapes_formulas(tmp_path):
    rows = make_rows([0.1 + 0.2, 1e-30, -3.5], [1 / 3, 2.0, float("inf")])
    for row, clip in zip(rows, ["=cmd()", "+1", "@x"]):
        row["clip"], row["param"], row["threshold"] = clip, None, float("nan")
    text = rows_to_csv(rows, ["clip", "param"] + COLUMNS)
    assert "'=cmd()" in text and "'+1" in text and "'@x" in text
    assert ",-3.5," in text  # numbers are never escaped
    path = tmp_path / "rows.csv"
    path.write_text(text)
    back = read_rows(path)
    assert [r["loss"] for r in back] == [r["loss"] for r in rows]
    assert math.isinf(back[2]["grad_norm"])
    assert [r["clip"] for r in back] == ["=cmd()", "+1", "@x"]


def test_read_rows_names_missing_columns(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("step,loss\n1,2.0\n")
    with pytest.raises(GradwatchError, match="missing columns epoch, grad_norm"):
        read_rows(path)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(GradwatchError, match="empty"):
        read_rows(tmp_path / "empty.csv")
    (tmp_path / "bad.csv").write_text(",".join(COLUMNS) + "\n1,1,x,1,1,1,True,1,False,False,1\n")
    with pytest.raises(GradwatchError, match="line 2"):
        read_rows(tmp_path / "bad.csv")

    text = rows_to_csv(make_rows([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]), COLUMNS)
    cut = text[: text.rindex("\n", 0, len(text) - 1) + 12]  # the last row cut short, 11 characters in
    (tmp_path / "cut.csv").write_text(cut)
    with pytest.raises(GradwatchError, match=r"ends in a row cut short \(line 4: \d+ of \d+ fields\): the file was truncated"):
        read_rows(tmp_path / "cut.csv")
    (tmp_path / "cut.csv.partial").write_text(cut)  # a killed run's file: its last row is dropped
    assert [r["step"] for r in read_rows(tmp_path / "cut.csv.partial")] == [1, 2]


def test_row_store_reads_like_the_list_of_rows_it_was_given():
    """Runs keep rows column-wise; what comes back (and its summary) equals the rows put in."""
    from gradwatch.record.rows import RowStore, summarize

    rng = np.random.default_rng(1)
    rows = [{"step": i, "epoch": 1 + i // 7, "loss": float(rng.normal()), "reg_loss": 0.0, "grad_norm": float(abs(rng.normal())), "grad_norm_rows": 1.0,
             "clipped_norm": 0.5, "clip_ratio": float(rng.uniform()), "clipped": bool(i % 2), "threshold": 1.5, "lr": 0.1,
             "loss_scale": 1.0, "overflow": False,
             "nonfinite": i == 5, "nonfinite_input": False, "loss_spike": i in (3, 5), "time_ms": 1.25}
            for i in range(1, 30)]
    rows[4]["loss"] = float("nan")
    store = RowStore()
    store.extend(rows[:10])
    store.extend(rows[10:])
    assert len(store) == len(rows)
    assert all(type(store[i]["clipped"]) is bool and type(store[i]["step"]) is int for i in range(len(rows)))
    got = list(store)
    assert str(got) == str(rows)  # NaN != NaN, so compare the text
    assert store[-1] == rows[-1] and str(store[3:6]) == str(rows[3:6])
    assert str(summarize(store)) == str(summarize(rows))


def test_files_of_earlier_versions_and_the_description_columns(tmp_path):
    from gradwatch.record.rows import CSV_COLUMNS, META_COLUMNS, describe_meta, setup_text

    rows = make_rows([1.0, 2.0], [0.5, 0.25])
    old = tmp_path / "old.csv"  # a run CSV of 0.2: no variant, no description
    old.write_text(rows_to_csv(rows, COLUMNS))
    back = read_rows(old)
    assert [(r["clip"], r["param"]) for r in back] == [("run", None)] * 2
    assert all(r[c] == "" for r in back for c in META_COLUMNS)
    meta = {"model": "-models/=odd.keras", "data": "/d/train.npz", "optimizer": "Adam(learning_rate=0.001)",
            "loss_fn": "mean_squared_error (--loss)", "sparse_norm": "summed"}
    for row in rows:
        row.update(clip="global", param=5.0, threshold=5.0, **meta)
    new = tmp_path / "new.csv"
    new.write_text(rows_to_csv(rows, CSV_COLUMNS))
    back = read_rows(new)
    assert {c: back[1][c] for c in META_COLUMNS} == meta  # text that looks like a formula round-trips
    assert (back[0]["clip"], back[0]["param"]) == ("global", 5.0)
    assert describe_meta(meta) == "=odd.keras on train.npz"
    assert describe_meta({"model": "sample:ptb-small", "data": "sample:ptb-small/train.txt"}) == "sample ptb-small on train.txt"
    assert setup_text(meta) == "optimizer Adam(learning_rate=0.001); loss: mean_squared_error (--loss)"
    assert setup_text({}) == ""
