"""Sharpness-Aware Minimization (SAM) and its adaptive variant (ASAM) around any optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_jax import base, validation


class SAMState(NamedTuple):
    """State of :func:`sam`: only the wrapped optimizer's (SAM itself keeps no buffers)."""

    inner_state: Any


GradFn = Callable[[base.Params], base.Updates]


def sam_perturbation(
    grads: base.Updates,
    params: base.Params,
    rho: float,
    adaptive: bool = False,
    eta: float = 0.0,
    eps: float = 1e-12,
) -> base.Updates:
    """SAM's ascent step ``e`` (float32 or wider per leaf), from the gradient ``g`` at ``w``.

    Plain: ``e = rho g / (||g|| + eps)``; adaptive: ``e = rho T^2 g / (||T g|| + eps)``
    with ``T = |w| + eta`` elementwise; norms over all leaves together.
    """
    grads32 = jax.tree.map(lambda g: g.astype(base.compute_dtype(g.dtype)), grads)
    if adaptive:
        stretch = jax.tree.map(lambda w, g: jnp.abs(w).astype(g.dtype) + eta, params, grads32)
        grads_t = jax.tree.map(jnp.multiply, stretch, grads32)
        scale = rho / (base.global_norm(grads_t) + eps)
        return jax.tree.map(lambda t, gt: scale * t * gt, stretch, grads_t)
    scale = rho / (base.global_norm(grads32) + eps)
    return jax.tree.map(lambda g: scale * g, grads32)


def sam(
    inner: optax.GradientTransformation,
    rho: float = 0.05,
    adaptive: bool = False,
    eta: float = 0.0,
    eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    """Sharpness-Aware Minimization: ``inner`` steps on the gradient at an ascent-perturbed point.

    With ``g = \\nabla L(w)`` the gradient passed in and ``grad_fn`` the
    gradient function (extra keyword argument of ``update``):

    .. math::
        e = \\rho \\frac{g}{\\lVert g \\rVert_2 + \\epsilon}, \\qquad
        g_{\\text{SAM}} = \\nabla L(w + e), \\qquad
        (u, s) = \\text{inner.update}(g_{\\text{SAM}}, s, w)

    (Foret et al. 2021, "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", Algorithm 1 with p = 2). With ``adaptive=True`` it is ASAM
    (Kwon et al. 2021, "ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks", the p = 2 case), whose
    normalisation operator is ``T_w = |w| + eta`` elementwise:

    .. math::
        e = \\rho \\frac{T_w^2 \\, g}{\\lVert T_w \\, g \\rVert_2 + \\epsilon}

    The norm is over all parameters together (the paper's). ``rho = 0.05``,
    ``eta = 0`` and ``eps = 1e-12`` are the defaults of the widely used PyTorch
    implementation (davda54/sam); ASAM wants a larger ``rho`` (``T_w`` shrinks
    the step; that implementation suggests about 2) and its paper adds
    ``eta = 0.01``. The inner optimizer receives the original ``w`` as
    ``params`` (weight decay and trust ratios act on ``w``, not ``w + e``), and
    any other extra arguments. Perturbation arithmetic is in float32 or wider;
    ``w + e`` is cast to the parameter's dtype before ``grad_fn`` sees it.

    Cost: one extra gradient evaluation per step (a second forward and
    backward pass over the same batch), so about twice the compute of
    ``inner`` alone; memory holds one extra parameter-shaped tree while the
    step runs, and nothing between steps.

    Difference from ``optax.contrib.sam``: that one alternates calls, an
    adversarial step (its ``adv_optimizer``, e.g. normalised SGD with step
    ``rho``) on one call and the outer step on the next, returning the
    perturbed parameters to the training loop in between and caching the
    unperturbed ones in its state (a full extra copy of the parameters); each
    call then sees a new batch in a plain loop, and the schedules and logs see
    two calls per SAM step (``opaque_mode=True`` runs the loop internally with
    a ``grad_fn(params, i)``). Here each ``update`` is one whole SAM step on one
    batch: ``grad_fn`` is called once, the state holds only ``inner``'s, and
    ``adaptive=True`` gives ASAM, which optax does not provide.

    ``update(updates, state, params, *, grad_fn, **extra)``: ``updates`` is the
    gradient at ``params``; ``grad_fn(params) -> gradients`` must compute the
    same loss's gradient (same batch) at other parameters; ``params`` is
    required. With ``rho = 0`` it equals ``inner`` given ``grad_fn(params)``.

    Args:
      inner: the optimizer to run on the SAM gradient (any transformation).
      rho: the radius of the neighbourhood, >= 0.
      adaptive: ASAM's parameter-scaled neighbourhood instead of a ball.
      eta: ASAM's offset in ``T_w = |w| + eta`` (>= 0), ignored unless adaptive.
      eps: added to the norm, so a zero gradient gives ``e = 0`` and no NaN.
    """
    validation.check_non_negative("rho", rho)
    validation.check_non_negative("eta", eta)
    validation.check_positive("eps", eps)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SAMState(inner_state=inner.init(params))

    def update_fn(updates, state, params=None, *, grad_fn: GradFn | None = None, **extra_args):
        if params is None:
            raise ValueError("sam: update needs params (SAM perturbs them)")
        if grad_fn is None:
            raise ValueError(
                "sam: update needs grad_fn=<params -> gradients of the same loss and batch>"
            )
        perturbation = sam_perturbation(updates, params, rho, adaptive, eta, eps)
        perturbed = jax.tree.map(
            lambda w, e: (w.astype(e.dtype) + e).astype(w.dtype), params, perturbation
        )
        sam_grads = base.tree_cast_like(grad_fn(perturbed), updates)
        out, inner_state = inner.update(sam_grads, state.inner_state, params, **extra_args)
        return out, SAMState(inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
