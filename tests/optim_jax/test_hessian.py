"""Hessian-diagonal estimators: exactness where the math says so, else the exact mean and variance.

Monte Carlo checks use a fixed seed and a tolerance of 5 standard errors computed
from the estimator's exact variance (not the sample's), so a failure means a bias
and not bad luck: per coordinate the chance of a 5-sigma miss is below 1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optim_jax import hessian

SIGMAS = 5.0


def flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def assert_within_sigmas(mean, want, var, num_samples):
    """``|mean - want| <= 5 * sqrt(var / n)``, plus float32 rounding of the average."""
    tol = SIGMAS * np.sqrt(var / num_samples) + 1e-5 * np.abs(want)
    err = np.abs(mean - want)
    assert np.all(err <= tol), (err / tol).max()


# --- Hutchinson --------------------------------------------------------------------------

PARAMS = {"w": jnp.ones((3, 4)), "b": jnp.zeros(5), "s": jnp.asarray(0.5)}  # 18 coordinates


def quadratic(params, matrix):
    x = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(params)])
    return 0.5 * x @ matrix @ x


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    """``u * (a * u) = a`` for any sign vector ``u``: every single probe gives diag(A)."""
    a = jnp.linspace(-2.0, 3.0, 18)
    for seed in range(3):
        est = hessian.hutchinson_diag(quadratic, PARAMS, jax.random.key(seed), jnp.diag(a))
        np.testing.assert_allclose(flat(est), a, rtol=1e-6)


def test_hutchinson_is_exact_for_a_separable_non_quadratic_loss():
    """``sum(c * cos(x))`` has the diagonal Hessian ``-c * cos(x)``, negative entries included."""
    c = jnp.arange(1.0, 19.0)

    def loss(params):
        x = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(params)])
        return jnp.sum(c * jnp.cos(x + jnp.arange(18.0)))

    est = hessian.hutchinson_diag(loss, PARAMS, jax.random.key(0), num_samples=3)
    x = flat(PARAMS) + np.arange(18.0)
    np.testing.assert_allclose(flat(est), -np.arange(1.0, 19.0) * np.cos(x), rtol=1e-5, atol=1e-5)


def test_hutchinson_average_converges_to_the_diagonal():
    """Dense symmetric A: coordinate i of one probe is ``A_ii + sum_{j != i} A_ij u_i u_j``,
    whose terms are uncorrelated with variance ``A_ij**2``; the average of n probes has
    variance ``sum_{j != i} A_ij**2 / n``."""
    rng = np.random.default_rng(0)
    m = rng.normal(size=(18, 18))
    a = (m + m.T) / 2 + np.diag(rng.uniform(4, 6, size=18))
    n = 4000
    est = jax.jit(hessian.hutchinson_diag, static_argnums=0, static_argnames="num_samples")(
        quadratic, PARAMS, jax.random.key(1), jnp.asarray(a, jnp.float32), num_samples=n
    )
    var = (a**2).sum(axis=1) - np.diag(a) ** 2
    assert_within_sigmas(flat(est), np.diag(a), var, n)
    # The bar is tight enough to see a bias: 5 standard errors are under 12% of min |A_ii|.
    assert SIGMAS * np.sqrt(var.max() / n) < 0.12 * np.abs(np.diag(a)).min()


def test_hutchinson_returns_float32_for_bfloat16_params():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    a = jnp.linspace(1.0, 2.0, 18)

    def loss(p):
        x = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(p)]).astype(jnp.float32)
        return 0.5 * jnp.sum(a * x * x)

    est = hessian.hutchinson_diag(loss, params, jax.random.key(0), num_samples=2)
    assert jax.tree.structure(est) == jax.tree.structure(params)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(est))
    # The Hessian-vector product comes back in the parameters' bfloat16 (8-bit mantissa).
    np.testing.assert_allclose(flat(est), a, rtol=2**-8)


# --- Gauss-Newton-Bartlett ---------------------------------------------------------------


def gnb_moments(jac, probs):
    """Exact mean and variance of the GNB estimate, per coordinate, in float64.

    ``jac[b, c, i] = d logit_{b,c} / d theta_i`` and ``probs[b]`` the softmax of example
    b. With ``e_b = p_b - onehot(yhat_b)`` and ``X_b = jac[b, :, i] . e_b``, the estimate
    of coordinate i is ``Z**2 / B`` for ``Z = sum_b X_b``; the X_b are independent with
    mean 0. So ``E = sum_b E[X_b^2] / B`` and
    ``E[Z^4] = sum_b E[X_b^4] + 3 sum_{b != b'} E[X_b^2] E[X_b'^2]``; each moment of
    ``X_b`` is a sum over the ``num_classes`` possible labels.
    """
    num_labels = probs.shape[0]
    # x[b, y, i]: the value of X_b when the sampled label is y.
    x = np.einsum("bci,bc->bi", jac, probs)[:, None, :] - jac
    m2 = np.einsum("by,byi->bi", probs, x**2)
    m4 = np.einsum("by,byi->bi", probs, x**4)
    ez2 = m2.sum(axis=0)
    ez4 = m4.sum(axis=0) + 3 * (ez2**2 - (m2**2).sum(axis=0))
    return ez2 / num_labels, (ez4 - ez2**2) / num_labels**2


def ggn_diagonal(jac, probs):
    """``diag((1/B) sum_b J_b^T (diag(p_b) - p_b p_b^T) J_b)``, written independently."""
    s = np.einsum("bc,cd->bcd", probs, np.eye(probs.shape[1])) - np.einsum(
        "bc,bd->bcd", probs, probs
    )
    return np.einsum("bci,bcd,bdi->i", jac, s, jac) / probs.shape[0]


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def linear_logits(params, inputs):
    return inputs @ params["w"] + params["b"]


def linear_problem(num_labels=6, dim=4, classes=5):
    rng = np.random.default_rng(0)
    params = {"b": rng.normal(size=classes) * 0.5, "w": rng.normal(size=(dim, classes))}
    inputs = rng.normal(size=(num_labels, dim))
    return params, inputs


def linear_jacobian(inputs, classes):
    """d logits / d (b, w) of ``x @ w + b``, by hand, with params flattened as jax.tree orders
    them (``b`` then ``w``, row-major)."""
    num_labels, dim = inputs.shape
    eye = np.eye(classes)
    jac_b = np.broadcast_to(eye, (num_labels, classes, classes))
    # d z_{b,c} / d w_{i,c'} = x_{b,i} [c == c']
    jac_w = np.einsum("bi,cd->bcid", inputs, eye).reshape(num_labels, classes, dim * classes)
    return np.concatenate([jac_b, jac_w], axis=2)


def sample_estimates(logits_fn, params, inputs, n, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    estimate = lambda k: hessian.gauss_newton_bartlett_diag(logits_fn, params, k, inputs)  # noqa: E731
    samples = jax.jit(jax.vmap(estimate))(keys)
    return np.stack([flat(jax.tree.map(lambda x, i=i: x[i], samples)) for i in range(n)])


def test_gnb_mean_is_the_gauss_newton_diagonal_of_the_mean_loss():
    """Linear softmax model, B = 6 examples, 5 classes: the average of 4000 estimates
    matches the exact diag of the Gauss-Newton matrix of the *mean* cross-entropy
    within 5 exact standard errors. The factor B matters: without it the estimate
    would be 6 times too small, far outside the bar (asserted)."""
    params, inputs = linear_problem()
    probs = softmax(inputs @ params["w"] + params["b"])
    jac = linear_jacobian(inputs, 5)
    mean, var = gnb_moments(jac, probs)
    np.testing.assert_allclose(mean, ggn_diagonal(jac, probs), rtol=1e-12)

    n = 4000
    as32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    samples = sample_estimates(linear_logits, as32, jnp.asarray(inputs, jnp.float32), n)
    assert np.all(samples >= 0)
    assert_within_sigmas(samples.mean(axis=0), mean, var, n)
    # The sample variance agrees with the exact one (a check on the test's own algebra).
    np.testing.assert_allclose(samples.var(axis=0), var, rtol=0.25)
    assert np.all(SIGMAS * np.sqrt(var / n) < 0.5 * (1 - 1 / 6) * mean)


def mlp_logits(params, inputs):
    hidden = jnp.tanh(inputs @ params["w1"] + params["b1"])
    return hidden @ params["w2"]


def test_gnb_mean_matches_the_gauss_newton_diagonal_of_an_mlp():
    """Same check for a 3-4-3 tanh MLP, the Jacobian taken by ``jax.jacobian`` in float64."""
    rng = np.random.default_rng(1)
    params = {
        "b1": rng.normal(size=4) * 0.1,
        "w1": rng.normal(size=(3, 4)),
        "w2": rng.normal(size=(4, 3)),
    }
    inputs = rng.normal(size=(8, 3))
    with jax.enable_x64(True):
        p64 = jax.tree.map(jnp.asarray, params)
        logits = np.asarray(mlp_logits(p64, jnp.asarray(inputs)))
        jac_tree = jax.jacobian(mlp_logits)(p64, jnp.asarray(inputs))
        jac = np.concatenate(
            [np.asarray(j).reshape(8, 3, -1) for j in jax.tree.leaves(jac_tree)], axis=2
        )
    probs = softmax(logits)
    mean, var = gnb_moments(jac, probs)
    np.testing.assert_allclose(mean, ggn_diagonal(jac, probs), rtol=1e-12)
    n = 4000
    as32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    samples = sample_estimates(mlp_logits, as32, jnp.asarray(inputs, jnp.float32), n, seed=1)
    assert_within_sigmas(samples.mean(axis=0), mean, var, n)


def test_gnb_counts_every_leading_dimension_in_b():
    """Logits ``[2, 3, classes]`` are 6 sampled labels: the same estimate as the model applied
    to the 6 inputs flattened to ``[6, ...]``, whose mean is checked above. XLA may reduce the
    two shapes in another order (on some CPUs it does), so float32 rounding: rtol 1e-6, far
    below the factor 3 (or 9) that counting only the first dimension in B would give."""
    params, inputs = linear_problem()
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    inputs = jnp.asarray(inputs, jnp.float32)
    key = jax.random.key(3)
    flat_est = hessian.gauss_newton_bartlett_diag(linear_logits, params, key, inputs)
    grid_est = hessian.gauss_newton_bartlett_diag(
        linear_logits, params, key, inputs.reshape(2, 3, -1)
    )
    np.testing.assert_allclose(flat(grid_est), flat(flat_est), rtol=1e-6, atol=0)


def test_gnb_single_sample_is_b_times_the_squared_sampled_gradient():
    """One draw against its definition: B * (grad of the mean CE at labels drawn as
    ``jax.random.categorical(key, logits)``)**2, with the gradient by ``jax.grad``."""
    params, inputs = linear_problem()
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    inputs = jnp.asarray(inputs, jnp.float32)
    key = jax.random.key(7)
    labels = jax.random.categorical(key, linear_logits(params, inputs), axis=-1)

    def sampled_loss(p):
        logp = jax.nn.log_softmax(linear_logits(p, inputs))
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    want = jax.tree.map(lambda g: 6 * g**2, jax.grad(sampled_loss)(params))
    got = hessian.gauss_newton_bartlett_diag(linear_logits, params, key, inputs)
    np.testing.assert_allclose(flat(got), flat(want), rtol=1e-5, atol=1e-7)


def test_gnb_is_zero_for_parameters_the_logits_ignore():
    def logits_fn(params, inputs):
        return linear_logits(params, inputs) + 0.0 * jnp.sum(params["unused"])

    params, inputs = linear_problem()
    params = {**jax.tree.map(jnp.asarray, params), "unused": jnp.ones(3)}
    est = hessian.gauss_newton_bartlett_diag(logits_fn, params, jax.random.key(0), inputs)
    np.testing.assert_array_equal(est["unused"], 0.0)


def test_gnb_max_grad_norm_rescales_the_sampled_gradient():
    """With ``||g|| > c`` the estimate becomes ``B g'^2`` for ``g' = g c / ||g||``; since
    ``sum(B g^2) = B ||g||^2``, the clipped estimate sums to ``B c^2``."""
    params, inputs = linear_problem()
    key = jax.random.key(5)
    plain = flat(hessian.gauss_newton_bartlett_diag(linear_logits, params, key, inputs))
    norm = np.sqrt(plain.sum() / 6)
    clipped = flat(
        hessian.gauss_newton_bartlett_diag(
            linear_logits, params, key, inputs, max_grad_norm=0.5 * norm
        )
    )
    np.testing.assert_allclose(clipped, plain * 0.25, rtol=1e-5)
    np.testing.assert_allclose(clipped.sum(), 6 * (0.5 * norm) ** 2, rtol=1e-5)
    loose = hessian.gauss_newton_bartlett_diag(
        linear_logits, params, key, inputs, max_grad_norm=2 * norm
    )
    np.testing.assert_allclose(flat(loose), plain, rtol=1e-6)


def test_gnb_under_jit_with_bfloat16_params_returns_float32():
    params, inputs = linear_problem()
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    est = jax.jit(hessian.gauss_newton_bartlett_diag, static_argnums=0)(
        linear_logits, params, jax.random.key(0), jnp.asarray(inputs, jnp.bfloat16)
    )
    assert jax.tree.structure(est) == jax.tree.structure(params)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(est))
    assert np.all(np.isfinite(flat(est))) and flat(est).max() > 0


@pytest.mark.parametrize("due", [False, True])
def test_zeros_like_estimate_is_the_other_branch_of_a_cond(due):
    """``lax.cond`` needs both branches to agree in dtype: bfloat16 params, float32 estimates."""
    params, inputs = linear_problem()
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    inputs = jnp.asarray(inputs, jnp.bfloat16)

    @jax.jit
    def maybe_estimate(params, due):
        return jax.lax.cond(
            due,
            lambda: hessian.gauss_newton_bartlett_diag(
                linear_logits, params, jax.random.key(0), inputs
            ),
            lambda: hessian.zeros_like_estimate(params),
        )

    est = maybe_estimate(params, due)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(est))
    assert (flat(est).max() > 0) == due


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_samples", [0, -1, 1.5])
def test_hutchinson_rejects_bad_num_samples(num_samples):
    with pytest.raises(ValueError, match="num_samples"):
        hessian.hutchinson_diag(
            quadratic, PARAMS, jax.random.key(0), jnp.eye(18), num_samples=num_samples
        )


@pytest.mark.parametrize("max_grad_norm", [0.0, -1.0])
def test_gnb_rejects_bad_max_grad_norm(max_grad_norm):
    params, inputs = linear_problem()
    with pytest.raises(ValueError, match="max_grad_norm"):
        hessian.gauss_newton_bartlett_diag(
            linear_logits, params, jax.random.key(0), inputs, max_grad_norm=max_grad_norm
        )
