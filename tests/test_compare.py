"""`gradwatch compare` and `gradwatch report`: same footing for every variant, summaries, verdicts, plots."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest

from conftest import interrupt_gradwatch, read_csv
from gradwatch.diagnose.spikes import SpikeRule
from gradwatch.diagnose.verdict import findings_of
from gradwatch.report.tables import Variant

BASE = ["--loss", "mse", "--batch-size", "16", "--steps", "10", "--lr", "0.3", "-q"]


@pytest.mark.parametrize("order", [["--no-shuffle"], ["--shuffle", "--seed", "3"]])
def test_each_variant_equals_its_solo_run(cli, keras_export_model, regression_npz, tmp_path, order):
    long_csv = tmp_path / "long.csv"
    code, out, err = cli("compare", keras_export_model, "--data", regression_npz, *BASE, *order,
                         "--clip", "global,value", "--thresholds", "0.5,2", "--csv", long_csv)
    assert code == 0, err
    long = read_csv(long_csv)
    long["label"] = long["param"].map(lambda v: "none" if pd.isna(v) else f"{v:g}")
    variants = list(dict.fromkeys(zip(long["clip"], long["label"])))
    assert variants == [("none", "none"), ("global", "0.5"), ("global", "2"), ("value", "0.5"), ("value", "2")]
    for clip, threshold in variants:
        solo_csv = tmp_path / f"solo-{clip}-{threshold}.csv"
        extra = [] if clip == "none" else ["--clip", clip, "--norm" if clip == "global" else "--value", threshold]
        code, _, err = cli("run", keras_export_model, "--data", regression_npz, *BASE, *order, *extra, "--csv", solo_csv)
        assert code == 0, err
        solo = read_csv(solo_csv).drop(columns=["time_ms"])
        part = long[(long["clip"] == clip) & (long["label"] == threshold)]
        part = part.drop(columns=["label", "time_ms"]).reset_index(drop=True)  # a run's CSV is its variant's rows
        pd.testing.assert_frame_equal(part, solo)


def test_summary_csv_matches_pandas_recomputation(cli, keras_export_model, regression_npz, tmp_path):
    long_csv, summary_csv = tmp_path / "long.csv", tmp_path / "summary.csv"
    code, out, err = cli("compare", keras_export_model, "--data", regression_npz, *BASE,
                         "--thresholds", "none,0.1,1", "--csv", long_csv, "--summary-csv", summary_csv)
    assert code == 0, err
    long, summary = read_csv(long_csv), read_csv(summary_csv)
    assert len(summary) == 3
    for (clip, param), part in long.groupby(["clip", "param"], sort=False, dropna=False):
        row = summary[(summary["clip"] == clip) & ((summary["param"] == param) | (summary["param"].isna() & pd.isna(param)))].iloc[0]
        tail = max(1, math.ceil(len(part) * 0.1))
        assert row["steps"] == len(part)
        assert row["final_loss"] == pytest.approx(part["loss"].tail(tail).median())
        assert row["best_loss"] == pytest.approx(part["loss"].min())
        assert row["loss_spikes"] == part["loss_spike"].sum()
        assert row["grad_spikes"] == sum(SpikeRule().mark(part["grad_norm"]))
        rise = part["loss"].diff().max()
        assert row["largest_jump"] == pytest.approx(rise) if rise > 0 else math.isnan(row["largest_jump"])
        assert row["nonfinite"] == part["nonfinite"].sum()
        assert row["pct_clipped"] == pytest.approx(100 * part["clipped"].mean())
        assert row["mean_clip_ratio"] == pytest.approx(part["clip_ratio"].mean())
        assert row["grad_norm_median"] == pytest.approx(part["grad_norm"].median())
        assert row["grad_norm_p95"] == pytest.approx(part["grad_norm"].quantile(0.95))
        assert row["grad_norm_max"] == pytest.approx(part["grad_norm"].max())
        assert row["wall_s"] == pytest.approx(part["time_ms"].sum() / 1000)
    # the spike column follows the documented rule
    for _, part in long.groupby(["clip", "param"], dropna=False):
        assert list(part["loss_spike"]) == SpikeRule().mark(part["loss"])


def test_report_reproduces_the_live_summary_and_plots(cli, keras_export_model, regression_npz, tmp_path):
    long_csv = tmp_path / "long.csv"
    code, live, err = cli("compare", keras_export_model, "--data", regression_npz, *BASE,
                          "--thresholds", "none,0.5", "--csv", long_csv, "--no-per-variable")
    assert code == 0, err
    assert "what drove them" not in live  # the per-variable section needs --layers in report
    png = tmp_path / "plot.png"
    code, again, err = cli("report", long_csv, "--plot", png)
    assert code == 0, err
    # report's first line is the optimizer and loss (compare said them on stderr); then the
    # table's title, which names the source
    assert again.splitlines()[0] == "optimizer SGD(learning_rate=0.3); loss: mean_squared_error (--loss)"
    assert again.splitlines()[2:] == live.splitlines()[1:]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1000, 900)


def test_report_of_a_run_csv_says_what_was_run(cli, module_model, regression_npz, tmp_path):
    csv = tmp_path / "run.csv"
    code, live, _ = cli("run", module_model, "--data", regression_npz, *BASE, "--clip", "global", "--norm", "0.5", "--csv", csv)
    code, again, err = cli("report", csv)
    assert code == 0, err
    # the same findings; only no_baseline's compare command differs: live, it has the user's own
    # options (--loss, --batch-size, --lr), the CSV alone knows the model and the data
    same = lambda text: [line for line in verdict_block(text) if "[no_baseline]" not in line]  # noqa: E731
    assert same(live) == same(again) and len(same(live)) >= 2
    hint = lambda text: next(line for line in verdict_block(text) if "[no_baseline]" in line)  # noqa: E731
    assert "--loss mse --batch-size 16 --lr 0.3 --clip global --thresholds none,0.5" in hint(live)
    assert "--clip global --thresholds none,0.5" in hint(again)
    title, setup = again.splitlines()[:2]
    assert title == f"gradwatch report: run.csv: {module_model.name} on {regression_npz.name}, clip global 0.5"
    assert setup == "optimizer SGD(learning_rate=0.3); loss: mean_squared_error (--loss)"
    rows = read_csv(csv)
    assert set(rows["clip"]) == {"global"} and set(rows["param"]) == {0.5} and set(rows["threshold"]) == {0.5}
    assert set(rows["model"]) == {str(module_model)} and set(rows["data"]) == {str(regression_npz)}
    assert set(rows["loss_fn"]) == {"mean_squared_error (--loss)"}  # plain text: no spreadsheet quote


def test_report_reads_the_summary_csv_back(cli, keras_export_model, regression_npz, tmp_path):
    long_csv, summary_csv = tmp_path / "long.csv", tmp_path / "summary.csv"
    code, live, err = cli("compare", keras_export_model, "--data", regression_npz, *BASE,
                          "--thresholds", "none,0.5", "--csv", long_csv, "--summary-csv", summary_csv, "--no-per-variable")
    assert code == 0, err
    code, again, err = cli("report", summary_csv)
    assert code == 0, err
    assert "summary of a comparison" in again and "per-step CSV that compare --csv writes" in again
    summary = read_csv(summary_csv)
    for cell in ("none", "global 0.5", f"{summary['final_loss'][1]:.4g}", f"{summary['grad_norm_max'][0]:.4g}"):
        assert cell in again, cell
    # the same numbers as the live table, the sparkline aside
    live_rows = [line.rsplit("│", 2)[0] for line in live.splitlines() if line.startswith("│")]
    again_rows = [line.rsplit("│", 1)[0] for line in again.splitlines() if line.startswith("│")]
    assert live_rows == again_rows
    code, _, err = cli("report", summary_csv, "--plot", tmp_path / "x.png")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--plot needs the per-step CSV" in err
    assert not (tmp_path / "x.png").exists()


def test_report_rejects_bad_csvs(cli, tmp_path):
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    for args, expected in [
        (["report", tmp_path / "other.csv"], "missing columns step, epoch, loss"),
        (["report", tmp_path / "none.csv"], "no such file"),
        (["report", tmp_path], "is a folder"),
        (["report", tmp_path / "other.csv", "--plot", tmp_path / "x.jpg"], "png, svg, pdf"),
    ]:
        code, _, err = cli(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


def verdict_block(text: str) -> list[str]:
    """The "Verdict:" line and the finding lines under it."""
    lines = text.splitlines()
    start = lines.index("Verdict:")
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        block.append(line)
    return block


def _one(found, code, variant=None):
    hits = [f for f in found if f.code == code and (variant is None or f.variant == variant)]
    assert len(hits) == 1, [(f.code, f.variant) for f in found]
    return hits[0]


def _variant(clip, param, losses):
    spikes = SpikeRule().mark(losses)
    rows = [{"step": i + 1, "epoch": 1, "loss": v, "grad_norm": 1.0, "clipped_norm": 1.0, "clip_ratio": 1.0,
             "clipped": clip != "none", "lr": 1.0, "nonfinite": not math.isfinite(v), "loss_spike": s, "time_ms": 1.0}
            for i, (v, s) in enumerate(zip(losses, spikes))]
    return Variant(clip, None if param == "none" else float(param), rows)


def test_verdict_names_the_jumping_baseline_and_the_calm_variant():
    smooth = [5 * 0.98**k for k in range(60)]
    jumping = list(smooth)
    jumping[20], jumping[40] = 50.0, float("nan")
    slower = [5 * 0.99**k for k in range(60)]
    found = findings_of([_variant("none", "none", jumping), _variant("global", "1", slower),
                         _variant("global", "5", smooth)])
    # each step counted once: step 21 a loss spike, step 41 non-finite (not also a spike)
    assert _one(found, "loss_spikes", "none").steps == (21,)
    assert _one(found, "nonfinite", "none").steps == (41,)
    # one spike: its step and its rise from the step before (50 - 5 * 0.98**19 = 46.594)
    assert _one(found, "loss_spikes", "none").message == "loss is jumping: 1 loss spike, at step 21, a rise of +46.59"
    best = _one(found, "recommended")
    assert best.variant == "global 5" and "global 5 calms the loss" in best.message
    assert {f.code for f in found if f.variant == "global 5"} >= {"stable", "clip_always_binds"}


def test_one_spike_at_the_same_step_in_every_variant_is_written_in_the_singular():
    smooth = [5 * 0.98**k for k in range(60)]
    spiked = list(smooth)
    spiked[20] = 50.0  # step 21, in both variants: the data's doing, not the clipping's
    found = findings_of([_variant("none", "none", spiked), _variant("global", "5", spiked)])
    common = [f for f in found if f.code == "spikes_from_data" and f.variant == ""]
    assert len(common) == 1 and common[0].steps == (21,)
    assert common[0].message.startswith("1 loss spike comes at the same step in every variant, clipped or not (step 21): ")
    assert _one(found, "no_variant_calm").message.endswith(
        "; 1 loss spike comes at the same step in all of them (spikes_from_data)")


def test_verdict_says_when_clipping_only_slows_progress():
    fast = [5 * 0.95**k for k in range(60)]
    slow = [5 * 0.99**k for k in range(60)]
    found = findings_of([_variant("none", "none", fast), _variant("global", "1", slow)])
    assert _one(found, "stable", "none")
    slows = _one(found, "clipping_slows")
    assert "clipping slows progress" in slows.message and "global 1" in slows.message
    assert not [f for f in found if f.code == "recommended"]


def test_verdict_never_recommends_a_run_that_ends_worse():
    base = [0.5 * 0.97**k for k in range(60)]
    jumpy = list(base)
    jumpy[20], jumpy[35] = 2.0, 2.5  # spikes, but it ends low
    worse = [0.6 * 0.995**k for k in range(60)]  # calm, but ends higher than unclipped
    found = findings_of([_variant("none", "none", jumpy), _variant("norm", "0.5", worse)])
    assert "ends worse" in _one(found, "no_clear_winner").message
    assert not [f for f in found if f.code == "recommended"]


def test_verdict_does_not_call_a_variant_with_spikes_calm():
    diverging = [1.0] * 10 + [float("nan")] * 50
    spiky = [1.0 * 0.99**k for k in range(60)]
    for k in range(5, 60, 7):
        spiky[k] = 5.0
    found = findings_of([_variant("none", "none", diverging), _variant("global", "1", spiky)])
    assert "no finite loss in the last 10 % of steps, from step 11" in _one(found, "diverged", "none").message
    best = _one(found, "recommended")
    assert "global 1 jumps less" in best.message and "calms" not in best.message
    assert _one(found, "no_variant_calm")  # neither is calm: the comparison says so


def test_verdict_picks_nothing_on_a_tiny_difference():
    a = [0.5 + 0.1 * 0.9**k for k in range(60)]
    b = [x - 0.001 for x in a]  # 0.2 % lower: within the 1 % margin
    found = findings_of([_variant("none", "none", a), _variant("global", "5", b)])
    assert "no variant is clearly better than unclipped" in _one(found, "no_clear_winner").message
    c = [x * 0.9 for x in a]  # 10 % lower: clearly better
    found = findings_of([_variant("none", "none", a), _variant("global", "5", c)])
    assert "recommended: global 5 ends lower, as stable" in _one(found, "recommended").message


def test_ctrl_c_during_compare_keeps_rows_of_every_variant(keras_export_model, regression_npz, tmp_path):
    csv = tmp_path / "long.csv"
    def when_the_second_variant_has_rows(proc):
        assert proc.stderr.readline().startswith("gradwatch: comparing")
        deadline = time.time() + 120
        # wait until the second variant has rows on disk (in the .partial file)
        while time.time() < deadline:
            partial = list(tmp_path.glob("long.csv.partial"))
            if partial and ",global,1.0," in "," + partial[0].read_text().replace("\n", ",") + ",":
                break
            time.sleep(0.2)

    # One step per block: the variants left after the second one starts take seconds, not a
    # fraction of one, so the signal always lands while the comparison runs.
    code, err = interrupt_gradwatch(["compare", keras_export_model, "--data", regression_npz, "--loss", "mse",
                                     "--batch-size", 4, "--steps", 600, "--fetch-every", 1,
                                     "--thresholds", "none,1,2,3,4,5", "--csv", csv],
                                    when_the_second_variant_has_rows)
    assert code == 130, err
    assert "Traceback" not in err
    rows = read_csv(csv)
    assert (rows["clip"] == "none").sum() == 600
    assert (rows["clip"] == "global").sum() >= 1


def test_on_nonfinite_stop_ends_only_the_diverging_variant(cli, module_model, data_dir, tmp_path):
    rng = np.random.default_rng(9)
    x = (3 * rng.normal(size=(256, 4))).astype(np.float32)
    y = x.sum(axis=1, keepdims=True).astype(np.float32)
    path = data_dir / "diverges.npz"
    np.savez(path, x=x, y=y)
    long_csv = tmp_path / "long.csv"
    code, out, err = cli("compare", module_model, "--data", path, "--loss", "mse", "--batch-size", 8, "--steps", 300,
                         "--no-shuffle", "--lr", 0.5, "--variants", "none,global:0.1", "--on-nonfinite", "stop",
                         "--csv", long_csv, "-q")
    assert code == 0, err
    long = read_csv(long_csv)
    baseline, clipped = long[long["clip"] == "none"], long[long["clip"] == "global"]
    assert len(baseline) < 300 and baseline["nonfinite"].iloc[-1] and not baseline["nonfinite"].iloc[:-1].any()
    assert len(clipped) == 300 and not clipped["nonfinite"].any()
    assert f"variant none stopped at step {len(baseline)}" in err
    assert "none (stopped: non-finite)" in out


def test_progress_covers_the_whole_comparison(cli, module_model, regression_npz, monkeypatch):
    """One bar for all variants: done only grows, ends at K x steps, and says which variant runs."""
    from gradwatch import cli as cli_module

    seen = []
    monkeypatch.setattr(cli_module.Progress, "update", lambda self, done, total, label=None: seen.append((done, total, label)))
    code, _, err = cli("compare", module_model, "--data", regression_npz, "--loss", "mse", "--batch-size", 4,
                       "--steps", 30, "--fetch-every", 5, "--variants", "none,global:1,value:0.5", "-q")
    assert code == 0, err
    dones = [d for d, _, _ in seen]
    assert dones == sorted(dones) and dones[-1] == 90 and {t for _, t, _ in seen} == {90}
    assert seen[0][2] == "variant 1/3: clip none" and seen[-1][2] == "variant 3/3: clip value 0.5"


def test_plots_from_run_and_compare_in_svg_and_pdf(cli, module_model, data_dir, tmp_path):
    rng = np.random.default_rng(9)
    x = (3 * rng.normal(size=(256, 4))).astype(np.float32)
    path = data_dir / "diverges_plot.npz"
    np.savez(path, x=x, y=x.sum(axis=1, keepdims=True).astype(np.float32))
    base = ["--data", path, "--loss", "mse", "--batch-size", 8, "--steps", 200, "--no-shuffle", "--lr", 0.5, "-q"]
    svg, pdf = tmp_path / "compare.svg", tmp_path / "run.pdf"
    code, _, err = cli("compare", module_model, *base, "--variants", "none,global:0.1", "--plot", svg)
    assert code == 0, err
    text = svg.read_text()
    assert "gradwatch compare: module on diverges_plot.npz" in text and "SGD(learning_rate=0.5)" in text
    assert "axis cut at" in text  # the diverging baseline does not flatten the clipped curve
    code, _, err = cli("run", module_model, *base, "--clip", "global", "--norm", 0.1, "--plot", pdf)
    assert code == 0, err
    assert pdf.read_bytes()[:5] == b"%PDF-"
    with_layers, without = tmp_path / "layers.svg", tmp_path / "plain.svg"
    for path, flag in ((with_layers, "--per-variable"), (without, "--no-per-variable")):
        code, _, err = cli("run", module_model, *base, "--clip", "global", "--norm", 0.1, flag, "--plot", path)
        assert code == 0, err
    assert "gradient norm per layer, global 0.1" in with_layers.read_text()  # the heat map, as report --layers --plot
    assert "gradient norm per layer" not in without.read_text()
    with_layers.unlink(), without.unlink()
    code, _, err = cli("run", module_model, *base, "--plot", tmp_path / "x.jpg")
    assert code == 2 and "png, svg, pdf" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.svg", "run.pdf"]


@pytest.mark.parametrize("width", [60, 80, 120, 160])
def test_tables_never_cut_a_number(width):
    import io

    from rich.console import Console

    from gradwatch.report.tables import compare_cells, print_compare

    rng = np.random.default_rng(3)
    variants = [_variant("none", "none", list(5.925e35 * rng.uniform(0.5, 2, size=60)))]
    for clip, param in [("global", "0.25"), ("norm", "1"), ("value", "0.001"), ("autoclip", "10"), ("zclip", "2.5")]:
        variants.append(_variant(clip, param, list(123.456789 * rng.uniform(0.9, 1.1, size=60))))
    out = io.StringIO()
    print_compare(Console(file=out, width=width, highlight=False), variants, "gradwatch compare: a title")
    text = out.getvalue()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width
    for v in variants:
        for cell in compare_cells(v):
            assert cell in text, (width, cell)


def test_piped_report_takes_the_width_its_content_needs(cli, keras_export_model, regression_npz, tmp_path, monkeypatch):
    long_csv = tmp_path / "long.csv"
    code, _, err = cli("compare", keras_export_model, "--data", regression_npz, *BASE,
                       "--variants", "none,global:0.5,norm:0.5,value:0.1,autoclip:50,zclip:2", "--csv", long_csv)
    assert code == 0, err
    monkeypatch.delenv("COLUMNS", raising=False)
    code, piped, _ = cli("report", long_csv)
    assert "…" not in piped
    verdict = [line.strip() for line in piped.splitlines() if line.strip().startswith("Unclipped:")]
    assert verdict and verdict[0].endswith("]")  # the sentence is whole on its line, its code at the end
    monkeypatch.setenv("COLUMNS", "80")
    code, narrow, _ = cli("report", long_csv)
    assert "…" not in narrow and max(len(line) for line in narrow.splitlines()) <= 80


def test_a_gradient_spike_is_reported_at_the_norm_it_jumped_to_not_at_the_runs_maximum():
    """Step 1 has the run's largest norm (50) but no history, so it is no spike; the spikes are
    steps 6 (4.0) and 9 (3.0), each more than twice the median of the steps before it. The
    sentence names the highest spike (4), not 50, and the run's median (1.025 by NumPy)."""
    norms = [50.0, 1.0, 1.1, 0.9, 1.0, 4.0, 1.0, 1.05, 3.0, 1.0]
    rows = [{"step": i + 1, "epoch": 1, "loss": 1.0, "grad_norm": g, "clipped_norm": g, "clip_ratio": 1.0,
             "clipped": False, "lr": 1.0, "nonfinite": False, "loss_spike": False, "time_ms": 1.0}
            for i, g in enumerate(norms)]
    (found,) = [f for f in findings_of([Variant("none", None, rows)]) if f.code == "gradient_spikes"]
    assert found.steps == (6, 9)
    assert found.message == ("2 gradient spikes: the global norm before clipping jumped (first at step 6), "
                             "to at most 4 against the run's median of 1.025")
    assert found.numbers["spike_grad_norm_max"] == 4.0 and found.numbers["grad_norm_max"] == 50.0
    assert found.numbers["grad_norm_median"] == pytest.approx(float(np.median(norms)))


def test_the_loss_spike_sentence_names_the_largest_rise_among_the_spikes_not_the_runs():
    """Step 2 has the run's largest rise (+8) but too little history to be a spike; the spikes
    are steps 7 (3.0 after 1.0: +2) and 10 (2.5 after 1.05: +1.45), each more than twice the
    median before it. The sentence names +2 at step 7; the run's +8 stays in the numbers."""

    losses = [1.0, 9.0, 1.0, 1.1, 0.9, 1.0, 3.0, 1.0, 1.05, 2.5, 1.0]
    rows = [{"step": i + 1, "epoch": 1, "loss": x, "grad_norm": 1.0, "clipped_norm": 1.0, "clip_ratio": 1.0,
             "clipped": False, "lr": 1.0, "nonfinite": False, "loss_spike": spike, "time_ms": 1.0}
            for i, (x, spike) in enumerate(zip(losses, SpikeRule().mark(losses)))]
    (found,) = [f for f in findings_of([Variant("none", None, rows)]) if f.code == "loss_spikes"]
    assert found.steps == (7, 10)
    assert found.message == "loss is jumping: 2 loss spikes (first at step 7); the largest rise among them +2 at step 7"
    assert found.numbers["spike_rise"] == pytest.approx(2.0) and found.numbers["spike_rise_step"] == 7
    assert found.numbers["largest_jump"] == pytest.approx(8.0) and found.numbers["largest_jump_step"] == 2


def test_counts_are_written_in_the_singular_for_one(cli, module_model, regression_npz, tmp_path):
    """Words are output: a comparison of one variant (a threshold given twice is compared once)
    says "1 variant", and a cut-short CSV of one row says "1 row"."""
    csv = tmp_path / "one.csv"
    code, out, err = cli("compare", module_model, "--data", regression_npz, "--loss", "mse", "--variants",
                         "global:5,global:5.0", "--steps", 2, "--csv", csv)
    assert code == 0, err
    assert "gradwatch: comparing 1 variant (global 5) on " in err and "1 variants" not in err
    assert read_csv(csv)["clip"].tolist() == ["global", "global"]
    lines = csv.read_text().splitlines()
    partial = tmp_path / "cut.csv.partial"
    partial.write_text("\n".join(lines[:2]) + "\n")
    code, out, err = cli("report", partial)
    assert code == 0, err
    assert "holds the rows of a run that did not finish (1 row)" in err
