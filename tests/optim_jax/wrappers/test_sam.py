"""SAM and ASAM (optim_jax.sam) against a float64 NumPy reference written from the papers.

What is proved here:

* two SAM steps around SGD with momentum on a small logistic regression equal a hand
  computation in float64 NumPy (gradient by hand, ``e = rho g / ||g||``, gradient at
  ``w + e``, then the torch SGD rule), for plain SAM and for ASAM with ``eta = 0`` and
  ``eta = 0.01`` (``e = rho T^2 g / ||T g||``, ``T = |w| + eta``); float32 agrees per step;
* with ``rho = 0`` the wrapper is the base optimizer (Adam) given ``grad_fn(params)``;
* a zero gradient gives a zero perturbation (no NaN); bfloat16 parameters reach
  ``grad_fn`` as bfloat16; a missing ``grad_fn`` or ``params`` is a clear error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_jax
from tests import harness
from tests.reference import sgd as sgd_reference

LR, MOMENTUM, RHO = 0.5, 0.9, 0.3
EPS = 1e-12  # the wrapper's default, in the denominator of e


def logistic_problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(12, 4))
    labels = (rng.uniform(size=12) < 0.5).astype(np.float64)
    params = {"w": rng.normal(size=4), "b": np.asarray(rng.normal())}
    return features, labels, params


def numpy_gradient(params: dict, features: np.ndarray, labels: np.ndarray) -> dict:
    """The mean logistic loss's gradient, by hand: X^T (sigmoid(Xw + b) - y) / n."""
    residual = 1.0 / (1.0 + np.exp(-(features @ params["w"] + params["b"]))) - labels
    return {"w": features.T @ residual / len(labels), "b": np.asarray(residual.mean())}


def reference_sam_gradient(params, features, labels, adaptive, eta) -> dict:
    """Foret et al. Algorithm 1 (p = 2) / Kwon et al. eq. 9: the gradient at w + e."""
    g = numpy_gradient(params, features, labels)
    if adaptive:
        stretch = {k: np.abs(v) + eta for k, v in params.items()}
        norm = np.sqrt(sum(np.sum((stretch[k] * g[k]) ** 2) for k in g))
        e = {k: RHO * stretch[k] ** 2 * g[k] / (norm + EPS) for k in g}
    else:
        norm = np.sqrt(sum(np.sum(g[k] ** 2) for k in g))
        e = {k: RHO * g[k] / (norm + EPS) for k in g}
    return numpy_gradient({k: params[k] + e[k] for k in params}, features, labels)


def jax_grad_fn(features, labels):
    def loss(params):
        logits = features @ params["w"] + params["b"]
        return jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits)

    return jax.grad(loss)


def run_sam(tx, params0, features, labels, steps, dtype):
    """``steps`` jitted SAM updates in ``dtype``; the parameters after each, as float64."""
    with jax.enable_x64(dtype == np.float64):
        x, y = jnp.asarray(features, dtype), jnp.asarray(labels, dtype)
        grad_fn = jax_grad_fn(x, y)
        params = jax.tree.map(lambda v: jnp.asarray(v, dtype), params0)
        state = tx.init(params)

        @jax.jit
        def step(params, state):
            updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
            return optax.apply_updates(params, updates), state

        out = []
        for _ in range(steps):
            params, state = step(params, state)
            out.append(jax.tree.map(lambda v: np.asarray(v, np.float64), params))
        return out


@pytest.mark.parametrize(
    ("adaptive", "eta"), [(False, 0.0), (True, 0.0), (True, 0.01)], ids=["sam", "asam", "asam_eta"]
)
def test_two_steps_match_numpy_reference(adaptive, eta):
    features, labels, params0 = logistic_problem()
    ref_init, ref_step = sgd_reference.make(lambda t: LR, momentum=MOMENTUM)
    want, plain = [], []
    params, state = params0, ref_init(params0)
    for t in (1, 2):
        g_sam = reference_sam_gradient(params, features, labels, adaptive, eta)
        plain.append(ref_step(params, numpy_gradient(params, features, labels), state, t)[0])
        params, state = ref_step(params, g_sam, state, t)
        want.append(params)
    # The perturbation matters on this problem: SAM's first step is far from plain SGD's.
    assert np.max(np.abs(want[0]["w"] - plain[0]["w"])) > 1e-3

    def make_tx():
        return optim_jax.sam(optim_jax.sgd(LR, momentum=MOMENTUM), RHO, adaptive, eta)

    # float64: same equations in another order; rounding differences ~1e-15 per operation.
    ours = run_sam(make_tx(), params0, features, labels, 2, np.float64)
    harness.assert_trajectories_close(ours, want, 1e-12, "float64")
    # float32: two steps of ~6e-8 rounding per operation, well inside the library's 1e-5 bar.
    ours32 = run_sam(make_tx(), params0, features, labels, 2, np.float32)
    harness.assert_trajectories_close(ours32, want, 1e-5, "float32")


def test_rho_zero_is_the_base_optimizer():
    features, labels, params0 = logistic_problem(1)
    tx_sam = optim_jax.sam(optim_jax.adam(0.1), 0.0)
    with_sam = run_sam(tx_sam, params0, features, labels, 5, np.float64)
    with jax.enable_x64(True):
        grad_fn = jax_grad_fn(jnp.asarray(features), jnp.asarray(labels))
        tx = optim_jax.adam(0.1)
        params = jax.tree.map(jnp.asarray, params0)
        state = tx.init(params)

        @jax.jit
        def step(params, state):
            updates, state = tx.update(grad_fn(params), state, params)
            return optax.apply_updates(params, updates), state

        for t in range(5):
            before = params
            params, state = step(params, state)
            # e = 0 exactly, so w + e = w and the gradient is the same; only XLA's fusion of
            # two different programs may reorder float64 operations (~1e-16 each), judged
            # against the parameter's size before the step (b passes near zero).
            harness.assert_close(with_sam[t], params, 1e-13, f"[step {t + 1}] ", before)


def test_zero_gradient_gives_zero_perturbation():
    params = {"w": jnp.arange(3.0), "b": jnp.zeros(())}
    for adaptive in (False, True):
        e = optim_jax.wrappers.sam_perturbation(
            jax.tree.map(jnp.zeros_like, params), params, 0.05, adaptive
        )
        for leaf in jax.tree.leaves(e):
            assert np.all(np.asarray(leaf) == 0.0)


def test_bfloat16_params_reach_grad_fn_as_bfloat16_and_errors():
    params = {"w": jnp.ones((3,), jnp.bfloat16)}
    seen = []

    def grad_fn(p):
        seen.append(p["w"].dtype)
        return jax.tree.map(lambda v: 2 * v, p)

    tx = optim_jax.sam(optim_jax.sgd(0.1), 0.05)
    state = tx.init(params)
    updates, _ = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
    assert seen == [jnp.bfloat16, jnp.bfloat16]
    assert updates["w"].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(params, state, params)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, state, grad_fn=grad_fn)
    with pytest.raises(ValueError, match="rho"):
        optim_jax.sam(optim_jax.sgd(0.1), -1.0)
