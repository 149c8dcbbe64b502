"""Complex parameters updated as pairs of real ones."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optim_jax import base


def _as_real(tree: Any) -> Any:
    """Each complex leaf as its real and imaginary parts, stacked on a new last axis."""

    def one(x: Any) -> Any:
        return jnp.stack([x.real, x.imag], -1) if base.is_complex(x) else x

    return jax.tree.map(one, tree)


def _as_complex(tree: Any, like: Any) -> Any:
    """The inverse of :func:`_as_real`, for the leaves that are complex in ``like``."""

    def one(x: Any, template: Any) -> Any:
        if not base.is_complex(template):
            return x
        return jax.lax.complex(x[..., 0], x[..., 1]).astype(template.dtype)

    return jax.tree.map(one, tree, like)


def complex_as_real(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Runs ``inner`` on complex parameters as if each were two real ones.

    A complex leaf of shape ``s`` reaches ``inner`` (parameters, gradients and updates
    alike) as a real array of shape ``(*s, 2)``: its real and imaginary parts. This is
    torch.optim's convention for complex parameters (``torch.view_as_real``): Adam, for
    one, normalises the real and imaginary parts of a gradient each by its own second
    moment. Optax's Adam instead keeps complex moments and one second moment
    ``|g|**2`` per element, so the two differ on complex leaves (they agree on real ones,
    and on every rule that is linear in the gradient, such as SGD with momentum).

    The optimizers here refuse complex parameters where their rule squares, roots, signs
    or normalises elementwise; wrapped, they take them. Real leaves pass through
    untouched, and the state is ``inner``'s. Rules that look at shapes see the stacked
    shape: Adafactor factors a complex ``(n, m)`` matrix over its last two axes, ``(m, 2)``,
    and a mask by rank (``decay_mask``) sees a complex vector as a matrix.
    """

    def init_fn(params: base.Params) -> Any:
        return inner.init(_as_real(params))

    def update_fn(updates, state, params=None, **extra_args):
        real_params = None if params is None else _as_real(params)
        real_updates, state = optax.with_extra_args_support(inner).update(
            _as_real(updates), state, real_params, **extra_args
        )
        return _as_complex(real_updates, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
