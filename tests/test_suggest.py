"""Issue 12: `gradwatch suggest`, its rule against NumPy, on the built-in sample and on saved runs."""

from __future__ import annotations

import shlex

import numpy as np
import pytest

from conftest import read_csv
from gradwatch.diagnose.suggest import round2, suggest_threshold
from gradwatch.diagnose.spikes import SpikeRule


def rows_of(norms, loss_spikes=()):
    return [{"step": k + 1, "grad_norm": float(n), "loss_spike": k + 1 in loss_spikes} for k, n in enumerate(norms)]


def test_the_rule_takes_the_median_of_the_calm_steps():
    rng = np.random.default_rng(0)
    norms = np.abs(rng.normal(3.0, 0.3, size=40))
    norms[25:] *= 100  # diverges at step 26
    found = suggest_threshold(rows_of(norms))
    assert found.first_spike == 26 and found.calm_steps == 25
    assert found.threshold == round2(float(np.median(norms[:25])))
    assert [t for t, _, _ in found.candidates] == [round2(found.threshold / 2), found.threshold, round2(found.threshold * 2)]
    for t, calm, every in found.candidates:
        assert calm == pytest.approx(100 * np.mean(norms[:25] > t)) and every == pytest.approx(100 * np.mean(norms > t))
    # a loss spike earlier than any gradient spike ends the calm stretch there
    assert suggest_threshold(rows_of(norms, loss_spikes={10})).calm_steps == 9
    # fewer than 3 calm steps: AutoClip's 10th percentile of every finite norm
    early = suggest_threshold(rows_of([1.0, 2.0, 500.0, 600.0, float("nan"), 700.0, 650.0], loss_spikes={3}))
    assert early.first_spike == 3 and early.calm_steps == 6 and early.threshold == round2(float(np.percentile([1, 2, 500, 600, 700, 650], 10)))
    assert [round2(x) for x in (7.196, 0.01234, 1234.0)] == [7.2, 0.012, 1200.0]
    assert SpikeRule().mark(norms)[25]


def test_suggest_on_the_builtin_sample_and_its_command_runs(cli, tmp_path):
    code, out, err = cli("suggest", "--steps", 8, "-q")
    assert code == 0, err
    csv = tmp_path / "probe.csv"
    assert cli("run", "--steps", 8, "-q", "--csv", csv)[0] == 0  # the same probe, recorded
    norms = read_csv(csv)["grad_norm"].to_numpy()
    expected = round2(float(np.median(norms[:3])))  # PTB-small: the gradient spikes at step 4
    assert "Rule: the threshold is the median global norm of the 3 calm steps before the first spike (step 4)" in out
    line = out.strip().splitlines()[-1]
    assert line == f"Try: gradwatch run --clip global --norm {expected:g}"
    assert "The norm is dominated by: embedding" in out
    code, _, err = cli(*shlex.split(line[len("Try: gradwatch "):]), "--steps", 3, "-q")
    assert code == 0, err
    # the saved run gives the same proposal without TensorFlow
    code, again, err = cli("suggest", csv)
    assert code == 0, err
    assert again.strip().splitlines()[-1] == "Try: gradwatch run --sample ptb-small --clip global --norm " + f"{expected:g}"


def test_suggest_keeps_the_users_options_and_verify_picks_the_calmest(cli, module_model, regression_npz):
    code, out, err = cli("suggest", module_model, "--data", regression_npz, "--loss", "mse", "--batch-size", 8,
                         "--lr", 0.3, "--no-shuffle", "--steps", 12, "--verify", "-q")
    assert code == 0, err
    assert "verification: the candidates over the probe's steps" in out and "Calmest candidate: global" in out
    calmest = out.split("Calmest candidate: global ")[1].split(".\n")[0]
    assert out.strip().splitlines()[-1] == (f"Try: gradwatch run {module_model} --data {regression_npz} --loss mse "
                                            f"--batch-size 8 --no-shuffle --lr 0.3 --clip global --norm {calmest}")


def test_suggest_refuses_a_run_without_unclipped_norms(cli, module_model, regression_npz, tmp_path):
    csv = tmp_path / "clipped.csv"
    assert cli("run", module_model, "--data", regression_npz, "--loss", "mse", "--steps", 5, "-q",
               "--clip", "global", "--norm", 0.01, "--csv", csv)[0] == 0
    code, _, err = cli("suggest", csv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "holds no unclipped run" in err
    code, _, err = cli("suggest", csv, "--verify")
    assert code == 2 and "--verify trains" in err
    code, _, err = cli("suggest", tmp_path / "missing.csv")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no such file" in err
