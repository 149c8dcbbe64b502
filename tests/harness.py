"""Shared machinery for checking a transformation against a float64 NumPy reference.

A reference is a pair of plain functions written from a paper's equations:
``init(params) -> state`` and ``step(params, grads, state, t) -> (params, state)``
on dicts of float64 ``np.ndarray`` (``t`` counts from 1), where ``state`` is a
dict of named buffers, each either a dict of arrays keyed like ``params`` or a
scalar. The transformation under test runs on the same parameters and gradients
and its state is read through ``state_view(opt_state) -> dict`` with the same
names.

Tolerances:
* float64 run: relative error 1e-10. Both sides compute the same equations in
  double precision; the only differences are the order of floating-point
  operations, worth about 1e-14 per step.
* float32 run: relative error 1e-5 per step, the issue's bar. Single precision
  carries 6e-8 relative rounding per operation; twenty steps of a dozen
  operations stay two orders of magnitude below the bar.

"Relative error" of a leaf is ``max|ours - ref| / max(max|ref|, tiny)``: scaled by
the leaf's largest entry, so coordinates that pass through zero do not divide
by zero.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.optimizers import make_step as apply_step

# Leaf shapes every reference test uses: a scalar, a vector, small matrices, a
# matrix over any factoring threshold (Adafactor's is 128 when enabled) and a 3-D tensor.
LEAF_SHAPES: dict[str, tuple[int, ...]] = {
    "scalar": (),
    "vector": (7,),
    "matrix": (5, 3),
    "wide": (3, 130),
    "tall": (129, 2),
    "tensor3": (2, 3, 4),
}

RTOL = {np.float64: 1e-10, np.float32: 1e-5}


def random_params(seed: int = 0, shapes: dict[str, tuple[int, ...]] = LEAF_SHAPES) -> dict:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape) for name, shape in shapes.items()}


def random_grads(seed: int, steps: int, shapes: dict[str, tuple[int, ...]] = LEAF_SHAPES):
    rng = np.random.default_rng(10_000 + seed)
    return [{name: rng.normal(size=shape) for name, shape in shapes.items()} for _ in range(steps)]


def _max_abs(x: Any) -> float:
    x = np.asarray(x, np.float64)
    return float(np.max(np.abs(x))) if x.size else 0.0


def assert_close(ours: Any, ref: Any, rtol: float, where: str, scale_ref: Any = None) -> None:
    """Leafwise ``max|ours - ref| <= rtol * scale``.

    ``scale`` is the largest magnitude in the reference leaf and, when given, in
    the matching leaf of ``scale_ref`` (the value before the step): a step that
    cancels to near zero is judged against the size of what it started from.
    """
    ours_flat = jax.tree_util.tree_flatten_with_path(ours)[0]
    ref_leaves = jax.tree.leaves(ref)
    assert len(ours_flat) == len(ref_leaves), f"{where}: {len(ours_flat)} vs {len(ref_leaves)}"
    before = jax.tree.leaves(scale_ref) if scale_ref is not None else [None] * len(ref_leaves)
    for (path, a), b, b0 in zip(ours_flat, ref_leaves, before, strict=True):
        a = np.asarray(a, np.float64)
        assert a.shape == np.shape(b), f"{where}{jax.tree_util.keystr(path)}: shape {a.shape}"
        scale = max(_max_abs(b), _max_abs(b0) if b0 is not None else 0.0, 1e-30)
        err = _max_abs(a - np.asarray(b, np.float64)) / scale
        assert err <= rtol, f"{where}{jax.tree_util.keystr(path)}: rel err {err:.3g} > {rtol:g}"


def _cast_tree(tree: Any, dtype) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def _set_state(opt_state: Any, state_view: Callable[[Any], dict], values: dict, dtype) -> Any:
    """``opt_state`` with the buffers that ``state_view`` exposes replaced by ``values``.

    Matches buffers by identity, so it needs no knowledge of the state's layout.
    """
    view = state_view(opt_state)
    replacement = {}
    for name, tree in view.items():
        for leaf, value in zip(jax.tree.leaves(tree), jax.tree.leaves(values[name]), strict=True):
            replacement[id(leaf)] = jnp.asarray(value, leaf.dtype if dtype is None else dtype)
    leaves, treedef = jax.tree.flatten(opt_state)
    return jax.tree.unflatten(treedef, [replacement.get(id(x), x) for x in leaves])


def check_against_reference(
    make_tx: Callable[[], optax.GradientTransformation],
    ref_init: Callable[[dict], dict],
    ref_step: Callable[[dict, dict, dict, int], tuple[dict, dict]],
    state_view: Callable[[Any], dict],
    *,
    steps: int = 20,
    seed: int = 0,
    shapes: dict[str, tuple[int, ...]] = LEAF_SHAPES,
    params: dict | None = None,
    grads: list | None = None,
    rtol: dict | None = None,
) -> None:
    """Checks ``make_tx()`` against the reference, step by step, in float64 and float32.

    float64: the whole trajectory runs free, and params and state must agree
    after every step. float32: each step starts from the reference's params and
    state of the step before (rounded to float32), so the bar is per step, as
    the issue states, and does not compound over the trajectory.
    """
    rtol = {**RTOL, **(rtol or {})}
    params0 = random_params(seed, shapes) if params is None else params
    grad_seq = random_grads(seed, steps, shapes) if grads is None else grads

    history = [(params0, ref_init(params0))]
    for t, g in enumerate(grad_seq, start=1):
        history.append(ref_step(history[-1][0], g, history[-1][1], t))

    for dtype in (np.float64, np.float32):
        teacher_forced = dtype == np.float32
        with jax.enable_x64(dtype == np.float64):
            tx = make_tx()
            cast = functools.partial(_cast_tree, dtype=dtype)
            params = cast(params0)
            opt_state = tx.init(params)

            @jax.jit
            def step(params, opt_state, grads, tx=tx):
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state

            for t, g in enumerate(grad_seq, start=1):
                (prev_params, prev_state), (want_params, want_state) = history[t - 1], history[t]
                if teacher_forced:
                    params = cast(prev_params)
                    opt_state = _set_state(opt_state, state_view, prev_state, None)
                params, opt_state = step(params, opt_state, cast(g))
                where = f"[{np.dtype(dtype).name} step {t}] "
                assert_close(params, want_params, rtol[dtype], where + "params", prev_params)
                view = state_view(opt_state)
                assert set(view) == set(want_state), f"{where}state names {set(view)}"
                for name in want_state:
                    assert_close(
                        view[name], want_state[name], rtol[dtype], where + name, prev_state[name]
                    )


def run_with_states(
    tx: optax.GradientTransformation, params0: dict, grad_seq: list, dtype=np.float64
) -> list[tuple]:
    """``(params, opt_state)`` after every jitted step of ``tx``, as host copies."""
    with jax.enable_x64(dtype == np.float64):
        params = _cast_tree(params0, dtype)
        opt_state = tx.init(params)

        step = jax.jit(apply_step(tx))
        out = []
        for g in grad_seq:
            params, opt_state = step(params, opt_state, _cast_tree(g, dtype))
            out.append(jax.device_get((params, opt_state)))
        return out


def run_ours(
    tx: optax.GradientTransformation, params0: dict, grad_seq: list, dtype=np.float64
) -> list[dict]:
    """The parameter trajectory of ``tx`` (jitted), as float64 NumPy dicts."""
    return [
        jax.tree.map(lambda x: np.asarray(x, np.float64), params)
        for params, _ in run_with_states(tx, params0, grad_seq, dtype)
    ]


def run_torch(make_optimizer: Callable, params0: dict, grad_seq: list, scheduler=None) -> list:
    """The parameter trajectory of a torch.optim optimizer in float64.

    ``make_optimizer(list_of_tensors)`` builds the optimizer; ``scheduler``, if
    given, is ``optimizer -> LRScheduler`` and is stepped after every update.
    """
    import torch

    names = list(params0)
    tensors = [torch.tensor(params0[k], dtype=torch.float64, requires_grad=True) for k in names]
    optimizer = make_optimizer(tensors)
    sched = scheduler(optimizer) if scheduler else None
    out = []
    for g in grad_seq:
        for k, tensor in zip(names, tensors, strict=True):
            tensor.grad = torch.tensor(g[k], dtype=torch.float64)
        optimizer.step()
        if sched:
            sched.step()
        out.append(
            {k: tensor.detach().numpy().copy() for k, tensor in zip(names, tensors, strict=True)}
        )
    return out


def assert_trajectories_close(ours: list, want: list, rtol: float, what: str) -> None:
    for t, (a, b) in enumerate(zip(ours, want, strict=True), start=1):
        assert_close(a, b, rtol, f"[{what} step {t}] ")


def step_bytes(tx: optax.GradientTransformation, params) -> float:
    """Bytes XLA's cost analysis counts for one compiled step (update and apply, donated)."""
    state = jax.eval_shape(tx.init, params)
    compiled = jax.jit(apply_step(tx), donate_argnums=(0, 1)).lower(params, state, params).compile()
    analysis = compiled.cost_analysis()
    return float((analysis[0] if isinstance(analysis, list) else analysis)["bytes accessed"])
