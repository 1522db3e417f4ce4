"""Issue 21: findings on scenarios whose truth is known, each code and number checked against an
independent computation (NumPy on the CSV the same command wrote), through the real CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import read_csv
from gradwatch.diagnose.findings import CODES, FAIL_ON_EXIT

BATCH = 8


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Small real models (.keras) and data files with known behaviour."""
    import keras

    folder = tmp_path_factory.mktemp("findings")
    keras.utils.set_random_seed(3)
    linear = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    linear.save(str(folder / "linear.keras"))
    cosine = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    cosine.save(str(folder / "cosine.keras"))
    reg = keras.Sequential([keras.Input((4,)), keras.layers.Dense(
        1, use_bias=False, kernel_initializer="ones", kernel_regularizer=keras.regularizers.L2(0.1))])
    reg.compile(optimizer="sgd", loss="mse")
    reg.save(str(folder / "reg.keras"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 4)).astype("float32")
    w = np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32")
    np.savez(folder / "exact.npz", x=x, y=x @ w)  # a linear model can fit it to float32 noise
    y = x @ w + 0.1 * rng.normal(size=(80, 1)).astype("float32")
    outlier = y.copy()
    outlier[43] = 400.0  # one row, in batch 6 of every unshuffled epoch
    np.savez(folder / "outlier.npz", x=x, y=outlier)
    np.savez(folder / "noisy.npz", x=x, y=y)
    direction = rng.normal(size=(4, 3)).astype("float32")
    np.savez(folder / "cosine.npz", x=x, y=x @ direction + 1.5 * rng.normal(size=(80, 3)).astype("float32"))
    np.savez(folder / "zeros.npz", x=np.zeros((80, 4), "float32"), y=np.zeros((80, 1), "float32"))
    return folder


def _run(cli, tmp_path, *args, command="run", code=0):
    csv, found = tmp_path / "rows.csv", tmp_path / "findings.json"
    got, out, err = cli(command, *args, "--csv", csv, "--findings", found, "-q")
    assert got == code, err
    return read_csv(csv), json.loads(found.read_text()), out


def _codes(findings, variant=None):
    return {f["code"] for f in findings if variant is None or f["variant"] == variant}


def _one(findings, code, variant=None):
    hits = [f for f in findings if f["code"] == code and (variant is None or f["variant"] == variant)]
    assert len(hits) == 1, [(f["code"], f["variant"]) for f in findings]
    return hits[0]


def _rises(loss, window=20):
    """Each step's rise above the median of the previous finite losses (NumPy, not the rule's code)."""
    out = []
    for k in range(len(loss)):
        before = loss[max(0, k - window):k]
        before = before[np.isfinite(before)]
        out.append(loss[k] - np.median(before) if len(before) >= 3 else 0.0)
    return np.array(out)


def test_a_converged_near_zero_regression_has_no_spikes(cli, lab, tmp_path):
    rows, found, out = _run(cli, tmp_path, lab / "linear.keras", "--data", lab / "exact.npz", "--loss", "mse",
                            "--optimizer", "adam", "--lr", 0.05, "--batch-size", BATCH, "--epochs", 40)
    loss = rows["loss"].to_numpy()
    assert loss[-50:].max() < 1e-6 * loss[0]  # converged to float32 noise
    medians = loss - _rises(loss)
    assert (loss[-200:] > 2 * medians[-200:]).any()  # the noise more than doubles its running median at times
    assert "loss_spikes" not in _codes(found) and "stable" in _codes(found)
    assert not rows["loss_spike"].any()
    assert "Loss is stable: no loss spikes, no non-finite steps" in out


def test_a_negative_noisy_loss_has_no_spikes(cli, lab, tmp_path):
    rows, found, _ = _run(cli, tmp_path, lab / "cosine.keras", "--data", lab / "cosine.npz", "--loss",
                          "cosine_similarity", "--lr", 0.05, "--batch-size", BATCH, "--epochs", 20)
    loss = rows["loss"].to_numpy()
    assert loss[0] > 0 and loss.min() < -0.5  # through zero to negative, noisy from batch to batch
    rises = _rises(loss)
    medians = loss - rises
    assert (rises > np.abs(medians)).sum() >= 3  # a rule relative to |median| alone would call these spikes
    assert not rows["loss_spike"].any() and "loss_spikes" not in _codes(found)
    assert _one(found, "stable")


@pytest.mark.parametrize("shuffle", ["--no-shuffle", "--shuffle"])
def test_outlier_rows_that_spike_every_epoch_are_named(cli, lab, tmp_path, shuffle):
    rows, found, out = _run(cli, tmp_path, lab / "linear.keras", "--data", lab / "outlier.npz", "--loss", "mse",
                            "--lr", 0.002, "--batch-size", BATCH, "--epochs", 6, shuffle)
    spikes = rows.loc[rows["loss_spike"], "step"].tolist()
    data = np.load(lab / "outlier.npz")
    if shuffle == "--no-shuffle":
        assert spikes and all((s - 1) % 10 == 5 for s in spikes) and len(spikes) >= 4  # batch 6, rows 40-47
    finding = _one(found, "spikes_from_data")
    assert finding["steps"] == spikes and finding["numbers"]["cause"] == "rows"
    named = finding["numbers"]["rows"][0]
    assert named["row"] == 43
    y = data["y"][:, 0].astype(np.float64)
    mad = np.median(np.abs(y - np.median(y)))
    assert named["target_mads"] == pytest.approx(abs(y[43] - np.median(y)) / mad, rel=1e-6)
    said = f"row 43 ({named['input_mads']:.3g} MADs from the median in its inputs, {named['target_mads']:.3g} in its targets)"
    assert said in finding["message"] and "[spikes_from_data]" in out


def test_global_clipping_calms_an_exploding_rnn_and_is_recommended_with_its_numbers(cli, tmp_path):
    rows, found, out = _run(cli, tmp_path, "--sample", "rnn-adding", "--thresholds", "none,1", command="compare")
    best = _one(found, "recommended")
    assert best["variant"] == "global 1"
    for clip, key in (("global", "final_loss"), ("none", "baseline_final_loss")):
        part = rows[rows["clip"] == clip]["loss"].to_numpy()
        tail = part[-max(1, math.ceil(len(part) * 0.1)):]
        assert best["numbers"][key] == pytest.approx(float(np.median(tail[np.isfinite(tail)])), rel=1e-9)
    base = rows[rows["clip"] == "none"]
    assert best["numbers"]["baseline_instability"] == int(base["loss_spike"].sum() + base["nonfinite"].sum()) > 0
    clipped = rows[rows["clip"] == "global"]
    assert best["numbers"]["instability"] == int(clipped["loss_spike"].sum() + clipped["nonfinite"].sum())
    assert best["numbers"]["pct_clipped"] == pytest.approx(100 * clipped["clipped"].mean())
    assert "Recommended: global 1" in out


def test_a_threshold_at_a_tenth_of_the_median_norm_always_binds_and_says_the_factor(cli, lab, tmp_path):
    args = (lab / "linear.keras", "--data", lab / "noisy.npz", "--loss", "mse", "--lr", 0.05, "--batch-size", BATCH,
            "--epochs", 3)
    free, _, _ = _run(cli, tmp_path, *args)
    threshold = float(np.median(free["grad_norm"])) / 10
    rows, found, out = _run(cli, tmp_path, *args, "--clip", "global", "--norm", threshold)
    finding = _one(found, "clip_always_binds")
    assert rows["clipped"].mean() >= 0.9
    assert finding["numbers"]["pct_clipped"] == pytest.approx(100 * rows["clipped"].mean())
    factor = rows.loc[rows["clipped"], "clip_ratio"].mean()
    assert finding["numbers"]["lr_factor"] == pytest.approx(factor)
    assert f"the learning rate x {factor:.3g}" in finding["message"]
    # one clipped run cannot say whether clipping helps: it says so, with the command that can
    hint = _one(found, "no_baseline")
    assert "gradwatch compare" in hint["numbers"]["command"] and "--thresholds none," in hint["numbers"]["command"]


def test_zclip_on_a_run_that_diverges_inside_its_warmup(cli, lab, tmp_path):
    rows, found, out = _run(cli, tmp_path, lab / "linear.keras", "--data", lab / "noisy.npz", "--loss", "mse",
                            "--lr", 5.0, "--batch-size", BATCH, "--steps", 40, "--variants", "none,zclip",
                            command="compare")
    zclip = rows[rows["clip"] == "zclip"]
    first_bad = int(zclip.loc[zclip["nonfinite"], "step"].min())
    assert first_bad <= 25
    finding = _one(found, "warmup_not_reached")
    assert finding["variant"] == "zclip 2.5" and finding["numbers"]["step"] == first_bad
    assert _one(found, "nonfinite", "none") and _one(found, "no_variant_calm")


def test_a_loss_that_is_all_regularization(cli, lab, tmp_path):
    rows, found, _ = _run(cli, tmp_path, lab / "reg.keras", "--data", lab / "zeros.npz", "--batch-size", BATCH,
                          "--steps", 10)
    assert np.allclose(rows["reg_loss"], rows["loss"]) and (rows["loss"] > 0).all()  # the data loss is 0
    finding = _one(found, "regularization_dominates")
    assert finding["numbers"]["reg_share"] == pytest.approx(float(np.median(rows["reg_loss"] / rows["loss"])))


@pytest.fixture(scope="module")
def attention(tmp_path_factory):
    """Keras' MultiHeadAttention, whose query/key/value biases are rank 2 (heads, key_dim) and start
    at zero, under Adam: as built (no variable's learning rate is too high), and with the output
    kernel scaled by 1e-4 after building (each Adam step moves it by about lr per entry, 1000x
    more than its size: its update/weight ratio is too high, and only its)."""
    import keras

    folder = tmp_path_factory.mktemp("attention")
    for name, scale in (("plain", 1.0), ("tiny_kernel", 1e-4)):
        keras.utils.set_random_seed(23)
        inputs = keras.Input((6, 8))
        attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(inputs, inputs)
        pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.LayerNormalization()(inputs + attended))
        model = keras.Model(inputs, keras.layers.Dense(1, name="head")(pooled))
        kernel = model.layers[-1].kernel
        kernel.assign(kernel * scale)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
        model.save(str(folder / f"{name}.keras"))
    x = np.random.default_rng(23).normal(size=(64, 6, 8)).astype("float32")
    np.savez(folder / "seq.npz", x=x, y=x[:, :, 0].sum(axis=1, keepdims=True))
    return folder


def test_biases_that_start_at_zero_are_not_flagged_against_the_kernels(cli, attention, tmp_path):
    _, found, _ = _run(cli, tmp_path, attention / "plain.keras", "--data", attention / "seq.npz",
                       "--batch-size", BATCH, "--steps", 20)
    assert "update_too_large" not in _codes(found)  # before: query/key/value bias, 'median of its kind'


def test_the_one_matrix_whose_updates_dwarf_it_is_flagged_with_its_ratio(cli, attention, tmp_path):
    layers = tmp_path / "layers.csv"
    _, found, _ = _run(cli, tmp_path, attention / "tiny_kernel.keras", "--data", attention / "seq.npz",
                       "--batch-size", BATCH, "--steps", 20, "--layers-csv", layers)
    finding = _one(found, "update_too_large")
    assert finding["numbers"]["variable"] == "head/kernel" and finding["numbers"]["kind"] == "matrices"
    table = read_csv(layers)
    first = table[table["step"] == 1].set_index("variable")
    moved = table[(table["update_norm"] > 0) & (table["weight_norm"] > 0)]
    ratio = np.exp(np.log(moved["update_norm"] / moved["weight_norm"]).groupby(moved["variable"]).mean())
    matrices = [v for v in ratio.index if "x" in str(first.loc[v, "shape"]) and first.loc[v, "weight_norm"] > 0]
    assert "head/kernel" in matrices and not any(v.endswith("bias") for v in matrices)
    assert finding["numbers"]["ratio"] == pytest.approx(ratio["head/kernel"], rel=1e-9)
    assert finding["numbers"]["median"] == pytest.approx(float(np.median(ratio[matrices])), rel=1e-9)
    assert "more than 10x the median" in finding["message"] and "of the matrices" in finding["message"]


def test_suggest_on_a_probe_that_diverges_says_so(cli, lab, tmp_path):
    code, out, err = cli("suggest", lab / "linear.keras", "--data", lab / "noisy.npz", "--loss", "mse", "--lr", 5.0,
                         "--batch-size", BATCH, "--steps", 40, "-q")
    probe = tmp_path / "probe.csv"
    assert cli("run", lab / "linear.keras", "--data", lab / "noisy.npz", "--loss", "mse", "--lr", 5.0,
               "--batch-size", BATCH, "--steps", 40, "--csv", probe, "-q")[0] == 0
    rows = read_csv(probe)
    bad, first = int(rows["nonfinite"].sum()), int(rows.loc[rows["nonfinite"] | rows["loss_spike"], "step"].min())
    assert bad > 0 and first < 20
    # lr 5 breaks a probe clipped by AutoClip too: no proposal, and why, in one line
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"no threshold proposed: the unclipped probe broke down at step {first} (non-finite on {bad} of 40 steps)" in err
    assert " steps) and so did the probe clipped by AutoClip (p=10), at step " in err and out == ""


def test_fail_on_exits_4_after_writing_every_output(cli, lab, tmp_path):
    args = (lab / "linear.keras", "--data", lab / "outlier.npz", "--loss", "mse", "--lr", 0.002, "--batch-size",
            BATCH, "--epochs", 3, "--no-shuffle")
    rows, found, _ = _run(cli, tmp_path, *args, "--fail-on", "nonfinite,loss_spikes", code=FAIL_ON_EXIT)
    assert len(rows) == 30 and "loss_spikes" in _codes(found)
    rows, found, _ = _run(cli, tmp_path, *args, "--fail-on", "nonfinite,diverged", code=0)
    code, _, err = cli("run", *args, "--fail-on", "loss_spike", "-q")
    assert code == 2 and "unknown finding code loss_spike" in err and len(err.strip().splitlines()) == 1
    assert FAIL_ON_EXIT not in (0, 1, 2, 3, 74, 129, 130, 141, 143)


def test_every_code_is_documented_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for code in CODES:
        assert f"| `{code}` |" in readme, code


def test_run_help_groups_its_options_in_panels(cli):
    code, out, _ = cli("run", "--help")
    assert code == 0
    headings = [line for line in out.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert headings == ["Arguments:", "Model and data:", "Training:", "Clipping:", "Diagnosis:", "Outputs:", "Scale:",
                        "Options:"]
    section = out[out.index("Clipping:"):out.index("Diagnosis:")]
    assert "--clip" in section and "--norm" in section and "--sparse-norm" in section


def test_every_table_fits_80_columns_with_numbers_whole(cli, lab, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    data = ("--data", lab / "outlier.npz", "--loss", "mse", "--lr", 0.002, "--batch-size", BATCH, "--epochs", 3)
    long = tmp_path / "long.csv"
    for args in (("run", lab / "linear.keras", *data, "--clip", "global", "--norm", 1),
                 ("compare", lab / "linear.keras", *data, "--variants", "none,global:1,agc,zclip", "--csv", long)):
        code, out, err = cli(*args, "-q")
        assert code == 0, err
        assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80
        assert "Verdict:" in out
    code, out, _ = cli("compare", lab / "linear.keras", *data, "--variants", "none,global:1", "-q")
    lines = out.splitlines()
    start = lines.index("loss per step: each character the highest loss of its steps, ▁ lowest, █ highest")
    spark = lines[start + 1].split()[-1]  # the picture survives at 80 columns, one line per variant
    assert len(spark) >= 24 and set(spark) <= set("▁▂▃▄▅▆▇█!")


def test_the_sparkline_is_scaled_from_the_lowest_to_the_highest_loss_at_every_width():
    from gradwatch.report.tables import BLOCKS, sparkline

    # a burst to 100 in every stretch but the last, whose loss sits 8.7x above the best (1.0)
    losses = ([1.0] * 9 + [100.0]) * 11 + [8.7] * 10
    for width in (12, 24, 48):
        line = sparkline(losses, width)
        assert len(line) == width and line[-1] == BLOCKS[int(np.log10(8.7) / 2 * 8)] and BLOCKS[-1] in line
    assert sparkline([2.0, 1.0, 3.0], 3) == "▅▁█"  # linear within 10x: halfway is the fifth block
    assert sparkline([1.0, float("nan"), 2.0], 3) == "▁!█"


def test_the_heat_maps_show_the_chosen_and_the_worst_variant_that_did_not_diverge():
    from gradwatch.diagnose.attribution import LayerWatch
    from gradwatch.diagnose.findings import Finding
    from gradwatch.report.tables import Variant, heat_variants

    def variant(clip, param, losses):
        rows = [{"step": k + 1, "epoch": 1, "loss": v, "grad_norm": 1.0, "clipped_norm": 1.0, "clip_ratio": 1.0,
                 "clipped": False, "lr": 1.0, "nonfinite": False, "loss_spike": False, "time_ms": 1.0}
                for k, v in enumerate(losses)]
        return Variant(clip, param, rows, layers=LayerWatch(["w"], ["dense"]))

    calm = variant("global", 1.0, [1.0] * 30)
    jumpy = variant("global", 5.0, [1.0, 1.0, 1.0, 9.0] * 8)
    jumpy.rows[3]["loss_spike"] = True
    gone = variant("none", None, [1.0] * 10 + [1e35] * 20)
    found = [Finding("diverged", "none", "x"), Finding("recommended", "global 1", "y")]
    assert heat_variants([gone, jumpy, calm], found) == [jumpy, calm]


def test_a_variant_that_diverges_to_1e35_does_not_flatten_the_others_and_the_picture_is_drawn(tmp_path):
    from gradwatch.report.tables import Variant, loss_axis, plot

    def variant(clip, param, losses):
        return Variant(clip, param, [{"step": k + 1, "epoch": 1, "loss": v, "grad_norm": 1.0, "clipped_norm": 1.0,
                                      "clip_ratio": 1.0, "clipped": clip != "none", "lr": 1.0, "nonfinite": False,
                                      "loss_spike": False, "time_ms": 1.0, "threshold": 1.0}
                                     for k, v in enumerate(losses)])

    calm = [variant("global", t, [5 * 0.99**k + 0.01 * t for k in range(50)]) for t in (1.0, 2.0, 5.0)]
    gone = variant("none", None, [5.0 * 10 ** (k * 0.7) for k in range(50)])  # finite: 5e34 at the end
    log, top = loss_axis([gone] + calm)
    highest = max(r["loss"] for v in calm for r in v.rows)
    assert top == pytest.approx(1.1 * highest) and not log  # the calm variants fill the axis
    assert loss_axis(calm) == (False, None)
    twin = variant("global", 10.0, [r["loss"] for r in calm[0].rows])  # identical to global 1
    path = tmp_path / "p.png"
    plot([gone] + calm + [twin], str(path))
    assert path.stat().st_size > 10_000


def test_clipping_that_never_binds_trains_as_unclipped_and_one_that_binds_says_how_often(cli, lab, tmp_path):
    """clip_never_binds and clip_active against NumPy on the norms each run recorded: a threshold
    above every norm clips nothing and its losses are the unclipped run's, step for step (what
    "it trained as unclipped would" claims); one at the unclipped median binds on the share of
    steps whose norm exceeds it, with the mean clip ratio min(1, T / norm)."""
    args = (lab / "linear.keras", "--data", lab / "noisy.npz", "--loss", "mse", "--lr", 0.05, "--batch-size", BATCH,
            "--epochs", 3)
    free, _, _ = _run(cli, tmp_path, *args)
    high = 10 * float(free["grad_norm"].max())
    rows, found, _ = _run(cli, tmp_path, *args, "--clip", "global", "--norm", high)
    never = _one(found, "clip_never_binds")
    assert not rows["clipped"].any()
    np.testing.assert_array_equal(rows["loss"], free["loss"])
    assert never["numbers"]["grad_norm_max"] == pytest.approx(float(rows["grad_norm"].max()), rel=1e-12)
    assert never["message"] == (f"the clipping never bound (grad norm max {rows['grad_norm'].max():.4g}): "
                                "it trained as unclipped would")
    middle = float(np.percentile(free["grad_norm"], 90))
    rows, found, _ = _run(cli, tmp_path, *args, "--clip", "global", "--norm", middle)
    active = _one(found, "clip_active")
    norms = rows["grad_norm"].to_numpy()
    pct = 100 * float(np.mean(norms > middle))
    assert 0 < pct < 90 and active["numbers"]["pct_clipped"] == pytest.approx(pct)
    ratio = float(np.mean(np.minimum(1.0, middle / norms)))
    assert active["numbers"]["mean_clip_ratio"] == pytest.approx(ratio, rel=1e-6)
    assert active["message"].startswith(f"the clipping bound on {pct:.0f} % of steps (grad norm median "
                                        f"{np.median(norms):.4g}, mean clip ratio {ratio:.3g})")


def test_a_recommended_variant_that_diverged_too_says_so_and_gives_its_keras_threshold(cli, keras_file_model, ids_npz,
                                                                                      tmp_path):
    """An Embedding whose ids repeat, at a learning rate of 50: unclipped goes non-finite, global 1
    stays finite (so it is the better of the two) but its loss still ends far above the first.
    The recommendation says that clipping alone does not fix it, and gives the threshold as Keras
    measures the gradient (by rows): 1 x the median ratio of the two norms the CSV holds."""
    rows, found, out = _run(cli, tmp_path, keras_file_model, "--data", ids_npz, "--loss", "mse", "--lr", 50,
                            "--thresholds", "none,1", "--steps", 60, "--batch-size", BATCH, command="compare")
    clipped = rows[rows["clip"] == "global"]
    loss = clipped["loss"].to_numpy()
    assert np.isfinite(loss).all() and np.median(loss[-6:]) > 10 * loss[0]  # diverged, by the README's rule
    assert rows[rows["clip"] == "none"]["nonfinite"].any()
    best = _one(found, "recommended")
    assert best["variant"] == "global 1" and "diverged" in _codes(found, "global 1")
    assert best["message"].endswith("but it diverged too, so clipping alone does not fix this run (diverged)")
    keras = _one(found, "keras_threshold")
    ratio = float(np.median(clipped["grad_norm_rows"] / clipped["grad_norm"]))
    assert abs(ratio - 1) > 0.01 and keras["numbers"]["keras"] == pytest.approx(ratio, rel=0.01)
    assert f"global_clipnorm={keras['numbers']['keras']:g})" in keras["message"] and keras["message"].endswith("not 1; "
           "with --sparse-norm rows gradwatch clips on that norm too")


def test_a_run_too_short_for_the_spike_rule_is_not_called_stable(cli, lab, tmp_path):
    """The spike rule judges a loss by the 3 finite losses before it: in a 3-step run no step can
    be flagged whatever its loss does, so it is not called 'stable'; it says that nothing could
    be judged. A 4-step run is judged on step 4."""
    args = (lab / "linear.keras", "--data", lab / "noisy.npz", "--loss", "mse", "--batch-size", BATCH, "--no-shuffle")
    rows, found, out = _run(cli, tmp_path, *args, "--steps", 3)
    assert "stable" not in _codes(found) and not rows["loss_spike"].any()
    short = _one(found, "too_short")
    assert short["numbers"] == {"steps": 3, "spike_history": 3}
    assert short["message"] == ("too short to say whether the loss is stable: the spike rule judges a loss by the 3 "
                                "finite losses before it, and this run has 3 steps; run more --steps")
    rows, found, out = _run(cli, tmp_path, *args, "--steps", 4)
    assert "stable" in _codes(found) and "too_short" not in _codes(found)
