"""Estimators of the Hessian diagonal (for Sophia, Liu et al. 2023) and of the Hessian's
top eigenvalue and trace (sharpness).

The diagonal estimators are pure functions of the parameters, a PRNG key and the batch; they run
under ``jit`` and return a pytree shaped like the parameters, in float32 (or
the parameter's dtype when that is wider). Feed the result to a Sophia update
as ``hessian_diag=``; see :mod:`optim_jax.transforms.sophia` for a training step
that computes it only on refresh steps, with :func:`zeros_like_estimate` as the
other branch.

* :func:`gauss_newton_bartlett_diag` (Sophia-G): for models trained with
  softmax cross-entropy. Non-negative, one forward and one backward pass.
* :func:`hutchinson_diag` (Sophia-H): for any twice-differentiable loss.
  Unbiased for the true Hessian diagonal, may be negative, costs a
  Hessian-vector product (about two backward passes) per probe.

Sharpness, from Hessian-vector products only (the Hessian is never formed):
:func:`lanczos` / :func:`top_eigenvalue_lanczos` (the top eigenvalue; the
choice for it), :func:`top_eigenvalue_power` (the eigenvalue of largest
magnitude, by power iteration) and :func:`hutchinson_trace` (the trace with its
standard error). All are pure and run under ``jit``; the iteration counts are
static.

With data parallelism under ``jit`` on global arrays, both see the global
batch and need nothing more. Inside ``shard_map``/``pmap`` each device sees
only its shard (and GNB's ``B`` counts local labels): each device's estimate is
unbiased for its shard's mean loss, so ``pmean`` the estimates over the data
axis before feeding them, or every replica's ``h`` drifts apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optim_jax import base, validation


def _rademacher_like(key: jax.Array, params: base.Params) -> base.Params:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves)) if leaves else []
    probes = [
        jax.random.rademacher(k, jnp.shape(p), dtype=jnp.result_type(p))
        for k, p in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, probes)


def _as_compute(x: jax.Array) -> jax.Array:
    return x.astype(base.compute_dtype(x.dtype))


def zeros_like_estimate(params: base.Params) -> base.Params:
    """Zeros shaped, typed and (under ``jit``) sharded like the estimators' output.

    The other branch of ``jax.lax.cond(due, estimate, zeros)`` in a training
    step: ``lax.cond`` needs both branches to return the same dtypes, and the
    estimators return float32 (or wider) even for bfloat16 parameters.
    """
    return jax.tree.map(lambda p: base.zeros_like_param(p, base.compute_dtype(p.dtype)), params)


def hutchinson_diag(
    loss_fn: Callable[..., jax.Array],
    params: base.Params,
    key: jax.Array,
    *args: Any,
    num_samples: int = 1,
) -> base.Params:
    """Hutchinson's estimate of ``diag(H)``, ``H`` the Hessian of ``loss_fn`` at ``params``.

    .. math::
        \\hat h = \\frac{1}{S} \\sum_{s=1}^{S} u_s \\odot (H u_s), \\qquad
        u_s \\in \\{-1, +1\\}^d \\text{ i.i.d. Rademacher}

    Unbiased: ``E[u_i (Hu)_i] = H_ii`` because ``E[u_i u_j] = [i = j]``; the
    variance of coordinate ``i`` is ``sum_{j != i} H_ij**2 / S``, so the estimate
    is exact for a diagonal Hessian. The paper (Liu et al. 2023) draws Gaussian
    ``u``, whose estimate has the extra variance ``2 H_ii**2 / S``; Rademacher
    probes are the choice of Hutchinson (1990), of ``optax.contrib`` and of the
    official SophiaH. ``H u`` is forward-over-reverse, ``jvp`` of ``grad``; the
    linearization is computed once and reused for all ``S`` probes.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``, differentiated in ``params``.
      params: the point, a pytree of float arrays.
      key: PRNG key for the probes.
      *args: passed to ``loss_fn`` unchanged (the batch, a dropout key, ...).
      num_samples: ``S``, probes averaged (a positive int, static).

    Returns:
      A pytree like ``params``, each leaf in float32 or its wider dtype.
    """
    validation.check_positive_int("num_samples", num_samples)
    grad_fn = jax.grad(lambda p: loss_fn(p, *args))
    _, hvp = jax.linearize(grad_fn, params)

    def probe(probe_key):
        u = _rademacher_like(probe_key, params)
        return jax.tree.map(lambda a, b: _as_compute(a) * _as_compute(b), u, hvp(u))

    if num_samples == 1:
        return probe(key)

    def accumulate(total, probe_key):
        return jax.tree.map(jnp.add, total, probe(probe_key)), None

    zeros = zeros_like_estimate(params)
    total, _ = jax.lax.scan(accumulate, zeros, jax.random.split(key, num_samples))
    return jax.tree.map(lambda x: x / num_samples, total)


def gauss_newton_bartlett_diag(
    logits_fn: Callable[..., jax.Array],
    params: base.Params,
    key: jax.Array,
    *args: Any,
    max_grad_norm: float | None = None,
) -> base.Params:
    """The Gauss-Newton-Bartlett estimate of the Gauss-Newton diagonal (Liu et al. 2023, Alg. 2).

    .. math::
        \\hat y_b \\sim \\operatorname{softmax}(f(\\theta, x_b)), \\quad
        \\hat g = \\nabla_\\theta \\frac{1}{B} \\sum_{b=1}^{B}
            \\ell_{\\mathrm{CE}}(f(\\theta, x_b), \\hat y_b), \\quad
        \\hat h = B \\, \\hat g \\odot \\hat g

    The labels are sampled from the model's own logits (held fixed, no
    gradient flows through the sampling). ``E[\\hat h]`` is exactly the diagonal
    of the Gauss-Newton matrix of the *mean* cross-entropy,
    ``G = (1/B) sum_b J_b^T (diag(p_b) - p_b p_b^T) J_b``: the per-example
    residuals ``p_b - onehot(y_b)`` have mean 0 and covariance
    ``diag(p_b) - p_b p_b^T`` and are independent across ``b``, so
    ``E[g g^T] = G / B``. Hence the factor ``B``, and ``gamma`` of
    :func:`optim_jax.sophia` is the official code's ``rho`` (which multiplies
    by ``bs`` at update time instead).

    ``B`` is the number of sampled labels: every leading dimension counts, so
    logits of shape ``[batch, seq, vocab]`` give ``B = batch * seq`` (tokens,
    as the official GPT-2 recipe's ``bs = total_bs * block_size``). Every
    position is included; to drop padding, return logits for real positions
    only.

    Args:
      logits_fn: ``logits_fn(params, *args) -> logits[..., num_classes]``.
      params: the point, a pytree of float arrays.
      key: PRNG key for the label sampling.
      *args: passed to ``logits_fn`` unchanged (the inputs, no labels needed).
      max_grad_norm: if given, ``\\hat g`` is first rescaled to global L2 norm at
        most this value, as the official GPT-2 script does with
        ``clip_grad_norm_(1.0)`` before squaring (it has no ``+1e-6``). The
        paper's Algorithm 2 has no clipping (None, the default).

    Returns:
      A pytree like ``params``, each leaf in float32 or its wider dtype.
    """
    if max_grad_norm is not None:
        validation.check_positive("max_grad_norm", max_grad_norm)
    logits, pullback = jax.vjp(lambda p: logits_fn(p, *args), params)
    num_classes = logits.shape[-1]
    flat = _as_compute(jax.lax.stop_gradient(logits)).reshape(-1, num_classes)
    num_labels = flat.shape[0]
    sampled = jax.random.categorical(key, flat, axis=-1)
    # d/dlogits of the mean cross-entropy at the sampled labels: (softmax - onehot) / B.
    onehot = jax.nn.one_hot(sampled, num_classes, dtype=flat.dtype)
    residual = jax.nn.softmax(flat, axis=-1) - onehot
    cotangent = (residual / num_labels).reshape(logits.shape).astype(logits.dtype)
    (grads,) = pullback(cotangent)
    grads = jax.tree.map(_as_compute, grads)
    if max_grad_norm is not None:
        norm = base.global_norm(grads)
        factor = max_grad_norm / jnp.maximum(norm, max_grad_norm)
        grads = jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)
    return jax.tree.map(lambda g: num_labels * g * g, grads)


# ----------------------------------------------------------------------------- sharpness
# The top Hessian eigenvalue ("sharpness", Cohen et al. 2021) and the Hessian trace, from
# Hessian-vector products only: the Hessian itself is never formed.


class LanczosResult(NamedTuple):
    """``k`` Lanczos iterations on the Hessian: the tridiagonal ``T`` and its eigenvalues."""

    ritz_values: jax.Array  # [k], ascending: eigenvalues of T, estimates of H's extremes
    alphas: jax.Array  # [k], T's diagonal
    betas: jax.Array  # [k - 1], T's off-diagonal


class TraceEstimate(NamedTuple):
    """Hutchinson's estimate of ``tr(H)`` with its standard error (NaN for one probe)."""

    estimate: jax.Array
    standard_error: jax.Array
    samples: jax.Array  # [S], the per-probe values u_s^T H u_s


def hessian_vector_product(
    loss_fn: Callable[..., jax.Array], params: base.Params, *args: Any
) -> Callable[[base.Params], base.Params]:
    """``v -> H v`` at ``params``, ``H`` the Hessian of ``loss_fn(params, *args)``.

    Forward-over-reverse: the ``jvp`` of ``grad`` (Pearlmutter 1994), linearised once
    with ``jax.linearize`` so that each further product costs about one backward pass
    and the forward residuals are computed once. ``v`` is a pytree like ``params``; it
    is cast to the parameters' dtypes for the product and the result comes back in
    float32 (or the parameter's wider dtype).
    """
    grad_fn = jax.grad(lambda p: loss_fn(p, *args))
    _, linear_hvp = jax.linearize(grad_fn, params)

    def hvp(vector: base.Params) -> base.Params:
        tangent = base.tree_cast_like(vector, params)
        return jax.tree.map(_as_compute, linear_hvp(tangent))

    return hvp


def _tree_dot(a: base.Params, b: base.Params) -> jax.Array:
    products = [jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
    return sum(products[1:], products[0])


def _normalised(tree: base.Params) -> base.Params:
    # A zero vector stays zero instead of turning into NaN (H v = 0 at an exact null vector).
    norm = base.global_norm(tree)
    inverse = jnp.where(norm > 0, 1 / jnp.where(norm > 0, norm, 1), 0)
    return jax.tree.map(lambda x: x * inverse.astype(x.dtype), tree)


def _random_unit_vector(key: jax.Array, params: base.Params) -> base.Params:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    gaussian = [
        jax.random.normal(k, jnp.shape(p), base.compute_dtype(jnp.result_type(p)))
        for k, p in zip(keys, leaves, strict=True)
    ]
    return _normalised(jax.tree.unflatten(treedef, gaussian))


def top_eigenvalue_power(
    loss_fn: Callable[..., jax.Array],
    params: base.Params,
    key: jax.Array,
    *args: Any,
    num_iters: int = 20,
) -> tuple[jax.Array, base.Params]:
    """The Hessian's eigenvalue of largest magnitude, by power iteration on ``H v``.

    .. math::
        v_0 \\sim \\mathcal N(0, I) / \\|\\cdot\\|, \\quad
        \\lambda_t = v_t^\\top H v_t, \\quad
        v_{t+1} = H v_t / \\|H v_t\\|

    Returns ``(lambda, v)``: the Rayleigh quotient of the last unit vector ``v``
    after ``num_iters`` products. It converges to the eigenvalue of largest
    *absolute* value, with its sign, the error shrinking like
    ``(lambda_2 / lambda_1)^(2t)``; near a minimum that is the top eigenvalue. Slow
    when the top two are close in magnitude: :func:`lanczos` then does far better
    for the same number of products.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: the point, a pytree of float arrays.
      key: PRNG key for the start vector.
      *args: passed to ``loss_fn`` unchanged.
      num_iters: Hessian-vector products (a positive int, static).
    """
    validation.check_positive_int("num_iters", num_iters)
    hvp = hessian_vector_product(loss_fn, params, *args)
    start = _random_unit_vector(key, params)

    def iterate(_, carry):
        vector, _, _ = carry
        product = hvp(vector)
        return _normalised(product), _tree_dot(vector, product), vector

    dtype = jnp.result_type(*jax.tree.leaves(start))
    _, eigenvalue, vector = jax.lax.fori_loop(
        0, num_iters, iterate, (start, jnp.zeros([], dtype), start)
    )
    return eigenvalue, vector


def lanczos(
    loss_fn: Callable[..., jax.Array],
    params: base.Params,
    key: jax.Array,
    *args: Any,
    num_iters: int = 20,
) -> LanczosResult:
    """``k = num_iters`` steps of Lanczos on the Hessian, with full reorthogonalisation.

    .. math::
        w_j = H v_j, \\quad \\alpha_j = v_j^\\top w_j, \\quad
        w_j \\leftarrow w_j - V_j V_j^\\top w_j \\text{ (twice)}, \\quad
        \\beta_j = \\|w_j\\|, \\quad v_{j+1} = w_j / \\beta_j

    with ``V_j = [v_0 .. v_j]``, which makes ``V^T H V = T`` tridiagonal (diagonal
    ``alpha``, off-diagonal ``beta``). Projecting on all earlier vectors (done twice:
    "twice is enough", Giraud et al. 2005) replaces the three-term recurrence's
    ``alpha_j v_j + beta_{j-1} v_{j-1}`` and keeps the basis orthogonal in floating
    point, so no spurious copies of converged eigenvalues appear. The Ritz values
    (eigenvalues of ``T``, by ``jnp.linalg.eigh``) converge to the extreme eigenvalues
    of ``H`` first: ``ritz_values[-1]`` estimates the top one (Golub & Van Loan,
    *Matrix Computations*, sec. 10.1). With ``k`` equal to the number of parameters,
    the Ritz values are the whole spectrum.

    Costs ``k`` Hessian-vector products and memory for ``k + 1`` parameter-sized
    vectors (the basis). If the Krylov space is exhausted early (``beta_j = 0``: ``H``
    has fewer than ``k`` distinct eigenvalues along ``v_0``), the remaining vectors are
    zero and add Ritz values 0 that are not eigenvalues of ``H``.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: the point, a pytree of float arrays.
      key: PRNG key for the start vector.
      *args: passed to ``loss_fn`` unchanged.
      num_iters: ``k`` (a positive int, static).
    """
    validation.check_positive_int("num_iters", num_iters)
    hvp = hessian_vector_product(loss_fn, params, *args)
    start = _random_unit_vector(key, params)
    dtype = jnp.result_type(*jax.tree.leaves(start))
    # Rows 0..k of the basis; row j + 1 is written at step j (row k only for uniformity).
    basis = jax.tree.map(lambda v: jnp.zeros((num_iters + 1, *v.shape), v.dtype), start)
    basis = jax.tree.map(lambda b, v: b.at[0].set(v), basis, start)

    def project_out(rows, vector):
        # vector - V^T (V vector): rows not yet written are zero and contribute nothing.
        coefficients = sum(
            jnp.tensordot(b, x, axes=x.ndim)
            for b, x in zip(jax.tree.leaves(rows), jax.tree.leaves(vector), strict=True)
        )
        return jax.tree.map(lambda b, x: x - jnp.tensordot(coefficients, b, axes=1), rows, vector)

    def step(j, carry):
        rows, alphas, betas = carry
        current = jax.tree.map(lambda b: b[j], rows)
        product = hvp(current)
        alpha = _tree_dot(current, product)
        residual = project_out(rows, project_out(rows, product))
        beta = base.global_norm(residual).astype(dtype)
        rows = jax.tree.map(lambda b, r: b.at[j + 1].set(r), rows, _normalised(residual))
        return rows, alphas.at[j].set(alpha), betas.at[j].set(beta)

    zeros = jnp.zeros([num_iters], dtype)
    _, alphas, betas = jax.lax.fori_loop(0, num_iters, step, (basis, zeros, zeros))
    betas = betas[:-1]  # the last beta leads out of the k-dimensional space
    tridiagonal = jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
    return LanczosResult(jnp.linalg.eigvalsh(tridiagonal), alphas, betas)


def top_eigenvalue_lanczos(
    loss_fn: Callable[..., jax.Array],
    params: base.Params,
    key: jax.Array,
    *args: Any,
    num_iters: int = 20,
) -> jax.Array:
    """The largest Ritz value of :func:`lanczos`: the top (most positive) Hessian eigenvalue."""
    return lanczos(loss_fn, params, key, *args, num_iters=num_iters).ritz_values[-1]


def hutchinson_trace(
    loss_fn: Callable[..., jax.Array],
    params: base.Params,
    key: jax.Array,
    *args: Any,
    num_samples: int = 10,
) -> TraceEstimate:
    """Hutchinson's estimate of ``tr(H)`` with its standard error.

    .. math::
        \\widehat{\\mathrm{tr}} = \\frac1S \\sum_{s=1}^S u_s^\\top H u_s, \\qquad
        \\mathrm{se} = \\frac{\\mathrm{std}_{\\mathrm{ddof}=1}(u_s^\\top H u_s)}{\\sqrt S},
        \\qquad u_s \\in \\{-1, +1\\}^d \\text{ i.i.d. Rademacher}

    Unbiased, with per-probe variance ``2 sum_{i != j} H_ij^2`` (Hutchinson 1990;
    Avron & Toledo 2011): exact, with standard error 0, when ``H`` is diagonal.
    Probes run one after another (``lax.map``), one Hessian-vector product each.
    The standard error is NaN for ``num_samples=1``.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: the point, a pytree of float arrays.
      key: PRNG key for the probes.
      *args: passed to ``loss_fn`` unchanged.
      num_samples: ``S`` probes (a positive int, static).
    """
    validation.check_positive_int("num_samples", num_samples)
    hvp = hessian_vector_product(loss_fn, params, *args)

    def probe(probe_key):
        u = jax.tree.map(_as_compute, _rademacher_like(probe_key, params))
        return _tree_dot(u, hvp(u))

    samples = jax.lax.map(probe, jax.random.split(key, num_samples))
    estimate = jnp.mean(samples)
    if num_samples == 1:
        return TraceEstimate(estimate, jnp.full([], jnp.nan, samples.dtype), samples)
    standard_error = jnp.std(samples, ddof=1) / jnp.sqrt(num_samples).astype(samples.dtype)
    return TraceEstimate(estimate, standard_error, samples)
