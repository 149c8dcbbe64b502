"""Clipping: by global norm and by value against torch.nn.utils, AGC against a NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_jax
from optim_jax import clipping
from tests import harness

torch = pytest.importorskip("torch")

# Global norms of the test gradients relative to max_norm = 1: below, at and above it
# (just below 1, torch's +1e-6 already clips).
TARGET_NORMS = [0.01, 0.5, 0.9999995, 1.0, 1.001, 50.0]


def grads_at(norm, seed=0, shapes=harness.LEAF_SHAPES):
    """Random gradients rescaled to the given global norm."""
    grads = harness.random_grads(seed, 1, shapes)[0]
    scale = norm / norm64(grads)
    return {k: scale * v for k, v in grads.items()}


def apply64(tx, grads, params=None):
    """``tx.update`` under jit in float64; returns (updates as NumPy, state)."""
    with jax.enable_x64(True):
        grads = jax.tree.map(jnp.asarray, grads)
        params = grads if params is None else jax.tree.map(jnp.asarray, params)
        state = tx.init(params)
        out, state = jax.jit(tx.update)(grads, state, params)
        return jax.tree.map(np.asarray, out), jax.tree.map(np.asarray, state)


def torch_clip(grads, fn):
    tensors = {}
    for k, g in grads.items():
        t = torch.zeros(g.shape, dtype=torch.float64, requires_grad=True)
        t.grad = torch.tensor(g, dtype=torch.float64)
        tensors[k] = t
    result = fn(list(tensors.values()))
    return {k: t.grad.numpy() for k, t in tensors.items()}, result


def norm64(grads):
    return float(np.sqrt(sum(np.sum(np.square(g)) for g in grads.values())))


@pytest.mark.parametrize("target", TARGET_NORMS)
def test_clip_by_global_norm_matches_torch(target):
    grads = grads_at(target)
    ours, state = apply64(optim_jax.clip_by_global_norm(1.0), grads)
    want, total = torch_clip(grads, lambda ts: torch.nn.utils.clip_grad_norm_(ts, 1.0))
    harness.assert_close(ours, want, 1e-13, "clip_by_global_norm ")
    assert state.pre_clip_norm.dtype == np.float32
    np.testing.assert_allclose(state.pre_clip_norm, float(total), rtol=1e-7)
    np.testing.assert_allclose(state.pre_clip_norm, norm64(grads), rtol=1e-7)
    if norm64(grads) + 1e-6 > 1.0:
        # torch's +1e-6 leaves the clipped norm a hair under max_norm.
        assert norm64(ours) < 1.0
        np.testing.assert_allclose(norm64(ours), 1.0, rtol=1e-5)
    else:
        harness.assert_close(ours, grads, 0.0, "unclipped ")


def test_clip_by_global_norm_differs_from_optax_by_torch_eps():
    grads = grads_at(1.5)
    n = norm64(grads)
    ours, _ = apply64(optim_jax.clip_by_global_norm(1.0), grads)
    theirs, _ = apply64(optax.clip_by_global_norm(1.0), grads)
    for k in grads:
        np.testing.assert_allclose(ours[k], theirs[k] * n / (n + 1e-6), rtol=1e-13)
    # The difference is real: it is larger than float64 rounding.
    assert max(np.max(np.abs(ours[k] - theirs[k])) for k in grads) > 1e-9


def test_clip_by_global_norm_float32_and_low_precision():
    grads = {k: jnp.asarray(v, jnp.float32) for k, v in grads_at(3.0).items()}
    tx = optim_jax.clip_by_global_norm(1.0)
    out, state = jax.jit(tx.update)(grads, tx.init(grads))
    want, _ = torch_clip(
        jax.tree.map(np.asarray, grads), lambda ts: torch.nn.utils.clip_grad_norm_(ts, 1.0)
    )
    harness.assert_close(out, want, 1e-6, "float32 ")
    # float16 squares of 300 overflow float16 (max 65504): the norm must be taken in float32.
    half = {"a": jnp.full((4, 4), 300.0, jnp.float16), "b": jnp.full((3,), -300.0, jnp.bfloat16)}
    out, state = jax.jit(tx.update)(half, tx.init(half))
    assert state.pre_clip_norm.dtype == jnp.float32
    np.testing.assert_allclose(state.pre_clip_norm, 300.0 * np.sqrt(19.0), rtol=1e-6)
    assert out["a"].dtype == jnp.float16 and out["b"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out["a"], np.float64), 1 / np.sqrt(19.0), rtol=1e-3)


@pytest.mark.parametrize("target", [0.1, 10.0, 100.0])
def test_clip_by_value_matches_torch(target):
    grads = grads_at(target)
    ours, state = apply64(optim_jax.clip_by_value(0.5), grads)
    want, _ = torch_clip(grads, lambda ts: torch.nn.utils.clip_grad_value_(ts, 0.5))
    harness.assert_close(ours, want, 0.0, "clip_by_value ")
    np.testing.assert_allclose(state.pre_clip_norm, norm64(grads), rtol=1e-7)


def test_clip_keeps_non_finite_detectable():
    grads = {"a": jnp.array([1.0, jnp.inf]), "b": jnp.array([jnp.nan, 2.0])}
    for tx in (optim_jax.clip_by_global_norm(1.0), optim_jax.clip_by_value(1.0)):
        out, _ = tx.update(grads, tx.init(grads))
        assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))


# --- AGC ---------------------------------------------------------------------------------------

AGC_SHAPES = {
    **harness.LEAF_SHAPES,
    "conv_hwio": (3, 3, 2, 4),
    "rank5": (2, 2, 2, 3, 5),
}


def agc_reference(grads, params, clip, eps):
    """NFNets' unit-wise clipping on PyTorch layouts: units along the FIRST axis (output dim).

    JAX kernels put the output dim last; they are moved to the front, clipped unit by unit
    in a plain loop, and moved back.
    """
    out = {}
    for k, g in grads.items():
        w = params[k]
        if g.ndim <= 1:
            g_units, w_units = [g], [w]
        else:
            g_t, w_t = np.moveaxis(g, -1, 0), np.moveaxis(w, -1, 0)
            g_units, w_units = list(g_t), list(w_t)
        clipped = []
        for gu, wu in zip(g_units, w_units, strict=True):
            max_norm = clip * max(np.sqrt(np.sum(wu**2)), eps)
            g_norm = np.sqrt(np.sum(gu**2))
            clipped.append(gu if g_norm < max_norm else gu * max_norm / max(g_norm, 1e-6))
        out[k] = clipped[0] if g.ndim <= 1 else np.moveaxis(np.stack(clipped), 0, -1)
    return out


def agc_inputs(seed=3):
    rng = np.random.default_rng(seed)
    params = harness.random_params(seed, AGC_SHAPES)
    params["matrix"][:, 1] = 0.0  # a zero-initialised unit: the eps floor decides
    # Per-unit gradient scales spread over three decades: some units clip, others do not.
    grads = {
        k: rng.normal(size=s) * (10.0 ** rng.uniform(-3, 0, size=s[-1:] if len(s) > 1 else ()))
        for k, s in AGC_SHAPES.items()
    }
    return params, grads


@pytest.mark.parametrize("clip, eps", [(0.01, 1e-3), (0.16, 1e-3), (1.0, 0.5)])
def test_adaptive_grad_clip_matches_reference(clip, eps):
    params, grads = agc_inputs()
    ours, state = apply64(optim_jax.adaptive_grad_clip(clip, eps), grads, params)
    want = agc_reference(grads, params, clip, eps)
    harness.assert_close(ours, want, 1e-13, "agc ")
    np.testing.assert_allclose(state.pre_clip_norm, norm64(grads), rtol=1e-7)
    # The case is not trivial: some units are clipped, others pass unchanged.
    assert any(np.any(ours[k] != grads[k]) for k in grads)
    assert any(np.any(ours[k] == grads[k]) for k in grads)


def test_adaptive_grad_clip_matches_optax_except_rank_3():
    # optax (like the NFNets code) reduces a rank-3 tensor over axis 0 only; see the docstring.
    params, grads = agc_inputs(4)
    del params["tensor3"], grads["tensor3"]
    ours, _ = apply64(optim_jax.adaptive_grad_clip(0.05), grads, params)
    theirs, _ = apply64(optax.adaptive_grad_clip(0.05), grads, params)
    harness.assert_close(ours, theirs, 1e-14, "optax agc ")


def test_adaptive_grad_clip_does_not_squeeze():
    # A (1, n) kernel has n units of one weight each; optax squeezes it into one unit.
    params = {"w": np.array([[1.0, 1.0, 1.0]])}
    grads = {"w": np.array([[0.5, 0.001, 0.5]])}
    ours, _ = apply64(optim_jax.adaptive_grad_clip(0.1), grads, params)
    np.testing.assert_allclose(ours["w"], [[0.1, 0.001, 0.1]], rtol=1e-12)


def test_adaptive_grad_clip_bfloat16_and_needs_params():
    params = {"w": jnp.ones((4, 3), jnp.bfloat16)}
    grads = {"w": jnp.full((4, 3), 10.0, jnp.bfloat16)}
    tx = optim_jax.adaptive_grad_clip(0.1)
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out["w"], np.float32), 0.1, rtol=1e-2)
    with pytest.raises(ValueError, match="params"):
        tx.update(grads, tx.init(params))


BAD_ARGUMENTS = [
    (optim_jax.clip_by_global_norm, "max_norm", [0.0, -1.0, float("nan")]),
    (optim_jax.clip_by_value, "max_delta", [0.0, -1.0, float("nan")]),
    (optim_jax.adaptive_grad_clip, "clipping", [0.0, -1.0, float("nan")]),
    (lambda v: optim_jax.adaptive_grad_clip(0.01, eps=v), "eps", [-1e-3, float("nan")]),
]


@pytest.mark.parametrize("make, name, values", BAD_ARGUMENTS)
def test_bad_arguments(make, name, values):
    for bad in values:
        with pytest.raises(ValueError, match=name):
            make(bad)


# --- pre_clip_global_norm ---------------------------------------------------------------------


def test_pre_clip_global_norm_found_through_wrappers():
    params = {k: jnp.asarray(v, jnp.float32) for k, v in harness.random_params(5).items()}
    grads = {k: jnp.asarray(v, jnp.float32) for k, v in grads_at(2.0, seed=5).items()}
    want = norm64(jax.tree.map(np.asarray, grads))
    mask = {k: k != "wide" for k in params}
    masked_norm = norm64({k: np.asarray(g) for k, g in grads.items() if mask[k]})
    cases = {
        "chain": (optax.chain(optim_jax.clip_by_global_norm(1.0), optim_jax.adam(1e-3)), want),
        # Two clippings: the first in the chain is reported (the second sees clipped grads).
        "two": (
            optax.chain(
                optim_jax.clip_by_value(0.1), optim_jax.clip_by_global_norm(1.0), optim_jax.sgd(0.1)
            ),
            want,
        ),
        "masked": (optax.masked(optim_jax.adaptive_grad_clip(0.1), mask), masked_norm),
        "skip": (
            optim_jax.skip_not_finite(
                optax.chain(optim_jax.clip_by_global_norm(1.0), optim_jax.sgd(0.1))
            ),
            want,
        ),
        "accumulate": (
            optim_jax.accumulate_gradients(
                optax.chain(optim_jax.clip_by_global_norm(1.0), optim_jax.adamw(1e-3)), 1
            ),
            want,
        ),
    }
    for name, (tx, expected) in cases.items():
        state = tx.init(params)
        assert float(optim_jax.pre_clip_global_norm(state)) == 0.0

        @jax.jit
        def step(grads, state, tx=tx):
            _, state = tx.update(grads, state, params)
            return state, optim_jax.pre_clip_global_norm(state)

        state, norm = step(grads, state)
        np.testing.assert_allclose(norm, expected, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(optim_jax.pre_clip_global_norm(state), expected, rtol=1e-6)


def test_pre_clip_global_norm_under_accumulation_is_norm_of_mean():
    params = {"w": jnp.zeros((3,))}
    tx = optim_jax.accumulate_gradients(
        optax.chain(optim_jax.clip_by_global_norm(1.0), optim_jax.sgd(0.1)), 2
    )
    state = tx.init(params)
    step = jax.jit(tx.update)
    _, state = step({"w": jnp.array([3.0, 0.0, 0.0])}, state, params)
    assert float(optim_jax.pre_clip_global_norm(state)) == 0.0  # no step applied yet
    _, state = step({"w": jnp.array([1.0, 0.0, 0.0])}, state, params)
    np.testing.assert_allclose(optim_jax.pre_clip_global_norm(state), 2.0, rtol=1e-7)


def test_pre_clip_global_norm_without_clipping():
    with pytest.raises(ValueError, match="ClipState"):
        optim_jax.pre_clip_global_norm(optim_jax.adam(1e-3).init({"w": jnp.zeros(2)}))
    assert clipping.ClipState is optim_jax.ClipState
