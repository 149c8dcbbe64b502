"""Hyperparameters held in the optimizer state, changeable between steps without recompiling.

``inject_hyperparams(optim_jax.adamw)(learning_rate=1e-3)`` builds AdamW whose
learning rate, betas and weight decay live in ``state.hyperparams`` as scalar
arrays. A jitted step takes the state as an argument, so writing a new value
there (:func:`set_hyperparam`) changes the next update and reuses the compiled
step. Schedules are evaluated at every update and their value is stored in the
same place, which makes the state the record of what the step used.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim_jax import base


class InjectHyperparamsState(NamedTuple):
    count: jax.Array  # updates applied so far; schedules are evaluated at it
    hyperparams: dict[str, jax.Array]  # name -> scalar array, the value used by the last update
    inner_state: Any


_SCHEDULE_TYPES = (base.ScalarOrSchedule, base.Schedule, optax.ScalarOrSchedule, optax.Schedule)


def _accepts_schedule(annotation: Any) -> bool | None:
    """Whether a parameter annotation admits a schedule; None when it is not annotated."""
    if annotation is inspect.Parameter.empty:
        return None
    if isinstance(annotation, str):
        return "Schedule" in annotation
    try:
        return any(annotation == t for t in _SCHEDULE_TYPES)
    except TypeError:
        return False


def _is_number(value: Any) -> bool:
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, int | float | np.integer | np.floating):
        return True
    if isinstance(value, np.ndarray | jax.Array):
        return value.shape == () and (
            jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
        )
    return False


def _is_float(value: Any) -> bool:
    if isinstance(value, float | np.floating):
        return True
    return isinstance(value, np.ndarray | jax.Array) and jnp.issubdtype(value.dtype, jnp.floating)


def _constant(value: jax.Array) -> Callable[[jax.Array], jax.Array]:
    return lambda count: value


def _hyperparam_dtype(params: Any, dtype: Any) -> Any:
    if dtype is not None:
        return jnp.dtype(dtype)
    floats = [
        base.compute_dtype(leaf.dtype)
        for leaf in jax.tree.leaves(params)
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    return jnp.result_type(*floats) if floats else jnp.dtype(jnp.float32)


def inject_hyperparams(
    optimizer: Callable[..., optax.GradientTransformation],
    *,
    static_args: Iterable[str] = (),
    dtype: Any = None,
) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """Wraps an optimizer factory so that its hyperparameters live in the state.

    ``inject_hyperparams(optim_jax.adamw)(learning_rate=1e-3, weight_decay=0.1)``
    takes the factory's arguments and returns a transformation whose state is
    :class:`InjectHyperparamsState`; ``state.hyperparams["learning_rate"]`` is a
    scalar array. Change it between steps with :func:`set_hyperparam`: a
    jitted step function sees a new *value* of the same shape and dtype and is
    not traced again.

    **Which arguments are injected.** Those the factory accepts as a schedule
    (annotated ``ScalarOrSchedule``, as ``learning_rate``, ``b1``, ``b2``,
    ``weight_decay`` and ``momentum`` are in this library and
    ``learning_rate``/``weight_decay`` in Optax), whether passed or left at
    their default, except:

    * a default of exactly 0 stays static, because a zero switches a component
      off (``sgd``'s ``momentum=0`` allocates no momentum buffer); pass the
      argument explicitly, even as 0, to make it injectable (the component and
      its buffers are then always present);
    * names listed in ``static_args``.

    For an unannotated factory argument (a user's ``lambda``), a float or a
    callable is injected. Everything else (``eps: float``, booleans, masks,
    dtypes, ``None``) is passed to the factory unchanged. A callable that is
    injected is a schedule ``count -> value``: it is evaluated at the number of
    updates already applied, and the value stored in ``state.hyperparams``, so
    a value written there with :func:`set_hyperparam` is overwritten by the
    schedule at the next update.

    **How.** The factory is called once at construction with the given
    values, so argument checks run as usual. Inside ``init`` and ``update`` it
    is called again with every injected argument replaced by a constant
    schedule returning the stored array; the optimizers in this library
    evaluate schedules with ``base.resolve``, so the same code runs with an
    array in place of a Python number.

    **Precision.** Stored values are arrays of the compute dtype of the
    parameters (float32 for float32 or bfloat16 params; pass ``dtype`` to
    choose). A plain optimizer forms ``1 - b2`` from a Python float in double
    precision; an injected one forms it in float32, off by up to 1.3e-5
    relative for ``b2 = 0.999``, so trajectories agree with the plain optimizer
    to float32 rounding, not bit for bit. In float64 (``jax_enable_x64`` with
    float64 params) they agree to double rounding.

    Optax's ``inject_hyperparams`` works with every optimizer here too, and
    differs: it injects every numeric argument, defaults included (zeros too,
    so ``sgd``'s momentum buffer is kept at momentum 0) and whatever its
    annotation (``eps`` as well), and treats every callable as a schedule
    unless it is named in ``static_args`` (so ``mask=fn`` must be listed
    there, and so must Adafactor's ``min_dim_size_to_factor``, which decides
    the state's shapes: passed as an array it is refused with that advice).

    Args:
      optimizer: a function returning a ``GradientTransformation``.
      static_args: argument names never to inject.
      dtype: dtype of the stored hyperparameters; default: the parameters'
        compute dtype (float32 or wider).
    """
    if not callable(optimizer):
        raise TypeError(f"optimizer must be a factory function, got {optimizer!r}")
    if isinstance(static_args, str):
        static_args = (static_args,)
    static_args = frozenset(static_args)
    signature = inspect.signature(optimizer)
    unknown = static_args - set(signature.parameters)
    if unknown:
        raise ValueError(
            f"static_args: {sorted(unknown)} are not arguments of {optimizer!r}; "
            f"it takes {list(signature.parameters)}"
        )

    def build(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
        bound = signature.bind(*args, **kwargs)
        passed = set(bound.arguments)
        bound.apply_defaults()
        optimizer(*bound.args, **bound.kwargs)  # argument checks with the real values

        numbers: dict[str, Any] = {}
        schedules: dict[str, Callable] = {}
        for name, value in bound.arguments.items():
            parameter = signature.parameters[name]
            if name in static_args or parameter.kind in (
                inspect.Parameter.VAR_POSITIONAL,
                inspect.Parameter.VAR_KEYWORD,
            ):
                continue
            accepts = _accepts_schedule(parameter.annotation)
            if accepts is False:
                continue
            if callable(value):
                schedules[name] = value
            elif _is_number(value) and (accepts or _is_float(value)):
                if name not in passed and float(value) == 0.0:
                    continue
                numbers[name] = value
        names = sorted({*numbers, *schedules})

        def make_inner(hyperparams: dict[str, jax.Array]) -> optax.GradientTransformationExtraArgs:
            arguments = dict(bound.arguments)
            for name in names:
                arguments[name] = _constant(hyperparams[name])
            call = inspect.BoundArguments(signature, arguments)
            return optax.with_extra_args_support(optimizer(*call.args, **call.kwargs))

        def evaluate(count: jax.Array, hyperparams: dict[str, jax.Array], dt: Any) -> dict:
            values = dict(hyperparams)
            for name, schedule in schedules.items():
                values[name] = jnp.asarray(schedule(count), dt)
            return values

        def init_fn(params):
            dt = _hyperparam_dtype(params, dtype)
            count = base.init_count()
            stored = {name: jnp.asarray(value, dt) for name, value in numbers.items()}
            hyperparams = evaluate(count, stored, dt)
            inner_state = make_inner(hyperparams).init(params)
            return InjectHyperparamsState(count, hyperparams, inner_state)

        def update_fn(updates, state, params=None, **extra_args):
            dt = next(iter(state.hyperparams.values())).dtype if names else jnp.float32
            hyperparams = evaluate(state.count, state.hyperparams, dt)
            updates, inner_state = make_inner(hyperparams).update(
                updates, state.inner_state, params, **extra_args
            )
            new_state = InjectHyperparamsState(
                base.increment_count(state.count), hyperparams, inner_state
            )
            return updates, new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    build.__doc__ = f"{getattr(optimizer, '__name__', 'optimizer')} with injected hyperparameters."
    return build


def _is_injected(node: Any) -> bool:
    return isinstance(node, InjectHyperparamsState)


def set_hyperparam(opt_state: Any, name: str, value: Any) -> Any:
    """``opt_state`` with the injected hyperparameter ``name`` set to ``value``.

    Finds every :class:`InjectHyperparamsState` in ``opt_state`` (through
    chains, parameter groups and other wrappers) that holds ``name`` and sets
    it in all of them, like torch's ``for g in opt.param_groups: g["lr"] = v``.
    The value is cast to the stored dtype, so a jitted step is not traced
    again. Works inside ``jit`` too (``value`` may be a traced scalar), and on
    an ``nnx.Optimizer``'s state: ``opt.opt_state = set_hyperparam(opt.opt_state,
    "learning_rate", 1e-4)`` (the ``OptArray`` wrappers are kept). Range
    checks ran when the optimizer was built and are not repeated here; a
    hyperparameter driven by a schedule is overwritten at the next update.

    Raises:
      ValueError: naming ``name`` when no injected state holds it.
      TypeError: when ``value`` is not a scalar number.
    """
    if callable(value) or isinstance(value, bool | np.bool_) or np.ndim(value) != 0:
        raise TypeError(f"value must be a scalar number, got {value!r}")
    known: set[str] = set()
    hits = 0

    def replace(node):
        nonlocal hits
        if not _is_injected(node):
            return node
        known.update(node.hyperparams)
        if name not in node.hyperparams:
            return node
        hits += 1
        old = node.hyperparams[name]
        new = jnp.asarray(value, old.dtype).reshape(old.shape)
        if not isinstance(old, jax.Array | np.ndarray) and hasattr(old, "replace"):
            new = old.replace(new)  # a Flax NNX Variable (nnx.Optimizer's OptArray): keep it
        return node._replace(hyperparams={**node.hyperparams, name: new})

    new_state = jax.tree.map(replace, opt_state, is_leaf=_is_injected)
    if not hits:
        if not known:
            raise ValueError(
                f"name: cannot set {name!r}: the state holds no injected hyperparameters "
                f"(build the optimizer with optim_jax.inject_hyperparams)"
            )
        raise ValueError(
            f"name: unknown hyperparameter {name!r}; the injected ones are {sorted(known)}"
        )
    return new_state
