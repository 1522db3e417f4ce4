"""Issue 12: `gradwatch suggest`, its rule against NumPy, on the built-in sample and on saved runs."""

from __future__ import annotations

import shlex

import numpy as np
import pytest

from conftest import read_csv
from gradwatch.diagnose.suggest import TooFewCalmSteps, round2, suggest_threshold
from gradwatch.diagnose.spikes import SpikeRule


def rows_of(norms, loss_spikes=()):
    return [{"step": k + 1, "loss": 1.0, "grad_norm": float(n), "loss_spike": k + 1 in loss_spikes,
             "nonfinite": not np.isfinite(n)} for k, n in enumerate(norms)]


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
    # a loss spike earlier than any gradient spike ends the calm stretch there: 9 calm steps are
    # fewer than the 20 a proposal rests on, and it says so rather than proposing
    with pytest.raises(TooFewCalmSteps, match="9 calm steps, fewer than the 20") as early:
        suggest_threshold(rows_of(norms, loss_spikes={10}))
    assert (early.value.calm, early.value.first) == (9, 10)
    # the rows of an AutoClip probe: its gradient bursts do not end the calm stretch, a loss spike does
    burst = norms.copy()
    burst[30] *= 50
    found = suggest_threshold(rows_of(burst, loss_spikes={36}), clipped_probe="an AutoClip (p=10) probe")
    assert found.calm_steps == 35 and found.threshold == round2(float(np.median(burst[:35])))
    assert "35 steps of an AutoClip (p=10) probe before its first loss spike" in found.rule
    assert [round2(x) for x in (7.196, 0.01234, 1234.0)] == [7.2, 0.012, 1200.0]
    assert SpikeRule().mark(norms)[25]


def test_suggest_on_the_builtin_sample_probes_again_clipped_when_unclipped_breaks_down(cli, tmp_path):
    code, out, err = cli("suggest", "--steps", 24, "-q")
    assert code == 0, err
    unclipped, clipped = tmp_path / "probe.csv", tmp_path / "autoclip.csv"
    assert cli("run", "--steps", 24, "-q", "--csv", unclipped)[0] == 0  # the same probes, recorded
    assert cli("run", "--steps", 24, "-q", "--clip", "autoclip", "--percentile", 10, "--csv", clipped)[0] == 0
    # PTB-small at lr 1: the unclipped gradient norm bursts at step 4 (NumPy on the CSV: ×100 its median)
    norms = read_csv(unclipped)["grad_norm"].to_numpy()
    assert norms[3] > 100 * np.median(norms[:3])
    assert "and was calm for only 3 steps (its first spike or non-finite step: step 4)" in out
    assert "[probe_diverged]" in out
    steps = read_csv(clipped)
    assert not steps["loss_spike"].any() and not steps["nonfinite"].any()
    expected = round2(float(np.median(steps["grad_norm"])))  # the raw norms of the clipped training
    assert "median raw global norm of the 24 steps of an AutoClip (p=10) probe" in out
    line = out.strip().splitlines()[-1]
    assert line == f"Try: gradwatch run --clip global --norm {expected:g}"
    assert "The norm is dominated by: embedding" in out
    assert "need no clipping" not in out  # it burst at step 4
    code, _, err = cli(*shlex.split(line[len("Try: gradwatch "):]), "--steps", 3, "-q")
    assert code == 0, err
    # from the saved unclipped run there is no second probe: no proposal, and why, in one line
    code, _, err = cli("suggest", unclipped)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no threshold proposed: its first spike or non-finite step came at step 4, leaving 3 calm steps" in err


def test_suggest_keeps_the_users_options_and_verify_picks_the_calmest(cli, module_model, regression_npz):
    code, out, err = cli("suggest", module_model, "--data", regression_npz, "--loss", "mse", "--batch-size", 8,
                         "--lr", 0.3, "--no-shuffle", "--steps", 30, "--verify", "-q")
    assert code == 0, err
    assert "verification: the candidates over the probe's steps" in out and "Calmest candidate: global" in out
    calmest = out.split("Calmest candidate: global ")[1].split(".\n")[0]
    assert out.strip().splitlines()[-1] == (f"Try: gradwatch run {module_model} --data {regression_npz} --loss mse "
                                            f"--batch-size 8 --no-shuffle --lr 0.3 --clip global --norm {calmest}")


def test_a_calm_probe_says_it_needed_no_clipping(cli, module_model, regression_npz, tmp_path):
    """Linear regression at a small learning rate: no spike, no non-finite step (by the CSV of the same
    probe). The proposal stands, as a guard, and the line says the probe itself needed none."""
    csv = tmp_path / "probe.csv"
    args = [module_model, "--data", regression_npz, "--loss", "mse", "--steps", 24, "-q"]
    assert cli("run", *args, "--csv", csv)[0] == 0
    rows = read_csv(csv)
    assert not (rows["loss_spike"].any() or rows["nonfinite"].any())
    code, out, err = cli("suggest", *args)
    assert code == 0, err
    assert ("No spike and no non-finite step in the probe: these 24 steps need no clipping; the proposal is a guard "
            "against bursts that come later.") in out
    assert out.strip().splitlines()[-1].startswith("Try: gradwatch run")
    assert "no spike" in out.splitlines()[0]


def test_a_probe_too_short_for_a_proposal_asks_for_more_steps_not_a_lower_lr(cli, module_model, regression_npz,
                                                                               tmp_path):
    """Twelve calm steps: the learning rate is fine, the probe is only short. Training such a probe
    is refused before it starts; a saved run of it is told to probe longer."""
    code, out, err = cli("suggest", module_model, "--data", regression_npz, "--loss", "mse", "--steps", 12)
    assert code == 2 and out == "" and err.strip().splitlines() == [
        "gradwatch: error: suggest needs a probe of at least 20 steps (a proposal rests on 20 calm ones), and this "
        "one has 12; give --steps 20 or more"]
    csv = tmp_path / "short.csv"
    assert cli("run", module_model, "--data", regression_npz, "--loss", "mse", "--steps", 12, "-q", "--csv", csv)[0] == 0
    rows = read_csv(csv)
    assert not (rows["loss_spike"].any() or rows["nonfinite"].any())  # calm, by the CSV
    code, _, err = cli("suggest", csv)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "the probe's 12 steps were all calm, fewer than the 20 a proposal rests on; probe longer (--steps 20 or " \
           "more)" in err and "lower --lr" not in err


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
