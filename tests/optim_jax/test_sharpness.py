"""Sharpness from Hessian-vector products, checked against the dense Hessian.

What is proved here, each against an independent float64 reference (``jax.hessian`` of
the flattened parameters, or a matrix built with a chosen spectrum, diagonalised by
NumPy):

* Lanczos' largest Ritz value is the top Hessian eigenvalue of a small tanh MLP
  (180 parameters), in float64 and in float32; with as many steps as parameters it
  returns the whole spectrum (which needs the full reorthogonalisation: the plain
  three-term recurrence loses orthogonality and repeats converged eigenvalues);
* power iteration finds the eigenvalue of largest magnitude, with its sign, also when
  it is negative;
* Hutchinson's trace is exact (standard error 0) for a diagonal Hessian, and on the MLP
  lies within 4 standard errors of the dense trace, with a standard error that matches
  the exact one, ``sqrt(2 (||H||_F^2 - sum_i H_ii^2) / S)`` for Rademacher probes;
* all of it runs under ``jax.jit``, and bad iteration counts are refused.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from optim_jax import hessian


def mlp_loss(params: dict, inputs: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of a one-hidden-layer tanh MLP: smooth, with an
    indefinite Hessian (some eigenvalues negative) away from a minimum."""
    hidden = jnp.tanh(inputs @ params["w1"] + params["b1"])
    logits = hidden @ params["w2"] + params["b2"]
    picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)


def mlp_problem(dtype) -> tuple[dict, jax.Array, jax.Array]:
    """6 inputs -> 16 tanh units -> 4 classes: 6*16 + 16 + 16*4 + 4 = 180 parameters."""
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.normal(size=(6, 16)) / np.sqrt(6),
        "b1": np.zeros(16),
        "w2": rng.normal(size=(16, 4)) / 4,
        "b2": np.zeros(4),
    }
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    inputs = jnp.asarray(rng.normal(size=(64, 6)), dtype)
    labels = jnp.asarray(rng.integers(0, 4, size=64))
    return params, inputs, labels


def dense_hessian(loss, params, *args) -> np.ndarray:
    """The full Hessian in float64 over the flattened parameters (call under enable_x64)."""
    flat, unravel = ravel_pytree(jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params))
    args64 = [jnp.asarray(a, jnp.float64) if a.dtype.kind == "f" else a for a in args]
    matrix = np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f), *args64)))(flat))
    return (matrix + matrix.T) / 2  # symmetric up to rounding; eigvalsh reads one triangle


@functools.cache
def mlp_dense_hessian() -> np.ndarray:
    """The MLP problem's dense float64 Hessian, computed once for the module."""
    with jax.enable_x64(True):
        params, inputs, labels = mlp_problem(jnp.float64)
        return dense_hessian(mlp_loss, params, inputs, labels)


def quadratic(params: dict, matrix: jax.Array) -> jax.Array:
    """``x^T A x / 2`` over the parameters flattened: the Hessian is exactly ``A``."""
    x = jnp.concatenate([params["a"].ravel(), params["b"].ravel()])
    return 0.5 * x @ matrix @ x


def matrix_with_spectrum(eigenvalues: np.ndarray, seed: int) -> np.ndarray:
    """``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q`` (NumPy, float64)."""
    size = len(eigenvalues)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(size, size)))
    return (q * eigenvalues) @ q.T


QUADRATIC_PARAMS = {"a": np.ones((3, 4)), "b": np.ones(6)}  # 18 coordinates


def test_lanczos_top_eigenvalue_matches_the_dense_hessian_in_float64():
    with jax.enable_x64(True):
        params, inputs, labels = mlp_problem(jnp.float64)
        want = np.linalg.eigvalsh(mlp_dense_hessian())
        run = jax.jit(
            lambda p, key: hessian.lanczos(mlp_loss, p, key, inputs, labels, num_iters=20)
        )
        result = run(params, jax.random.key(1))
        assert result.ritz_values.dtype == jnp.float64
        # Kaniel-Paige-Saad: lambda_1 - theta_1 <= spread * (tan(angle_0) / T_19(1 + 2 gap))^2.
        # Here (dense spectrum) spread ~1.0, relative gap (l1 - l2) / (l2 - ln) ~0.16, so
        # T_19(1.33) ~ 1.8e6 and, with tan^2 ~ d = 180 for a random start, the bound is ~5e-11.
        np.testing.assert_allclose(result.ritz_values[-1], want[-1], rtol=1e-9)
        # Ritz values interlace the spectrum: none outside [lambda_min, lambda_max].
        assert (
            want[0] - 1e-12 <= result.ritz_values[0] and result.ritz_values[-1] <= want[-1] + 1e-12
        )


def test_lanczos_in_float32_matches_the_float64_dense_top_eigenvalue():
    want = np.linalg.eigvalsh(mlp_dense_hessian())[-1]
    params, inputs, labels = mlp_problem(jnp.float32)
    top = jax.jit(lambda p, key: hessian.top_eigenvalue_lanczos(mlp_loss, p, key, inputs, labels))(
        params, jax.random.key(2)
    )
    assert top.dtype == jnp.float32
    # float32 rounding (eps 1.2e-7) of a 64-example HVP and 180-term inner products, on a
    # well-separated top eigenvalue: 1e-5 relative leaves ~100x margin over what it does.
    np.testing.assert_allclose(float(top), want, rtol=1e-5)


def test_lanczos_with_as_many_steps_as_parameters_returns_the_whole_spectrum():
    # Clustered values (1.0, 1.0 + 1e-3, ...) next to well separated ones: without
    # reorthogonalisation the converged extremes come back as ghosts and crowd these out.
    eigenvalues = np.concatenate([[-3.0, -0.5], 1.0 + 1e-3 * np.arange(8), [2.0, 5.0, 7.5]])
    eigenvalues = np.concatenate([eigenvalues, np.linspace(10, 40, 5)])
    assert len(eigenvalues) == 18
    with jax.enable_x64(True):
        matrix = jnp.asarray(matrix_with_spectrum(eigenvalues, seed=3))
        params = jax.tree.map(jnp.asarray, QUADRATIC_PARAMS)
        result = jax.jit(lambda p, k: hessian.lanczos(quadratic, p, k, matrix, num_iters=18))(
            params, jax.random.key(0)
        )
        # Float64 with an orthonormal basis: T is A in another basis up to ~1e-15 * ||A||.
        np.testing.assert_allclose(result.ritz_values, np.sort(eigenvalues), atol=1e-9)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_power_iteration_finds_the_eigenvalue_of_largest_magnitude(sign):
    # |lambda_2 / lambda_1| = 0.5: after 60 products the error is ~ 0.5**120, nothing.
    eigenvalues = np.concatenate([[sign * 8.0, -4.0, 4.0], np.linspace(-3, 3, 15)])
    with jax.enable_x64(True):
        matrix = jnp.asarray(matrix_with_spectrum(eigenvalues, seed=4))
        params = jax.tree.map(jnp.asarray, QUADRATIC_PARAMS)
        value, vector = jax.jit(
            lambda p, k: hessian.top_eigenvalue_power(quadratic, p, k, matrix, num_iters=60)
        )(params, jax.random.key(5))
        np.testing.assert_allclose(float(value), sign * 8.0, rtol=1e-12)
        # The returned vector is that eigenvector: A v = lambda v.
        flat = np.concatenate([np.ravel(vector["a"]), np.ravel(vector["b"])])
        np.testing.assert_allclose(np.asarray(matrix) @ flat, sign * 8.0 * flat, atol=1e-10)
        assert abs(np.linalg.norm(flat) - 1) < 1e-12


def test_power_iteration_matches_the_dense_hessian_of_the_mlp():
    with jax.enable_x64(True):
        params, inputs, labels = mlp_problem(jnp.float64)
        want = np.linalg.eigvalsh(mlp_dense_hessian())
        largest = want[np.argmax(np.abs(want))]
        ratio = abs(want[np.argsort(np.abs(want))[-2]] / largest)
        assert ratio < 0.85  # measured 0.82; what the tolerance below relies on
        # Rayleigh-quotient error <= spread * tan^2(angle_0) * ratio**(2k): with k = 100,
        # 0.85**200 * d ~ 1e-12 for a random start in d = 180 dimensions.
        value, _ = jax.jit(
            lambda p, k: hessian.top_eigenvalue_power(mlp_loss, p, k, inputs, labels, num_iters=100)
        )(params, jax.random.key(6))
        np.testing.assert_allclose(float(value), largest, rtol=1e-9)


def test_hutchinson_trace_is_exact_for_a_diagonal_hessian():
    diagonal = np.linspace(-2.0, 5.0, 18)
    with jax.enable_x64(True):
        params = jax.tree.map(jnp.asarray, QUADRATIC_PARAMS)
        result = jax.jit(
            lambda p, k, m: hessian.hutchinson_trace(quadratic, p, k, m, num_samples=5)
        )(params, jax.random.key(7), jnp.diag(diagonal))
        # u^T D u = sum_i D_ii u_i^2 = tr(D) for every sign vector u: no randomness left.
        np.testing.assert_allclose(np.asarray(result.samples), diagonal.sum(), rtol=1e-13)
        assert float(result.standard_error) < 1e-12


def test_hutchinson_trace_is_within_its_standard_error_of_the_dense_trace():
    samples = 400
    with jax.enable_x64(True):
        params, inputs, labels = mlp_problem(jnp.float64)
        matrix = mlp_dense_hessian()
        result = jax.jit(
            lambda p, k: hessian.hutchinson_trace(
                mlp_loss, p, k, inputs, labels, num_samples=samples
            )
        )(params, jax.random.key(8))
    # Exact per-probe variance for Rademacher u: 2 * sum_{i != j} H_ij^2.
    exact_se = np.sqrt(2 * (np.sum(matrix**2) - np.sum(np.diag(matrix) ** 2)) / samples)
    # 4 standard errors: a miss by chance has probability ~6e-5 (near-normal mean of 400).
    assert abs(float(result.estimate) - np.trace(matrix)) <= 4 * exact_se
    # The reported (sample) standard error estimates the exact one; with 400 probes its own
    # relative spread is a few percent, so 20% is a wide margin that still catches a missing
    # sqrt(S) (a factor 20) or a standard deviation of the wrong quantity.
    np.testing.assert_allclose(float(result.standard_error), exact_se, rtol=0.2)


def test_one_probe_has_no_standard_error_and_bad_counts_are_refused():
    params = jax.tree.map(jnp.asarray, QUADRATIC_PARAMS)
    matrix = jnp.eye(18)
    one = hessian.hutchinson_trace(quadratic, params, jax.random.key(0), matrix, num_samples=1)
    assert float(one.estimate) == pytest.approx(18.0) and np.isnan(float(one.standard_error))
    for fn, name in (
        (hessian.lanczos, "num_iters"),
        (hessian.top_eigenvalue_power, "num_iters"),
        (hessian.hutchinson_trace, "num_samples"),
    ):
        with pytest.raises(ValueError, match=name):
            fn(quadratic, params, jax.random.key(0), matrix, **{name: 0})
