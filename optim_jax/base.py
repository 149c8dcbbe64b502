"""Types and small helpers shared by every transformation.

Conventions used across the library:

* A hyperparameter typed :data:`ScalarOrSchedule` is either a number or a
  schedule ``count -> value``; :func:`resolve` evaluates it at the number of
  updates already applied (``count = 0`` on the first update).
* State leaves that mirror a parameter are created with :func:`zeros_like_param`
  (or :func:`full_like_param`), which keep the parameter's shape and, under
  ``jax.jit``, its sharding: the zeros are written as a select on the parameter,
  so XLA's sharding propagation gives them the parameter's layout instead of
  replicating them (a plain ``jnp.zeros_like`` inside ``jit`` loses it).
* Arithmetic runs in at least float32 (:func:`compute_dtype`); state is stored
  in the parameter's dtype unless a transformation documents otherwise.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array: TypeAlias = jax.Array
Schedule: TypeAlias = Callable[[Array], Array]
ScalarOrSchedule: TypeAlias = float | Array | Schedule
Params: TypeAlias = Any  # a pytree of arrays
Updates: TypeAlias = Any  # a pytree of arrays with the structure of Params

_COUNT_DTYPE = jnp.int32


class CountState(NamedTuple):
    """State of a transformation whose only memory is the number of updates."""

    count: Array


def resolve(value: ScalarOrSchedule, count: Array) -> float | Array:
    """``value(count)`` for a schedule, ``value`` itself otherwise.

    A Python number stays a Python number, so expressions such as ``1 - b2``
    are formed in double precision before they meet float32 arrays (with
    ``b2 = 0.999``, forming ``1 - b2`` in float32 is off by 1.3e-5 relative).
    """
    if callable(value):
        return jnp.asarray(value(count))
    return value


def init_count() -> Array:
    return jnp.zeros([], _COUNT_DTYPE)


def increment_count(count: Array) -> Array:
    """``count + 1`` that saturates at the largest int32 instead of wrapping."""
    max_count = jnp.iinfo(_COUNT_DTYPE).max
    return jnp.where(count < max_count, count + 1, max_count).astype(_COUNT_DTYPE)


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The dtype optimizer arithmetic uses for a leaf of ``dtype``: float32 or wider."""
    return jnp.promote_types(dtype, jnp.float32)


def full_like_param(param: Array, value: float, dtype: jnp.dtype | None = None) -> Array:
    """An array shaped, and under ``jit`` sharded, like ``param``, filled with ``value``.

    ``jnp.where(False, param, value)`` compiles to a broadcast of the constant
    (the parameter is not read) but keeps ``param``'s sharding through XLA's
    propagation, so optimizer state initialised inside ``jax.jit`` comes out
    sharded like the parameters rather than replicated.
    """
    dtype = param.dtype if dtype is None else dtype
    return jnp.where(False, param, jnp.asarray(value, param.dtype)).astype(dtype)


def zeros_like_param(param: Array, dtype: jnp.dtype | None = None) -> Array:
    return full_like_param(param, 0.0, dtype)


def tree_zeros_like(params: Params, dtype: jnp.dtype | None = None) -> Params:
    return jax.tree.map(lambda p: zeros_like_param(p, dtype), params)


def tree_cast_like(tree: Any, like: Any) -> Any:
    """Casts every leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
    return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def is_complex(x: Any) -> bool:
    """Whether ``x`` (an array or an abstract one) holds complex numbers."""
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.complexfloating)


def squared_magnitude(x: Array) -> Array:
    """``|x|**2`` elementwise: ``x * x`` for real ``x``, ``re**2 + im**2`` for complex."""
    if is_complex(x):
        return jnp.square(x.real) + jnp.square(x.imag)
    return jnp.square(x)


def global_norm(tree: Any) -> Array:
    """The L2 norm of all leaves taken together (of complex leaves, by their magnitudes, as
    Optax and torch take it), computed in float32 or wider."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros([], jnp.float32)
    squares = [jnp.sum(squared_magnitude(x.astype(compute_dtype(x.dtype)))) for x in leaves]
    return jnp.sqrt(sum(squares))


def refuse_complex(params: Any, transformation: str) -> None:
    """Raises a TypeError naming the first complex leaf of ``params``.

    For transformations whose rule squares, roots, signs or normalises elementwise: written
    for real numbers, on a complex leaf they would return a wrong direction silently.
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if is_complex(leaf):
            raise TypeError(
                f"{transformation}: parameter {jax.tree_util.keystr(path) or 'params'} is "
                f"{leaf.dtype}; its rule is written for real numbers. Wrap the optimizer in "
                f"optim_jax.complex_as_real(...) to update real and imaginary parts as "
                f"parameters of their own (torch.optim's convention)"
            )


def tree_map_multi(fn: Callable[..., tuple], n_outputs: int, tree: Any, *rest: Any) -> tuple:
    """Maps ``fn`` (returning an ``n_outputs``-tuple per leaf) and returns ``n_outputs`` trees.

    Lets one elementwise function compute the update and every new state buffer
    of a leaf in one place, so XLA fuses them into one pass over memory. An
    output that ``fn`` returns as None for every leaf comes back as None.
    Outputs may be pytrees themselves (a quantised moment): each stays whole at its
    leaf's place.
    """
    results = jax.tree.map(fn, tree, *rest)
    outer = jax.tree.structure(tree)
    if outer.num_leaves == 0:
        return (tree,) * n_outputs
    per_leaf = outer.flatten_up_to(results)
    assert all(len(r) == n_outputs for r in per_leaf), n_outputs
    outputs = []
    for i in range(n_outputs):
        column = [r[i] for r in per_leaf]
        outputs.append(None if all(x is None for x in column) else outer.unflatten(column))
    return tuple(outputs)


def bias_correction(decay: float | Array, count: Array) -> Array:
    """``1 - decay**count`` (``count`` from 1), accurate to float32 rounding.

    Written as ``-expm1(count * log(decay))`` with the logarithm of a Python
    number taken in double precision: the naive form loses about 1e-5 relative
    in float32 when ``decay`` is close to 1.
    """
    t = count.astype(jnp.result_type(float))
    if isinstance(decay, int | float):
        log_decay = math.log(decay) if decay > 0 else -math.inf
    else:
        log_decay = jnp.log(decay)
    return -jnp.expm1(t * log_decay)


def find_states(opt_state: Any, state_type: type) -> list:
    """Every node of type ``state_type`` inside an optimizer state, in tree order.

    Works through chains, masks, ``multi_transform`` and this library's
    wrappers, since all of them keep inner states as pytree children.
    """
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, state_type))
    return [node for node in nodes if isinstance(node, state_type)]


def find_state(opt_state: Any, state_type: type) -> Any:
    """The single node of type ``state_type`` in ``opt_state``; an error if not exactly one."""
    found = find_states(opt_state, state_type)
    if len(found) != 1:
        raise ValueError(f"expected one {state_type.__name__} in the state, found {len(found)}")
    return found[0]


def all_finite(tree: Any) -> jax.Array:
    """A bool scalar: True iff no leaf of ``tree`` holds a NaN or an infinity.

    One reduction per leaf combined with ``and``: on sharded arrays XLA turns it
    into a small all-reduce; nothing is copied to the host.
    """
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return functools.reduce(jnp.logical_and, checks, jnp.asarray(True))


def is_zero(value: ScalarOrSchedule) -> bool:
    """True for the number 0, which switches a component (and its state) off.

    A schedule or a JAX array is never statically zero: ``optax.inject_hyperparams``
    passes hyperparameters as arrays, concrete to ``init`` and traced to ``update``,
    and the state must have the same structure in both.
    """
    return isinstance(value, numbers.Number | np.ndarray) and float(value) == 0.0


def chain_present(*transforms: optax.GradientTransformation | None) -> optax.GradientTransformation:
    """``optax.chain`` of the transforms that are not None."""
    return optax.chain(*(t for t in transforms if t is not None))
