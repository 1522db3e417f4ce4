"""Issue 12: per-variable norms against a plain TF tape, spike attribution on a crafted case,
update norms against SGD's arithmetic, and `report --layers` rebuilding the live diagnosis."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import read_csv
from gradwatch.diagnose.attribution import HEAT_COLUMNS, LayerWatch

LR = 0.05
SPIKE_STEP = 11  # batch 10 (0-based) of 32 rows holds inputs x100; no shuffle: step 11


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """A two-layer .keras MLP and data with one batch of inputs scaled x100."""
    import keras

    keras.utils.set_random_seed(1)
    inp = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="tanh", name="dense_1")(inp)
    model = keras.Model(inp, keras.layers.Dense(1, name="dense_2")(hidden))
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    folder = tmp_path_factory.mktemp("diagnose")
    model.save(str(folder / "mlp.keras"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(640, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")
    x[320:352] *= 100
    np.savez(folder / "d.npz", x=x, y=y)
    return folder / "mlp.keras", folder / "d.npz", x, y


def _run(cli, mlp, tmp_path, *extra):
    path, data, _, _ = mlp
    steps_csv, layers_csv = tmp_path / "steps.csv", tmp_path / "layers.csv"
    code, out, err = cli("run", path, "--data", data, "--no-shuffle", "--steps", 30, "-q",
                         "--csv", steps_csv, "--layers-csv", layers_csv, *extra)
    assert code == 0, err
    return read_csv(steps_csv), read_csv(layers_csv), out


def test_step_one_norms_equal_a_plain_tape_for_every_variable(cli, mlp, tmp_path):
    import keras
    import tensorflow as tf

    _, layers, _ = _run(cli, mlp, tmp_path, "--clip", "global", "--norm", 1)
    path, _, x, y = mlp
    model = keras.saving.load_model(str(path), safe_mode=True)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x[:32], training=True) - y[:32]))
    grads = tape.gradient(loss, model.trainable_variables)
    global_norm = float(tf.linalg.global_norm(grads))
    scale = min(1.0, 1.0 / global_norm)
    first = layers[layers["step"] == 1].set_index("variable")
    assert sorted(first.index) == sorted(v.path for v in model.trainable_variables)
    for v, g in zip(model.trainable_variables, grads):
        row = first.loc[v.path]
        assert row["layer"] == v.path.rsplit("/", 1)[0]
        assert row["shape"] == "x".join(map(str, v.shape)) or (row["shape"] == int(v.shape[0]))
        assert row["grad_norm"] == pytest.approx(float(tf.norm(g)), rel=1e-5)
        assert row["clipped_norm"] == pytest.approx(float(tf.norm(g)) * scale, rel=1e-5)
        assert row["weight_norm"] == pytest.approx(float(tf.norm(v)), rel=1e-6, abs=1e-12)  # before the update
        assert row["update_norm"] == pytest.approx(LR * float(tf.norm(g)) * scale, rel=1e-4)


def test_per_variable_norms_add_up_to_the_global_norms_and_sgd_updates_are_lr_times_clipped(cli, mlp, tmp_path):
    steps, layers, _ = _run(cli, mlp, tmp_path, "--clip", "global", "--norm", 1)
    by_step = layers.groupby("step")
    for column in ("grad_norm", "clipped_norm"):
        summed = np.sqrt(by_step[column].apply(lambda s: float(np.sum(np.square(s.to_numpy(np.float64))))))
        np.testing.assert_allclose(summed.to_numpy(), steps[column].to_numpy(), rtol=1e-6, err_msg=column)
    # SGD: Δw = -lr × clipped gradient, variable by variable, at every step
    np.testing.assert_allclose(layers["update_norm"], LR * layers["clipped_norm"], rtol=2e-3, atol=1e-9)
    assert len(layers) == 30 * 4 and list(layers.columns[:3]) == ["clip", "param", "step"]


def test_a_batch_of_scaled_inputs_is_attributed_to_the_first_kernel(cli, mlp, tmp_path):
    steps, layers, out = _run(cli, mlp, tmp_path)  # unclipped
    at = layers[layers["step"] == SPIKE_STEP].set_index("variable")
    share = at["grad_norm"] ** 2 / float((at["grad_norm"] ** 2).sum())
    assert share.idxmax() == "dense_1/kernel" and share.max() > 0.9
    # the table names it, with its share, on the spike's line
    assert "Loss spikes, gradient spikes and non-finite steps: what drove them" in out
    line = next(line for line in out.splitlines() if line.startswith("│") and line.split("│")[1].strip() == str(SPIKE_STEP))
    assert "grad" in line and f"dense_1/kernel {100 * share.max():.0f}%" in line
    assert "Gradient norm per layer" in out


def test_report_with_layers_rebuilds_the_live_diagnosis_without_tensorflow(cli, mlp, tmp_path):
    _, _, live = _run(cli, mlp, tmp_path, "--clip", "global", "--norm", 2)
    code, again, err = cli("report", tmp_path / "steps.csv", "--layers", tmp_path / "layers.csv")
    assert code == 0, err
    section = lambda text: text[text.index("Loss spikes, gradient spikes and non-finite steps: what drove them"):]  # noqa: E731
    assert section(again) == section(live)
    code, _, err = cli("report", tmp_path / "steps.csv", "--layers", tmp_path / "steps.csv")
    assert code == 2 and "not a --layers-csv file" in err


def test_sparse_embedding_gradients_give_the_dense_norms(cli, embedding_module_model, ids_npz, tmp_path):
    layers_csv, steps_csv = tmp_path / "layers.csv", tmp_path / "steps.csv"
    code, _, err = cli("run", embedding_module_model, "--data", ids_npz, "--batch-size", 8, "--steps", 5, "-q",
                       "--clip", "norm", "--norm", 0.1, "--csv", steps_csv, "--layers-csv", layers_csv)
    assert code == 0, err
    layers, steps = read_csv(layers_csv), read_csv(steps_csv)
    assert set(layers["variable"]) == {"table", "out"}  # the unused variable has no gradient, no row
    summed = np.sqrt(layers.groupby("step")["grad_norm"].apply(lambda s: float(np.sum(s.to_numpy(np.float64) ** 2))))
    np.testing.assert_allclose(summed.to_numpy(), steps["grad_norm"].to_numpy(), rtol=1e-6)
    assert (layers["clipped_norm"] <= 0.1 * (1 + 1e-6)).all()  # clip_by_norm: each variable on its own


def test_layer_watch_keeps_flat_memory_and_finds_the_injected_spikes():
    rng = np.random.default_rng(0)
    watch = LayerWatch(["a/kernel", "a/bias", "b/kernel"], ["a", "a", "b"], shapes=[(4, 4), (4,), (4, 1)])
    injected = {500, 3000, 7777}
    for start in range(0, 10_000, 250):
        norms = np.abs(rng.normal(1.0, 0.05, size=(250, 4, 3)))
        rows = []
        for k in range(250):
            step = start + k + 1
            if step in injected:
                norms[k, 0, 2] *= 50  # b/kernel explodes
            rows.append({"step": step, "loss": 1.0, "grad_norm": float(np.sqrt(np.sum(norms[k, 0] ** 2))),
                         "loss_spike": False, "nonfinite": False})
        watch.update(rows, norms)
    assert [s.step for s in watch.spikes] == sorted(injected)
    assert all(s.top[0][0] == "b/kernel" and s.top[0][1] > 0.99 and s.top[0][2] > 30 for s in watch.spikes)
    heat, starts = watch.heat()
    assert heat.shape[0] == 3 and HEAT_COLUMNS <= heat.shape[1] <= 2 * HEAT_COLUMNS and starts[0] == 1
    assert heat.max() == pytest.approx(max(float(s.grad_norm) for s in watch.spikes), rel=0.1)  # peaks kept
    assert len(watch._norms) <= watch.rule.window  # the window, not the run


def test_a_layer_updating_much_faster_than_the_others_is_flagged():
    watch = LayerWatch(["a/kernel", "b/kernel", "c/kernel", "c/bias"], ["a", "b", "c", "c"],
                       shapes=[(3, 3), (3, 3), (3, 3), (3,)])
    for step in range(1, 21):
        per = np.array([[1.0] * 4, [1.0] * 4, [1.0, 1.0, 1.0, 0.1], [1e-3, 2e-3, 0.5, 0.05]])
        watch.update([{"step": step, "loss": 1.0, "grad_norm": 2.0, "loss_spike": False, "nonfinite": False}], per[None])
    assert [(name, kind) for name, _, _, kind in watch.flagged()] == [("c/kernel", "matrices")]  # bias: vectors
    assert watch.update_ratios()[2] == pytest.approx(0.5)
    assert not math.isnan(watch.mean_shares()[0])


def test_a_matrix_that_starts_at_zero_is_compared_with_what_started_at_zero():
    """A rank-2 bias (EinsumDense's) starts at 0: its ratio is large while ‖w‖ grows from 0."""
    names = ["a/kernel", "b/kernel", "c/kernel", "att/bias", "d/bias", "e/bias"]
    watch = LayerWatch(names, [n.split("/")[0] for n in names], shapes=[(3, 3)] * 4 + [(3,)] * 2)
    for step in range(1, 21):
        grown = 0.01 * (step - 1)  # the zero-started ones' weight norm, 0 before step 1
        weight = [1.0, 1.0, 1.0, grown, grown, grown]
        update = [1e-3, 2e-3, 1.5e-3, 0.01, 0.01, 0.012]
        per = np.array([[1.0] * 6, [1.0] * 6, weight, update])
        watch.update([{"step": step, "loss": 1.0, "grad_norm": 2.0, "loss_spike": False, "nonfinite": False}], per[None])
    assert watch.kinds().tolist() == [1, 1, 1, 0, 0, 0]
    assert watch.flagged() == []  # by rank, att/bias would be 10x the kernels' median


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    return events


def test_tensorboard_events_read_back_equal_the_csvs(cli, mlp, tmp_path):
    import tensorflow as tf

    path, data, x, y = mlp
    board, steps_csv, layers_csv = tmp_path / "tb", tmp_path / "long.csv", tmp_path / "layers.csv"
    code, _, err = cli("compare", path, "--data", data, "--no-shuffle", "--steps", 25, "-q", "--variants", "none,global:1",
                       "--csv", steps_csv, "--layers-csv", layers_csv, "--tensorboard", board, "--histogram-every", 10)
    assert code == 0, err
    assert sorted(p.name for p in board.iterdir()) == ["global_1", "none"]
    steps, layers = read_csv(steps_csv), read_csv(layers_csv)
    for folder, clip in (("none", "none"), ("global_1", "global")):
        events = _events(board / folder)
        rows = steps[steps["clip"] == clip]
        for tag in ("loss", "grad_norm", "clipped_norm", "clip_ratio", "lr", "threshold"):
            got = events.Tensors(tag)
            assert [e.step for e in got] == rows["step"].tolist(), tag
            np.testing.assert_allclose([float(tf.make_ndarray(e.tensor_proto)) for e in got], rows[tag], rtol=1e-6,
                                       equal_nan=True, err_msg=tag)
        kernel = layers[(layers["clip"] == clip) & (layers["variable"] == "dense_1/kernel")]
        got = events.Tensors("variables/update_norm/dense_1/kernel")
        np.testing.assert_allclose([float(tf.make_ndarray(e.tensor_proto)) for e in got], kernel["update_norm"], rtol=1e-6)
        histograms = events.Tensors("gradients/dense_1/kernel")
        assert [e.step for e in histograms] == [10, 20, 25]
        for event in histograms:
            buckets = tf.make_ndarray(event.tensor_proto)
            assert buckets[:, 2].sum() == 8 * 16  # every entry of the kernel's gradient counted once


def test_a_histogram_is_the_gradient_of_its_step(cli, mlp, tmp_path):
    import keras
    import tensorflow as tf

    path, data, x, y = mlp
    board, plain, aligned = tmp_path / "tb", tmp_path / "plain.csv", tmp_path / "aligned.csv"
    base = ["run", path, "--data", data, "--no-shuffle", "--steps", 7, "-q"]
    assert cli(*base, "--csv", plain)[0] == 0
    code, _, err = cli(*base, "--csv", aligned, "--tensorboard", board, "--histogram-every", 3)
    assert code == 0, err
    # blocks end where a histogram is due: the rows do not change
    assert read_csv(plain).drop(columns="time_ms").equals(read_csv(aligned).drop(columns="time_ms"))
    model = keras.saving.load_model(str(path), safe_mode=True)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x[:32], training=True) - y[:32]))
    grad = tape.gradient(loss, model.trainable_variables[0]).numpy()
    assert cli(*base[:-3], "--steps", 1, "-q", "--tensorboard", tmp_path / "one", "--histogram-every", 1)[0] == 0
    buckets = tf.make_ndarray(_events(tmp_path / "one" / "none").Tensors("gradients/dense_1/kernel")[0].tensor_proto)
    assert buckets[0, 0] == pytest.approx(grad.min(), rel=1e-6) and buckets[-1, 1] == pytest.approx(grad.max(), rel=1e-6)
    assert [e.step for e in _events(board / "none").Tensors("gradients/dense_1/kernel")] == [3, 6, 7]


@pytest.mark.parametrize("width", [80, 120, 160])
def test_the_diagnosis_tables_keep_names_and_numbers_whole(width):
    import io
    import re

    from rich.console import Console

    from gradwatch.report.tables import Variant
    from gradwatch.report.diagnosis import print_section

    names = [f"transformer_block_{k}/multi_head_attention/query/kernel" for k in range(3)] + ["embedding/embeddings"]
    watch = LayerWatch(names, [n.rsplit("/", 1)[0] for n in names], shapes=[(64, 64)] * 3 + [(1000, 64)])
    rng = np.random.default_rng(1)
    rows = []
    for step in range(1, 61):
        norms = np.abs(rng.normal(1.0, 0.1, size=(1, 4, 4)))
        if step in (30, 45):
            norms[0, 0, 3] *= 80
        rows.append({"step": step, "loss": 2.0 + (step == 30) * 9, "grad_norm": float(np.sqrt((norms[0, 0] ** 2).sum())),
                     "loss_spike": step == 30, "nonfinite": False, "clipped": False})
        watch.update(rows[-1:], norms)
    out = io.StringIO()
    print_section(Console(file=out, width=width, highlight=False), [Variant("none", None, rows, layers=watch)])
    text = out.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= width
    words = set(re.findall(r"[^\s│┃]+", text))
    for spike in watch.spikes:
        assert str(spike.step) in words
        name, share, ratio = spike.top[0]
        assert name == "embedding/embeddings" and f"{100 * share:.0f}%" in words and f"(×{ratio:.3g})," in words
    for entry in watch.by_layer():
        assert f"{100 * entry['share']:.1f}" in words


def test_the_spike_caption_counts_each_kind_in_words_and_the_layer_table_names_the_baseline_unclipped():
    """12 steps whose loss and gradient both jump (steps 21, 28, ..., 98) and one loss-only
    spike (step 50): the caption counts them in plural words; in a comparison the per-layer
    table is the baseline's and says so as the spike tables do, 'unclipped (none)'."""
    import io

    from rich.console import Console

    from gradwatch.report.tables import Variant
    from gradwatch.report.diagnosis import print_section

    names = ["dense/kernel", "dense/bias"]
    watch = LayerWatch(names, ["dense", "dense"], shapes=[(4, 4), (4,)])
    rng = np.random.default_rng(2)
    both = list(range(21, 100, 7))
    rows = []
    for step in range(1, 101):
        norms = np.abs(rng.normal(1.0, 0.05, size=(1, 4, 2)))
        if step in both:
            norms[0, :2] *= 80
        rows.append({"step": step, "loss": 2.0 + 9 * (step in both or step == 50),
                     "grad_norm": float(np.sqrt((norms[0, 0] ** 2).sum())), "loss_spike": step in both or step == 50,
                     "nonfinite": False, "clipped": False})
        watch.update(rows[-1:], norms)
    assert [s.step for s in watch.spikes] == sorted(both + [50])
    out = io.StringIO()
    print_section(Console(file=out, width=200, highlight=False),
                  [Variant("none", None, rows, layers=watch), Variant("global", 1.0, rows, layers=watch)])
    text = " ".join(out.getvalue().split())
    assert "the first 5 of 13 steps (12 loss + gradient spikes, 1 loss spike)" in text
    assert "Gradient norm per layer: unclipped (none)" in text
