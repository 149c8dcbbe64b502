"""Lion's sign-of-interpolated-momentum direction (Chen et al. 2023)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_jax import base, quantization, validation


class LionState(NamedTuple):
    count: jax.Array  # updates applied so far (scheduled betas are read at this value)
    mu: base.Updates  # the momentum m, one buffer per parameter (see moment_dtype)


def scale_by_lion(
    b1: base.ScalarOrSchedule = 0.9,
    b2: base.ScalarOrSchedule = 0.99,
    moment_dtype: quantization.MomentDtype = None,
) -> optax.GradientTransformation:
    """The Lion direction ("EvoLved Sign Momentum", Chen et al. 2023, Algorithm 2).

    .. math::
        c_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t, \\qquad
        u_t = \\operatorname{sign}(c_t), \\qquad
        m_t = \\beta_2 m_{t-1} + (1-\\beta_2) g_t

    with ``m_0 = 0`` and ``sign(0) = 0`` (a coordinate whose interpolation is
    exactly zero does not move). The defaults ``b1 = 0.9, b2 = 0.99`` are the
    paper's; either may be a schedule, read at the step counter. The state is
    ``m``, one buffer per parameter in the parameter's dtype (4 bytes per
    float32 parameter, half of Adam's), and that counter. Equal to
    ``optax.scale_by_lion`` and to the update of lucidrains' ``lion-pytorch``.
    ``moment_dtype``: how the momentum is stored: None (the parameter's dtype),
    ``"float32"``, ``"bfloat16"`` or ``"int8"`` (block-wise 8-bit; see
    :mod:`optim_jax.quantization`).

    On CPU, the direction reads the old ``m`` while another kernel updates ``m``
    in place, and XLA copies ``m`` into a fresh buffer every step to keep the old
    values (Optax's Lion alike; the README's benchmark notes say what it costs).
    """
    validation.check_beta("b1", b1)
    validation.check_beta("b2", b2)

    def init_fn(params):
        return LionState(
            count=base.init_count(), mu=quantization.tree_init(params, moment_dtype, signed=True)
        )

    def update_fn(updates, state, params=None):
        del params
        beta1 = base.resolve(b1, state.count)
        beta2 = base.resolve(b2, state.count)

        def one(g, m):
            g32 = g.astype(base.compute_dtype(g.dtype))
            m32 = quantization.read(m, g32.dtype)
            direction = jnp.sign(beta1 * m32 + (1 - beta1) * g32)
            new_m = beta2 * m32 + (1 - beta2) * g32
            return direction.astype(g.dtype), quantization.write(new_m, m)

        out, new_mu = base.tree_map_multi(one, 2, updates, state.mu)
        return out, LionState(count=base.increment_count(state.count), mu=new_mu)

    return optax.GradientTransformation(init_fn, update_fn)
