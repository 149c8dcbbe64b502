"""Keeping a step's lower-precision moments in place on XLA:CPU.

A transformation that stores a moment in fewer bytes than it computes in (``moment_dtype
"bfloat16"``) returns a direction built from the unrounded float32 moment, as Optax's
``mu_dtype`` and the 8-bit optimizers' papers compute it. In the compiled step the kernel
that writes the new parameters therefore recomputes that moment from the stored old one,
while another kernel overwrites the old one in place (the state is donated). XLA:CPU's copy
insertion cannot order two such kernels by default, so it copies every such moment before
the step: a parameter-sized temporary per moment, mapped afresh each call. bfloat16 AdamW's
step took 2.61 times the float32 step's time at 64M parameters, 0.94 with the order below
(``python -m benchmarks.low_precision --parts step``; the README has the table).
``tests/optim_jax/test_in_place.py`` checks the copies in the compiled step. XLA:GPU and TPU
fuse sibling kernels into one by default, which should leave no such copy (not measured
here: no accelerator was at hand).

:func:`stored_after` gives the kernels the order: each such moment is stored only after the
parameter it belongs to has been computed, through an elementwise dependency that changes
no bit (the moment's bits OR-ed with ``min(bits(p), 0)``). The direction stays as it was;
only the step's scheduling changes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optim_jax import base, quantization

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}  # by itemsize


def _needs_order(moment: object, param: jax.Array) -> bool:
    """A stored float moment of ``param``'s shape in fewer bytes than float32, the least
    any transformation computes in: its stored value is never the one the update reads.

    A float32 moment is left alone even beside float64 parameters: its arithmetic follows
    the gradients' dtype, which is not seen here, and where that is float32 the update reads
    the stored moment itself (ordering it would only make XLA recompute it, with other
    roundings). int8 moments are left alone too: their codes come out of a block maximum
    and a code search that XLA:CPU writes out anyway, and ordering them changed nothing
    measured.
    """
    return (
        isinstance(moment, jax.Array)
        and moment.shape == param.shape
        and jnp.issubdtype(moment.dtype, jnp.floating)
        and moment.dtype.itemsize < jnp.dtype(jnp.float32).itemsize
    )


@jax.custom_jvp
def _after(moment: jax.Array, param: jax.Array) -> jax.Array:
    """``moment``, bit for bit, as a value that depends on ``param`` element by element
    (no communication: the two share a sharding). Differentiated as the identity in
    ``moment`` (the bit operations alone would give a zero derivative, silently wrong for
    a program that differentiates through optimizer steps)."""
    unsigned = _UNSIGNED[moment.dtype.itemsize]
    param_bits = jax.lax.bitcast_convert_type(param, _UNSIGNED[param.dtype.itemsize])
    # min(x, 0) of an unsigned x is 0, but XLA's simplifier leaves it (x & 0 and x * 0
    # it folds away, and the dependency with them).
    nothing = jnp.minimum(param_bits, jnp.zeros((), param_bits.dtype)).astype(unsigned)
    bits = jax.lax.bitcast_convert_type(moment, unsigned) | nothing
    return jax.lax.bitcast_convert_type(bits, moment.dtype)


@_after.defjvp
def _after_jvp(primals: tuple, tangents: tuple) -> tuple:
    moment_tangent, _ = tangents
    return _after(*primals), moment_tangent


def _is_entry(x: object) -> bool:
    """One entry per parameter: a quantised moment, and the ``optax.MaskedNode`` that
    stands for a parameter outside a group (``optax.masked``, ``param_groups``)."""
    return quantization.is_moment(x) or isinstance(x, optax.MaskedNode)


def _pair_with_params(state: object, params: base.Params) -> object:
    """``state`` with each subtree shaped like ``params`` ordered after them, leaf by leaf."""
    params_def = jax.tree.structure(params)
    param_leaves = jax.tree.leaves(params)

    def shaped_like_params(node: object) -> bool:
        return jax.tree.structure(node, is_leaf=_is_entry) == params_def

    def order(node: object) -> object:
        if not shaped_like_params(node):
            return node
        moments = jax.tree.leaves(node, is_leaf=_is_entry)
        ordered = [
            _after(m, p) if _needs_order(m, p) else m
            for m, p in zip(moments, param_leaves, strict=True)
        ]
        return jax.tree.unflatten(params_def, ordered)

    return jax.tree.map(order, state, is_leaf=shaped_like_params)


def stored_after(opt_state: base.Params, params: base.Params) -> base.Params:
    """``opt_state``, unchanged in value, with its lower-precision moments stored after
    ``params`` (the new parameters) on CPU; unchanged elsewhere.

    Call it on the step's new state and parameters, inside the jitted step::

        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        opt_state = optim_jax.stored_after(opt_state, params)

    A moment is recognised as a floating array of its parameter's shape, in a subtree of
    ``opt_state`` with the structure of ``params`` (``optax.MaskedNode`` in the places of
    the parameters a masked or grouped transformation leaves out), stored in fewer bytes
    than float32 (bfloat16, float16). Everything else passes through.
    """
    return jax.lax.platform_dependent(
        opt_state,
        params,
        cpu=_pair_with_params,
        default=lambda state, _: state,
    )
