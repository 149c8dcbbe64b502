"""Lookahead (optim_jax.lookahead) against Algorithm 1 of Zhang et al. 2019 and optax.

What is proved here:

* 12 steps of lookahead around Adam (k = 5, alpha = 0.5; two synchronisations and two steps
  after) equal a float64 NumPy reference of the paper's Algorithm 1 -- parameters, slow
  weights and Adam's moments after every step, in float64 and (per step) float32;
* the parameter trajectory equals the fast weights of ``optax.lookahead`` (which the loop
  must carry as ``LookaheadParams``) on the same gradients;
* the slow weights are sharded like their parameters under ``jax.jit(tx.init)`` on an
  8-device mesh and ``optax.tree_map_params`` finds them as parameter-shaped state;
* bad ``sync_period`` / ``alpha`` fail at construction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optim_jax
from optim_jax import base, transforms
from tests import harness
from tests.reference import adaptive as adam_reference

K, ALPHA, STEPS = 5, 0.5, 12
LR, B1, B2, EPS = 0.05, 0.9, 0.999, 1e-8


def reference() -> tuple:
    """Algorithm 1: theta_{t,0} = phi_{t-1}; k Adam steps; phi_t = phi + alpha (theta - phi).

    Adam's moments and step count carry on across synchronisations (not reset), as in the
    paper's experiments.
    """
    adam_step = adam_reference.adam_step(lambda t: LR, B1, B2, EPS)

    def init(params):
        return {
            "slow": {k: v.copy() for k, v in params.items()},
            **adam_reference.adam_init(params),
        }

    def step(params, grads, state, t):
        fast, moments = adam_step(params, grads, {"m": state["m"], "v": state["v"]}, t)
        slow = state["slow"]
        if t % K == 0:
            slow = {k: slow[k] + ALPHA * (fast[k] - slow[k]) for k in slow}
            fast = {k: v.copy() for k, v in slow.items()}
        return fast, {"slow": slow, **moments}

    return init, step


def view(opt_state) -> dict:
    adam = base.find_state(opt_state, transforms.AdamState)
    return {
        "slow": base.find_state(opt_state, optim_jax.LookaheadState).slow,
        "m": adam.mu,
        "v": adam.nu,
    }


def test_matches_algorithm_1():
    init, step = reference()
    harness.check_against_reference(
        lambda: optim_jax.lookahead(optim_jax.adam(LR, B1, B2, EPS), K, ALPHA),
        init,
        step,
        view,
        steps=STEPS,
    )


def test_parameters_follow_optax_lookahead_fast_weights():
    params0 = harness.random_params(3)
    grads = harness.random_grads(3, STEPS)
    ours = harness.run_ours(optim_jax.lookahead(optim_jax.adam(LR), K, ALPHA), params0, grads)
    with jax.enable_x64(True):
        tx = optax.lookahead(optax.adam(LR), K, ALPHA, reset_state=False)
        params = optax.LookaheadParams.init_synced(jax.tree.map(jnp.asarray, params0))
        state = tx.init(params)

        @jax.jit
        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        for t, g in enumerate(grads):
            params, state = step(params, state, jax.tree.map(jnp.asarray, g))
            # Same equations, float64, another order of operations: 1e-12 relative.
            harness.assert_close(ours[t], params.fast, 1e-12, f"[step {t + 1}] ")


def test_slow_weights_sharded_like_params():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    shardings = {
        "rows": NamedSharding(mesh, P("x", None)),
        "cols": NamedSharding(mesh, P(None, "x")),
    }
    params = {
        "rows": jax.device_put(jnp.ones((16, 3)), shardings["rows"]),
        "cols": jax.device_put(jnp.ones((3, 16)), shardings["cols"]),
    }
    tx = optim_jax.lookahead(optim_jax.adam(0.1), K, ALPHA)
    with jax.set_mesh(mesh):
        state = jax.jit(tx.init)(params)
    slow = base.find_state(state, optim_jax.LookaheadState).slow
    for name in params:
        assert slow[name].sharding.is_equivalent_to(shardings[name], 2), name
        # Its own buffers: a train step donates params and optimizer state together.
        first_shard = [x.addressable_shards[0].data for x in (slow[name], params[name])]
        assert first_shard[0].unsafe_buffer_pointer() != first_shard[1].unsafe_buffer_pointer()
    # tree_map_params sees the slow weights as parameters (the JAX_NOTES recipe for
    # deriving optimizer-state shardings from the parameters' relies on it).
    replicated = NamedSharding(mesh, P())
    state_shardings = optax.tree_map_params(
        tx,
        lambda p, s: s,
        jax.eval_shape(tx.init, params),
        shardings,
        transform_non_params=lambda _: replicated,
    )
    mapped = base.find_state(state_shardings, optim_jax.LookaheadState)
    assert mapped.slow == shardings
    assert mapped.count == replicated


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"sync_period": 0}, "sync_period"), ({"alpha": 0.0}, "alpha"), ({"alpha": 1.5}, "alpha")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim_jax.lookahead(optim_jax.sgd(0.1), **kwargs)
