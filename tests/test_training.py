"""The training loop's machinery: blocks of steps fetched together, one trace per strategy, the
tf.data pipeline, XLA. Whatever the block size, the rows must be the rows of step-by-step training."""

from __future__ import annotations

import math

import time

import numpy as np
import pytest

from gradwatch import Clipping, RunSpec, prepare, resolve


def trainer_for(model, data, **options):
    settings = dict(loss="mse", batch_size=16, shuffle=True, seed=3, lr=0.05)
    settings.update(options)
    return prepare(resolve(RunSpec(model=str(model), data=str(data), **settings)))


def without_time(rows):
    """Rows without their timing, NaN as None (NaN != NaN, and reg_loss is NaN for a SavedModel)."""
    def same(v):
        return None if isinstance(v, float) and math.isnan(v) else v

    return [{k: same(v) for k, v in r.items() if k != "time_ms"} for r in rows]


@pytest.mark.parametrize("fetch_every", [4, 7, None])
def test_rows_do_not_depend_on_how_often_values_are_fetched(keras_export_model, regression_npz, fetch_every):
    """Step-by-step fetching is the reference; blocks of 4, of 7 (not a divisor) and auto agree exactly."""
    options = dict(epochs=3, lr_decay=0.5, decay_after_epoch=1)
    clipping = Clipping("global", 0.5)
    reference = trainer_for(keras_export_model, regression_npz, fetch_every=1, **options).run(clipping).rows
    blocked = trainer_for(keras_export_model, regression_npz, fetch_every=fetch_every, **options).run(clipping).rows
    assert without_time(blocked) == without_time(reference)
    assert [r["step"] for r in blocked] == list(range(1, 19))
    assert sorted({r["lr"] for r in blocked}) == [0.0125, 0.025, 0.05]


def test_one_trace_per_strategy_whatever_the_threshold_or_block(keras_export_model, regression_npz):
    trainer = trainer_for(keras_export_model, regression_npz, steps=11, fetch_every=None)
    first = trainer.run(Clipping("global", 1.0)).rows
    trainer.run(Clipping("global", 5.0))
    trainer.run(Clipping("norm", 1.0))
    again = trainer.run(Clipping("global", 1.0)).rows
    assert trainer.traces == 2
    assert without_time(again) == without_time(first)  # each run starts from the same state


def test_pipeline_yields_the_batches_of_data_batches(keras_export_model, regression_npz):
    """The prefetching tf.data pipeline holds the rows that gradwatch.load.data.batches lists, epoch by epoch."""
    from gradwatch.load import data as data_mod

    for shuffle in (False, True):
        trainer = trainer_for(keras_export_model, regression_npz, epochs=3, shuffle=shuffle, lr_decay=0.5)
        expected = list(data_mod.batches(trainer.data, 16, trainer.total_steps, shuffle, 3))
        got = list(trainer.pipeline.dataset().as_numpy_iterator())
        assert len(got) == len(expected) == 18
        for (x, y, lr), (epoch, xe, ye) in zip(got, expected):
            np.testing.assert_array_equal(x, xe)
            np.testing.assert_array_equal(y, ye)
            assert lr == np.float32(trainer.options.lr_at(epoch))


def test_on_nonfinite_stop_ends_inside_a_block(module_model, data_dir):
    """With 10 steps a block, the loop still stops right after the first non-finite step."""
    from gradwatch.errors import NonFiniteStop

    x = np.ones((24, 4), np.float32)
    x[8] = np.inf  # batch 3 of 6
    path = data_dir / "inf_in_block.npz"
    np.savez(path, x=x, y=np.ones((24, 1), np.float32))
    stopping = trainer_for(module_model, path, batch_size=4, shuffle=False, on_nonfinite="stop", fetch_every=10,
                           allow_nonfinite_data=True)
    with pytest.raises(NonFiniteStop) as stop:
        stopping.run(Clipping("global", 1.0))
    assert [r["nonfinite"] for r in stop.value.result.rows] == [False, False, True]
    two_steps = trainer_for(module_model, path, batch_size=4, shuffle=False, steps=2, allow_nonfinite_data=True)
    two_steps.run(Clipping("global", 1.0))
    for a, b in zip(stopping.used, two_steps.used):
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # step 3 was skipped, nothing after it ran


def test_xla_step_gives_the_same_numbers(keras_export_model, regression_npz):
    plain = trainer_for(keras_export_model, regression_npz, epochs=2).run(Clipping("global", 0.5)).rows
    compiled = trainer_for(keras_export_model, regression_npz, epochs=2, xla=True).run(Clipping("global", 0.5)).rows
    for column in ("loss", "grad_norm", "clipped_norm"):
        np.testing.assert_allclose([r[column] for r in compiled], [r[column] for r in plain], rtol=1e-5)
    assert [r["clipped"] for r in compiled] == [r["clipped"] for r in plain]


def test_time_ms_is_the_wall_time_of_the_steps(keras_export_model, regression_npz):
    trainer = trainer_for(keras_export_model, regression_npz, steps=40, fetch_every=8)
    start = time.perf_counter()
    rows = trainer.run(Clipping("global", 1.0)).rows
    wall = time.perf_counter() - start
    times = [r["time_ms"] for r in rows]
    assert all(t > 0 for t in times)
    assert sum(times) / 1000.0 <= wall  # blocks are timed inside the run, never double counted
    assert all(len(set(times[k : k + 8])) == 1 for k in range(0, 40, 8))  # one average per fetched block


def test_auto_block_size_grows_towards_a_quarter_second():
    from gradwatch.train.loop import AUTO_BLOCK_MAX, _next_block

    assert _next_block(1, 1.0) == 1  # slow steps: fetch every step
    assert _next_block(1, 0.001) == 2  # at most doubling
    assert _next_block(64, 0.01) == 25  # 0.25 s of 10 ms steps
    assert _next_block(AUTO_BLOCK_MAX, 1e-6) == AUTO_BLOCK_MAX


def test_a_strategy_with_state_gets_it_for_the_variables_with_gradients(module_model, regression_npz, monkeypatch):
    """A stateful strategy (an Optax-style running maximum of the norm) gets init() over the used
    variables, found by tracing the gradient first, and its state is carried from step to step."""
    import tensorflow as tf

    from gradwatch import clip as clipping

    class RunningMaxNorm:
        name, option, summary = "running-max", "norm", "clip to the largest norm of the earlier steps, at most N"

        def init(self, variables):
            return (tf.constant(float("inf")), tf.constant(len(variables), tf.int32))

        def apply(self, grads, threshold, variables, state):
            seen, count = state
            norm = clipping.global_norm(grads)
            cap = tf.minimum(seen, threshold)
            clipped, _ = tf.clip_by_global_norm(grads, cap)
            new_seen = tf.where(tf.math.is_inf(seen), norm, tf.maximum(seen, norm))
            return clipping.ClipResult(list(clipped), norm > cap, (new_seen, count))

    monkeypatch.setitem(clipping.STRATEGIES, "running-max", RunningMaxNorm())
    trainer = trainer_for(module_model, regression_npz, steps=6, shuffle=False, fetch_every=2, lr=1.5)
    rows = trainer.run(clipping.Clipping("running-max", 100.0)).rows
    assert len(trainer.used) == 2 and trainer.skipped == []
    norms = [r["grad_norm"] for r in rows]
    expected = [norms[0]] + [min(norms[k], max(norms[:k])) for k in range(1, 6)]
    np.testing.assert_allclose([r["clipped_norm"] for r in rows], expected, rtol=1e-6)
    assert any(r["clipped"] for r in rows)  # the state carried across blocks of 2 did bind
