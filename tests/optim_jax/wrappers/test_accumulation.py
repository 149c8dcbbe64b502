"""Gradient accumulation: k micro-steps equal one step on their mean; state and sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optim_jax
from optim_jax import base, transforms
from tests import harness

K = 3
GROUPS = 4

OPTIMIZERS = {
    "adam": lambda: optim_jax.adam(0.05),
    "adamw": lambda: optim_jax.adamw(0.05, weight_decay=0.1),
    "sgd_momentum": lambda: optim_jax.sgd(0.05, momentum=0.9, nesterov=True),
    # A schedule: the inner count must advance once per applied step.
    "adam_schedule": lambda: optim_jax.adam(lambda t: 0.05 / (1.0 + t)),
}


def means_of_groups(micro_grads, k):
    return [
        {name: sum(g[name] for g in micro_grads[i : i + k]) / k for name in micro_grads[0]}
        for i in range(0, len(micro_grads), k)
    ]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_accumulation_equals_one_step_on_the_mean(name):
    params = harness.random_params(0)
    micro = harness.random_grads(0, K * GROUPS)
    ours = harness.run_ours(optim_jax.accumulate_gradients(OPTIMIZERS[name](), K), params, micro)
    plain = harness.run_ours(OPTIMIZERS[name](), params, means_of_groups(micro, K))
    for j, want in enumerate(plain):
        harness.assert_close(ours[K * j + K - 1], want, 1e-12, f"[{name} group {j}] ")
        # Between applied steps the parameters do not move at all (bitwise).
        before = params if j == 0 else ours[K * j - 1]
        for i in range(K * j, K * j + K - 1):
            harness.assert_close(ours[i], before, 0.0, f"[{name} micro {i}] ")
    # Sanity: the steps really moved the parameters.
    assert not np.allclose(plain[-1]["matrix"], params["matrix"])


@pytest.mark.parametrize("name", ["adamw", "sgd_momentum"])
def test_matches_optax_multisteps(name):
    params = harness.random_params(1)
    micro = harness.random_grads(1, K * GROUPS)
    ours = harness.run_ours(optim_jax.accumulate_gradients(OPTIMIZERS[name](), K), params, micro)
    # MultiSteps keeps a float32 running mean by default; float64 for a tight comparison
    # (its dtype is canonicalised at construction, hence the x64 context).
    with jax.enable_x64(True):
        multi = optax.MultiSteps(OPTIMIZERS[name](), K, accumulator_dtype=jnp.float64)
    multi = multi.gradient_transformation()
    harness.assert_trajectories_close(ours, harness.run_ours(multi, params, micro), 1e-12, name)


def test_every_k_one_is_the_plain_optimizer():
    params = harness.random_params(2)
    grads = harness.random_grads(2, 4)
    ours = harness.run_ours(optim_jax.accumulate_gradients(optim_jax.adam(0.1), 1), params, grads)
    plain = harness.run_ours(optim_jax.adam(0.1), params, grads)
    harness.assert_trajectories_close(ours, plain, 1e-15, "every_k=1")


def test_state_counters_and_applied_flag():
    params = {"w": jnp.ones((4, 2)), "b": jnp.zeros((2,))}
    tx = optim_jax.accumulate_gradients(optim_jax.adam(0.1), K)
    state = tx.init(params)
    assert not bool(optim_jax.accumulation_step_applied(state))

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    grads = jax.tree.map(jnp.ones_like, params)
    for i in range(1, 2 * K + 2):
        params, state, updates = step(params, state, grads)
        applied = i % K == 0
        assert bool(optim_jax.accumulation_step_applied(state)) == applied
        acc = base.find_state(state, optim_jax.AccumulationState)
        assert int(acc.micro_step) == i % K
        assert int(base.find_state(state, transforms.AdamState).count) == i // K
        want_sum = 0.0 if applied else float(i % K)
        np.testing.assert_array_equal(acc.grad_sum["w"], want_sum)
        if not applied:
            for u in jax.tree.leaves(updates):
                np.testing.assert_array_equal(u, 0.0)


def test_accumulator_dtype():
    params = {"w": jnp.ones((4, 2), jnp.bfloat16), "v": jnp.ones((3,), jnp.float32)}
    state = optim_jax.accumulate_gradients(optim_jax.sgd(0.1), 2).init(params)
    assert state.grad_sum["w"].dtype == jnp.float32
    assert state.grad_sum["v"].dtype == jnp.float32
    tx = optim_jax.accumulate_gradients(optim_jax.sgd(0.1), 2, accumulator_dtype=jnp.bfloat16)
    state = tx.init(params)
    assert state.grad_sum["w"].dtype == jnp.bfloat16
    # bf16 gradients: the float32 sum keeps what a bf16 sum rounds away
    # (256 + 1 rounds to 256 in bf16; the float32 mean 260 / 4 = 65 is exact in bf16).
    for acc_dtype, want in [(None, 65.0), (jnp.bfloat16, 64.5)]:
        tx = optim_jax.accumulate_gradients(optim_jax.sgd(1.0), 4, accumulator_dtype=acc_dtype)
        state = tx.init(params)
        step = jax.jit(tx.update)
        for value in (256.0, 1.0, 1.0, 2.0):
            grads = {"w": jnp.full((4, 2), value, jnp.bfloat16), "v": jnp.zeros((3,))}
            updates, state = step(grads, state, params)
        assert updates["w"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(updates["w"], np.float32), -want)


def test_extra_args_reach_the_inner_transformation():
    def scale_by_extra():
        def update_fn(updates, state, params=None, *, factor):
            return jax.tree.map(lambda u: u * factor, updates), state

        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update_fn)

    tx = optim_jax.accumulate_gradients(scale_by_extra(), 2)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    _, state = tx.update({"w": jnp.ones(3)}, state, params, factor=5.0)
    updates, _ = tx.update({"w": jnp.full(3, 3.0)}, state, params, factor=5.0)
    np.testing.assert_allclose(updates["w"], 10.0)


def test_state_keeps_parameter_sharding():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    shardings = {
        "w": NamedSharding(mesh, P("data", "model")),
        "b": NamedSharding(mesh, P("model")),
    }
    params = {"w": jnp.ones((8, 4)), "b": jnp.zeros((4,))}
    params = jax.device_put(params, shardings)
    tx = optim_jax.accumulate_gradients(optim_jax.adamw(0.1), 2)
    state = jax.jit(tx.init)(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def check(state):
        for name, sharding in shardings.items():
            for buf in (
                state.grad_sum[name],
                base.find_state(state, transforms.AdamState).mu[name],
            ):
                assert buf.sharding.is_equivalent_to(sharding, buf.ndim), (name, buf.sharding)

    check(state)
    grads = jax.device_put(jax.tree.map(jnp.ones_like, params), shardings)
    for _ in range(3):
        params, state = step(params, state, grads)
        check(state)


def test_tree_map_params_sees_every_parameter_buffer():
    # The trainer derives state shardings with optax.tree_map_params (see JAX_NOTES).
    params = {"w": jnp.ones((4, 2)), "b": jnp.zeros(2)}
    tx = optim_jax.skip_not_finite(
        optim_jax.accumulate_gradients(
            optax.chain(optim_jax.clip_by_global_norm(1.0), optim_jax.adam(0.1)), 2
        )
    )
    specs = optax.tree_map_params(
        tx,
        lambda p, spec: spec,
        jax.eval_shape(tx.init, params),
        {"w": "W", "b": "B"},
        transform_non_params=lambda _: "replicated",
    )
    acc = base.find_state(specs, optim_jax.AccumulationState)
    adam = base.find_state(specs, transforms.AdamState)
    assert acc.grad_sum == adam.mu == adam.nu == {"w": "W", "b": "B"}
    assert acc.micro_step == acc.applied == specs.notfinite_count == "replicated"


@pytest.mark.parametrize("bad", [0, -2, 2.5, "3", True, None])
def test_bad_every_k(bad):
    with pytest.raises(ValueError, match="every_k"):
        optim_jax.accumulate_gradients(optim_jax.sgd(0.1), bad)


def test_numpy_integer_every_k_is_accepted():
    tx = optim_jax.accumulate_gradients(optim_jax.sgd(0.1), np.int64(2))
    assert int(tx.init({"w": jnp.zeros(2)}).micro_step) == 0


def test_accumulation_step_applied_needs_the_state():
    with pytest.raises(ValueError, match="AccumulationState"):
        optim_jax.accumulation_step_applied(optim_jax.sgd(0.1).init({"w": jnp.zeros(2)}))
