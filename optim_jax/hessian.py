"""Estimators of the Hessian diagonal, for Sophia (Liu et al. 2023) and similar optimizers.

Both are pure functions of the parameters, a PRNG key and the batch; they run
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

With data parallelism under ``jit`` on global arrays, both see the global
batch and need nothing more. Inside ``shard_map``/``pmap`` each device sees
only its shard (and GNB's ``B`` counts local labels): each device's estimate is
unbiased for its shard's mean loss, so ``pmean`` the estimates over the data
axis before feeding them, or every replica's ``h`` drifts apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
