"""Skipping non-finite steps: params and inner state bitwise untouched, counters, composition."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_jax
from optim_jax import base, transforms
from tests import harness

STEPS = 8
# Step index (0-based) -> (leaf, bad value): one bad entry in one leaf, or several steps in a row.
BAD_STEPS = {
    2: ("matrix", np.nan),
    4: ("scalar", np.inf),
    5: ("tensor3", -np.inf),
    6: ("wide", np.nan),
}


def poisoned_grads(seed=0, steps=STEPS, bad=BAD_STEPS):
    grads = harness.random_grads(seed, steps)
    for t, (leaf, value) in bad.items():
        g = grads[t][leaf].copy()
        g.reshape(-1)[-1] = value
        grads[t][leaf] = g
    return grads


def assert_bitwise_equal(a, b, what):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype, what
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), what


@pytest.mark.parametrize(
    "make", [lambda: optim_jax.adamw(0.05), lambda: optim_jax.sgd(0.05, momentum=0.9)]
)
def test_skipped_steps_leave_params_and_state_bitwise_unchanged(make):
    params0 = harness.random_params(0)
    grads = poisoned_grads()
    history = harness.run_with_states(optim_jax.skip_not_finite(make()), params0, grads, np.float32)
    assert 0 not in BAD_STEPS
    consecutive, total = 0, 0
    for t, (params, state) in enumerate(history):
        bad = t in BAD_STEPS
        consecutive, total = (consecutive + 1, total + 1) if bad else (0, total)
        assert int(state.notfinite_count) == consecutive, t
        assert int(state.total_skipped) == total, t
        assert bool(state.last_step_finite) == (not bad), t
        if bad:
            prev_params, prev_state = history[t - 1]
            assert_bitwise_equal(params, prev_params, f"params at step {t}")
            assert_bitwise_equal(state.inner_state, prev_state.inner_state, f"state at step {t}")
        for leaf in jax.tree.leaves(params):
            assert np.all(np.isfinite(leaf))
    counts = optim_jax.nonfinite_skip_counts(history[-1][1])
    assert (int(counts[0]), int(counts[1])) == (0, len(BAD_STEPS))


def test_finite_steps_follow_the_plain_optimizer():
    params0 = harness.random_params(1)
    grads = poisoned_grads(1)
    finite = [g for t, g in enumerate(grads) if t not in BAD_STEPS]
    ours = [
        p
        for p, _ in harness.run_with_states(
            optim_jax.skip_not_finite(optim_jax.adam(0.05)), params0, grads, np.float64
        )
    ]
    ours = [p for t, p in enumerate(ours) if t not in BAD_STEPS]
    plain = harness.run_ours(optim_jax.adam(0.05), params0, finite)
    harness.assert_trajectories_close(ours, plain, 1e-13, "skip vs plain")
    # The inner count only counts the applied steps.
    tx = optim_jax.skip_not_finite(optim_jax.adam(0.05))
    state = harness.run_with_states(tx, params0, grads, np.float32)[-1][1]
    assert int(base.find_state(state, transforms.AdamState).count) == len(finite)


def test_matches_optax_apply_if_finite_below_its_limit():
    params0 = harness.random_params(2)
    grads = poisoned_grads(2)
    ours = harness.run_ours(optim_jax.skip_not_finite(optim_jax.adamw(0.05)), params0, grads)
    theirs = harness.run_ours(optax.apply_if_finite(optim_jax.adamw(0.05), 100), params0, grads)
    harness.assert_trajectories_close(ours, theirs, 1e-13, "apply_if_finite")


def test_inside_chain_after_clipping():
    # Clipping maps an infinite gradient to NaN (inf * 0); the skip still sees it.
    tx = optax.chain(
        optim_jax.clip_by_global_norm(1.0), optim_jax.skip_not_finite(optim_jax.sgd(0.1))
    )
    params0 = harness.random_params(3)
    grads = poisoned_grads(3, steps=5, bad={1: ("vector", np.inf), 3: ("matrix", np.nan)})
    history = harness.run_with_states(tx, params0, grads, np.float32)
    assert_bitwise_equal(history[1][0], history[0][0], "params after inf")
    assert_bitwise_equal(history[3][0], history[2][0], "params after nan")
    assert not np.array_equal(history[2][0]["matrix"], history[1][0]["matrix"])
    skip_state = base.find_state(history[-1][1], optim_jax.SkipNotFiniteState)
    assert int(skip_state.total_skipped) == 2 and int(skip_state.notfinite_count) == 0


def test_skip_outside_accumulation_drops_only_the_bad_micro_batch():
    k = 2
    params0 = harness.random_params(4)
    grads = poisoned_grads(4, steps=6, bad={1: ("vector", np.nan)})
    tx = optim_jax.skip_not_finite(optim_jax.accumulate_gradients(optim_jax.adam(0.05), k))
    ours = harness.run_ours(tx, params0, grads)
    # Same as accumulating the finite micro-batches only: groups {0, 2}, {3, 4}, then 5 pending.
    finite = [g for t, g in enumerate(grads) if t != 1]
    want = harness.run_ours(
        optim_jax.accumulate_gradients(optim_jax.adam(0.05), k), params0, finite
    )
    harness.assert_trajectories_close(ours[:1] + ours[2:], want, 1e-13, "skip(accumulate)")
    assert_bitwise_equal(ours[1], ours[0], "bad micro-step")


def test_skip_inside_accumulation_drops_the_whole_step():
    k = 2
    params0 = harness.random_params(5)
    grads = poisoned_grads(5, steps=6, bad={2: ("vector", np.nan)})
    tx = optim_jax.accumulate_gradients(optim_jax.skip_not_finite(optim_jax.adam(0.05)), k)
    ours = harness.run_with_states(tx, params0, grads, np.float64)
    # The group {2, 3} is dropped; the sum is cleared, so group {4, 5} is clean.
    assert_bitwise_equal(ours[3][0], ours[1][0], "dropped group")
    means = [{n: (grads[i][n] + grads[i + 1][n]) / 2 for n in grads[0]} for i in (0, 4)]
    plain = harness.run_ours(optim_jax.adam(0.05), params0, means)
    harness.assert_close(ours[1][0], plain[0], 1e-13, "group 0 ")
    harness.assert_close(ours[5][0], plain[1], 1e-13, "group 2 ")
    skip_state = base.find_state(ours[5][1], optim_jax.SkipNotFiniteState)
    assert int(skip_state.total_skipped) == 1
    acc_state = base.find_state(ours[3][1], optim_jax.AccumulationState)
    for leaf in jax.tree.leaves(acc_state.grad_sum):
        np.testing.assert_array_equal(leaf, 0.0)


def test_all_finite_and_counts_helper():
    from optim_jax.base import all_finite

    assert bool(all_finite({"a": jnp.ones(3), "b": jnp.zeros((2, 2))}))
    assert not bool(all_finite({"a": jnp.ones(3), "b": jnp.array([0.0, jnp.inf])}))
    assert not bool(all_finite([jnp.array(jnp.nan, jnp.bfloat16)]))
    assert bool(all_finite({}))
    with pytest.raises(ValueError, match="SkipNotFiniteState"):
        optim_jax.nonfinite_skip_counts(optim_jax.sgd(0.1).init({"w": jnp.zeros(2)}))
