"""The built-in samples: the PTB model as the tutorial defines it, the demonstration, the cache."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import read_csv
from gradwatch import samples


def test_samples_lists_every_sample_with_a_command(cli):
    code, out, err = cli("samples")
    assert code == 0, err
    for name in ("ptb-small", "ptb-medium", "ptb-large", "ptb-test", "rnn-adding", "deep-mlp"):
        assert name in out
    assert "gradwatch compare --clip global --thresholds none,5" in out


@pytest.mark.parametrize("config", ["small", "medium", "large", "test"])
def test_ptb_configs_are_the_tutorials(config):
    ptb = samples.load_builder("ptb_lstm")
    c = ptb.CONFIGS[config]
    table = {
        "small": (0.1, 1.0, 5, 2, 20, 200, 4, 13, 1.0, 0.5, 20, 10000),
        "medium": (0.05, 1.0, 5, 2, 35, 650, 6, 39, 0.5, 0.8, 20, 10000),
        "large": (0.04, 1.0, 10, 2, 35, 1500, 14, 55, 0.35, 1 / 1.15, 20, 10000),
        "test": (0.1, 1.0, 1, 1, 2, 2, 1, 1, 1.0, 0.5, 20, 10000),
    }[config]
    keys = ("init_scale", "learning_rate", "max_grad_norm", "num_layers", "num_steps", "hidden_size", "max_epoch",
            "max_max_epoch", "keep_prob", "lr_decay", "batch_size", "vocab_size")
    assert tuple(c[k] for k in keys) == pytest.approx(table)
    defaults = samples.get(f"ptb-{config}").defaults
    assert defaults["lr"] == c["learning_rate"] and defaults["lr_decay"] == c["lr_decay"]
    assert defaults["decay_after_epoch"] == c["max_epoch"] and defaults["batch_size"] == c["batch_size"]


def test_ptb_model_weights_vocab_and_cost():
    """Shapes and init range from the config, vocab asset, and loss = summed CE / batch size."""
    import tensorflow as tf

    sample = samples.get("ptb-test")
    model_path, data_path = samples.materialize(sample)
    obj = tf.saved_model.load(str(model_path))
    assert (model_path / "assets" / "vocab.txt").is_file()
    vocab = (model_path / "assets" / "vocab.txt").read_text().split("\n")
    assert vocab[:2] == ["<unk>", "<eos>"] and len([w for w in vocab if w]) == 10000
    shapes = {v.name.split(":")[0]: tuple(v.shape) for v in obj.loss.concrete_functions[0].trainable_variables}
    assert shapes["embedding"] == (10000, 2) and shapes["lstm_0/kernel"] == (4, 8) and shapes["softmax_w"] == (2, 10000)
    for v in obj.loss.concrete_functions[0].trainable_variables:
        assert np.abs(v.numpy()).max() <= 0.1
    rng = np.random.default_rng(0)
    x = rng.integers(0, 10000, size=(5, 2)).astype(np.int32)
    y = rng.integers(0, 10000, size=(5, 2)).astype(np.int32)
    logits = obj(tf.constant(x)).numpy().astype(np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    ce = -np.take_along_axis(log_probs, y[..., None], axis=-1)[..., 0]
    assert float(obj.loss(tf.constant(x), tf.constant(y))) == pytest.approx(ce.sum() / 5, rel=1e-5)


def test_sample_is_built_once_and_rebuilt_for_other_arguments():
    sample = samples.get("ptb-test")
    model_path, _ = samples.materialize(sample)
    stamp = (model_path / "saved_model.pb").stat().st_mtime_ns
    again, _ = samples.materialize(sample)
    assert again == model_path and (again / "saved_model.pb").stat().st_mtime_ns == stamp
    other = samples.Sample("ptb-test", "", "", "ptb_lstm", {"config": "test", "seed": 1}, {})
    assert samples.cache_key(other) != samples.cache_key(sample)


def test_the_demonstration_unclipped_jumps_clipped_is_smooth(cli, tmp_path):
    """The README's demonstration on the default sample, shortened: with the fixed seed the
    unclipped PTB-small LSTM jumps (spike rule of `run`), global-norm clipping at 5 does not."""
    csv = tmp_path / "demo.csv"
    code, out, err = cli("compare", "--clip", "global", "--thresholds", "none,5", "--steps", "40", "--seed", "0",
                         "--csv", csv, "-q")
    assert code == 0, err
    rows = read_csv(csv)
    baseline, clipped = rows[rows["clip"] == "none"], rows[rows["clip"] == "global"]
    assert baseline["loss_spike"].sum() >= 3
    assert clipped["loss_spike"].sum() == 0 and clipped["nonfinite"].sum() == 0
    assert clipped["loss"].tail(10).mean() < 0.2 * baseline["loss"].tail(10).mean()
    assert clipped["clipped"].mean() > 0.3
    assert "Unclipped: loss is jumping" in out and "Recommended: global 5 calms the loss" in out


@pytest.mark.parametrize("name,threshold", [("rnn-adding", "1"), ("deep-mlp", "1")])
def test_other_samples_jump_unclipped_and_calm_when_clipped(cli, tmp_path, name, threshold):
    csv = tmp_path / f"{name}.csv"
    code, out, err = cli("compare", "--sample", name, "--thresholds", f"none,{threshold}", "--csv", csv, "-q")
    assert code == 0, err
    rows = read_csv(csv)
    baseline, clipped = rows[rows["clip"] == "none"], rows[rows["clip"] == "global"]
    assert baseline["loss_spike"].sum() + baseline["nonfinite"].sum() > clipped["loss_spike"].sum()
    assert clipped["nonfinite"].sum() == 0
    # what `gradwatch samples` says each one shows, against its rows
    assert clipped["loss"].tail(10).mean() < clipped["loss"].iloc[0]  # clipped, it trains
    if name == "deep-mlp":  # "diverges to NaN unclipped, trains when clipped"
        assert not np.isfinite(baseline["loss"].tail(10)).any() and "[diverged]" in out
    else:  # "gradient bursts over 60 steps make the loss spike"
        assert baseline["loss_spike"].sum() > 0
        burst = re.search(r"Unclipped: \d+ gradient spikes: the global norm before clipping jumped \(first at step "
                          r"(\d+)\)", out)
        assert burst and int(burst.group(1)) <= baseline["step"][baseline["loss_spike"]].min()  # the burst came first


def test_wheel_ships_the_sample_builders_and_data(tmp_path):
    """A non-editable install needs sample_runs/ inside the package."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(root)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("gradwatch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("gradwatch/cli.py", "gradwatch/sample_runs/ptb_lstm.py", "gradwatch/sample_runs/rnn_adding.py",
                   "gradwatch/sample_runs/deep_mlp.py", "gradwatch/sample_runs/data/tinyshakespeare.txt.gz"):
        assert needed in names
