"""Properties every optimizer must have: jit, pytrees, bf16, sharding, state size, convergence.

One registry lists every public optimizer with hyperparameters that suit the
test problems; each property below runs over all of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optim_jax


@dataclasses.dataclass(frozen=True)
class Case:
    make: Callable[..., optax.GradientTransformation]  # learning_rate -> transformation
    state_bytes_per_param: float  # for float32 parameters, asymptotically (large tensors)
    quadratic_lr: float
    rosenbrock_lr: float
    mlp_lr: float
    hessian: bool = False  # Sophia: feed a Hutchinson estimate of diag(H) on refresh steps


CASES: dict[str, Case] = {
    "sgd": Case(lambda lr: optim_jax.sgd(lr), 0, 0.1, 2e-3, 1.0),
    "sgd_momentum": Case(lambda lr: optim_jax.sgd(lr, momentum=0.9), 4, 0.05, 1e-3, 0.1),
    "sgd_nesterov": Case(
        lambda lr: optim_jax.sgd(lr, momentum=0.9, nesterov=True), 4, 0.05, 1e-3, 0.1
    ),
    "adagrad": Case(lambda lr: optim_jax.adagrad(lr), 4, 0.5, 0.3, 0.05),
    "rmsprop": Case(lambda lr: optim_jax.rmsprop(lr), 4, 0.01, 1e-3, 3e-3),
    "rmsprop_centered_momentum": Case(
        lambda lr: optim_jax.rmsprop(lr, momentum=0.9, centered=True), 12, 3e-3, 3e-4, 1e-3
    ),
    "adam": Case(lambda lr: optim_jax.adam(lr), 8, 0.05, 0.02, 3e-3),
    "adam_amsgrad": Case(lambda lr: optim_jax.adam(lr, amsgrad=True), 12, 0.05, 0.02, 3e-3),
    "adamw": Case(lambda lr: optim_jax.adamw(lr, weight_decay=1e-4), 8, 0.05, 0.02, 3e-3),
    "lamb": Case(lambda lr: optim_jax.lamb(lr), 8, 0.05, 0.1, 3e-3),
    "lars": Case(lambda lr: optim_jax.lars(lr, trust_coefficient=0.01), 4, 1.0, 0.1, 1.0),
    "lion": Case(lambda lr: optim_jax.lion(lr), 4, 0.01, 0.03, 3e-3),
    "adafactor": Case(
        lambda lr: optim_jax.adafactor(lr, scale_parameter=False), 0.008, 0.05, 0.03, 0.01
    ),
    "adafactor_momentum": Case(
        lambda lr: optim_jax.adafactor(lr, scale_parameter=False, b1=0.9), 4.008, 0.05, 0.1, 0.01
    ),
    "sophia": Case(
        lambda lr: optim_jax.sophia(lr, gamma=0.05, weight_decay=0.0), 8, 0.1, 0.1, 3e-3, True
    ),
}

NAMES = sorted(CASES)


def minimise(tx, loss_fn, params, steps, hessian=False):
    """Runs ``steps`` jitted updates under ``lax.scan``; returns final params and loss."""
    params = jax.jit(lambda p: steps_of(tx, loss_fn, p, steps, hessian))(params)
    return params, float(loss_fn(params))


def steps_of(tx, loss_fn, params, steps, hessian=False):
    """The parameters after ``steps`` updates under ``lax.scan`` (traceable).

    With ``hessian``, each refresh step feeds a Hutchinson estimate of diag(H),
    computed only when due, as a Sophia training step does.
    """

    def body(carry, step):
        params, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params)
        extra = {}
        if hessian:
            key = jax.random.fold_in(jax.random.key(0), step)
            extra["hessian_diag"] = jax.lax.cond(
                optim_jax.sophia_hessian_due(state),
                lambda: optim_jax.hessian.hutchinson_diag(loss_fn, params, key),
                lambda: jax.tree.map(jnp.zeros_like, params),
            )
        updates, state = tx.update(grads, state, params, **extra)
        return (optax.apply_updates(params, updates), state), loss

    (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), jnp.arange(steps))
    return params


def decayed(lr, steps):
    """Cosine decay to zero: lets sign-based and clipped methods settle instead of hovering."""
    return optim_jax.cosine_decay(lr, steps)


# --- convergence -------------------------------------------------------------------------

CURVATURES = jnp.linspace(1.0, 10.0, 12)


def quadratic(params):
    x = jnp.concatenate([params["w"].ravel(), params["b"]])
    return 0.5 * jnp.sum(CURVATURES * x**2)


@pytest.mark.parametrize("name", NAMES)
def test_minimises_a_quadratic(name):
    """Condition number 10; the loss must fall by six orders of magnitude in 500 steps."""
    params = {"w": jnp.full((2, 4), 1.0), "b": jnp.linspace(-1.0, 1.0, 4)}
    case = CASES[name]
    _, loss = minimise(
        case.make(decayed(case.quadratic_lr, 500)), quadratic, params, 500, case.hessian
    )
    assert loss < 1e-6 * float(quadratic(params)), loss


@pytest.mark.parametrize("name", NAMES)
def test_the_learning_rate_may_be_traced_differentiated_and_vmapped(name):
    """A hyperparameter may be a traced scalar (``optax.inject_hyperparams`` passes them so):
    the gradient of the loss after three steps with respect to the learning rate equals its
    central difference (float64, h = 1e-6: truncation ~1e-12, rounding ~1e-10 relative, so
    1e-6 leaves room for curvature only), and a vmap over learning rates equals separate runs
    to float64 rounding."""
    case = CASES[name]
    with jax.enable_x64(True):
        params = {"w": jnp.linspace(-1.0, 1.0, 8).reshape(2, 4), "b": jnp.linspace(0.5, 2.0, 4)}

        @jax.jit
        def loss_after_three_steps(lr):
            return quadratic(steps_of(case.make(lr), quadratic, params, 3, case.hessian))

        lr = case.quadratic_lr / 2
        slope = jax.grad(loss_after_three_steps)(lr)
        h = 1e-6
        central = (loss_after_three_steps(lr + h) - loss_after_three_steps(lr - h)) / (2 * h)
        np.testing.assert_allclose(slope, central, rtol=1e-6, atol=1e-9)
        lrs = jnp.array([0.5, 1.0, 2.0]) * lr
        swept = jax.vmap(loss_after_three_steps)(lrs)
        one_by_one = [loss_after_three_steps(x) for x in lrs]
        np.testing.assert_allclose(swept, one_by_one, rtol=1e-12)


def rosenbrock(params):
    x, y = params["xy"][0], params["xy"][1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


@pytest.mark.parametrize("name", NAMES)
def test_minimises_rosenbrock(name):
    """From (-1.5, 2): within 0.05 of the minimum (1, 1) after 20000 steps."""
    case = CASES[name]
    params, _ = minimise(
        case.make(decayed(case.rosenbrock_lr, 20_000)),
        rosenbrock,
        {"xy": jnp.array([-1.5, 2.0])},
        20_000,
        case.hessian,
    )
    assert np.linalg.norm(np.asarray(params["xy"]) - 1.0) < 0.05, params["xy"]


def mlp_problem():
    """Two interleaved spirals, 256 points: a problem a 2-32-32-2 tanh MLP can fit."""
    rng = np.random.default_rng(0)
    n = 128
    theta = np.sqrt(rng.uniform(size=n)) * 3 * np.pi
    arms = [np.stack([np.cos(theta), np.sin(theta)], 1) * theta[:, None] / (3 * np.pi)]
    inputs = np.concatenate([arms[0], -arms[0]]).astype(np.float32)
    labels = np.concatenate([np.zeros(n), np.ones(n)]).astype(np.int32)
    keys = jax.random.split(jax.random.key(0), 3)
    sizes = [(2, 32), (32, 32), (32, 2)]
    params = {
        f"layer{i}": {
            "kernel": jax.random.normal(k, s) * np.sqrt(1.0 / s[0]),
            "bias": jnp.zeros(s[1]),
        }
        for i, (k, s) in enumerate(zip(keys, sizes, strict=True))
    }

    def loss_fn(params):
        h = inputs
        for i in range(3):
            h = h @ params[f"layer{i}"]["kernel"] + params[f"layer{i}"]["bias"]
            h = jnp.tanh(h) if i < 2 else h
        return optax.softmax_cross_entropy_with_integer_labels(h, labels).mean()

    return params, loss_fn


@pytest.mark.parametrize("name", NAMES)
def test_trains_a_small_mlp(name):
    """Full-batch two-spirals: cross-entropy below 0.1 nats (from 0.69) in 2000 steps."""
    case = CASES[name]
    params, loss_fn = mlp_problem()
    _, loss = minimise(case.make(decayed(case.mlp_lr, 2000)), loss_fn, params, 2000, case.hessian)
    assert loss < 0.1, loss


# --- pytrees, dtypes, sharding, memory ----------------------------------------------------


def nested_params(dtype=jnp.float32):
    """A Linen-style nested dict with a list inside: the shapes a real model has."""
    return {
        "embed": {"embedding": jnp.ones((16, 8), dtype)},
        "blocks": [
            {"dense": {"kernel": jnp.full((8, 8), 0.1, dtype), "bias": jnp.zeros(8, dtype)}},
            {
                "norm": {"scale": jnp.ones(8, dtype)},
                "conv": {"kernel": jnp.ones((3, 3, 2, 8), dtype)},
            },
        ],
        "temperature": jnp.asarray(1.0, dtype),
    }


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "dtype, x64", [(jnp.float32, False), (jnp.bfloat16, False), (jnp.float32, True)]
)
def test_jitted_step_on_nested_pytree_keeps_structure_and_dtype(name, dtype, x64):
    """Params and state keep their structure and dtypes (a ``lax.scan`` carry must), also
    under ``jax_enable_x64``, where a float64 counter or constant could promote them."""
    with jax.enable_x64(x64):
        tx = CASES[name].make(1e-3)
        params = nested_params(dtype)
        grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
        state = jax.jit(tx.init)(params)
        state_types = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        for _ in range(3):
            updates, state = jax.jit(tx.update)(grads, state, params)
            params = optax.apply_updates(params, updates)
        assert jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state) == state_types
    assert jax.tree.structure(params) == jax.tree.structure(nested_params(dtype))
    for leaf in jax.tree.leaves(params):
        assert leaf.dtype == dtype
        assert bool(jnp.all(jnp.isfinite(leaf.astype(jnp.float32))))


@pytest.mark.parametrize("name", NAMES)
def test_works_on_flax_nnx_state(name):
    from flax import nnx

    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.LayerNorm(4, rngs=nnx.Rngs(1)))
    params = nnx.state(model, nnx.Param)
    tx = CASES[name].make(1e-2)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    nnx.update(model, new_params)
    assert jax.tree.structure(new_params) == jax.tree.structure(params)


def state_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


@pytest.mark.parametrize("name", NAMES)
def test_state_bytes_per_parameter(name):
    """Measured on one million float32 parameters; counters and scalars add under 1e-4."""
    params = {"w": jnp.zeros((1000, 1000), jnp.float32)}
    state = jax.eval_shape(CASES[name].make(1e-3).init, params)
    per_param = state_bytes(state) / 1e6
    assert per_param == pytest.approx(CASES[name].state_bytes_per_param, abs=1e-4)


def sharded_params(mesh):
    specs = {"w": P("d", None), "v": P("d"), "m": P(None, "d"), "s": P()}
    shapes = {"w": (16, 6), "v": (24,), "m": (3, 8), "s": ()}
    return {
        k: jax.device_put(
            jnp.arange(np.prod(shapes[k]), dtype=jnp.float32).reshape(shapes[k]) / 10,
            NamedSharding(mesh, specs[k]),
        )
        for k in specs
    }


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_state_is_sharded_like_the_params(name, axis_type):
    """1-D mesh of 8 devices: jitted init and update keep each moment's sharding = its param's."""
    mesh = jax.make_mesh((8,), ("d",), axis_types=(axis_type,))
    tx = CASES[name].make(1e-2)
    with jax.set_mesh(mesh):
        params = sharded_params(mesh)
        init_state = jax.jit(tx.init)(params)
        grads = jax.tree.map(lambda p: p * 0.5 + 1.0, params)
        updates, state = jax.jit(tx.update)(grads, init_state, params)

    # Every param has a distinct shape, so a state buffer mirrors the param of its shape.
    by_shape = {p.shape: p for p in jax.tree.leaves(params)}

    def check(leaf):
        param = by_shape[leaf.shape]
        same = leaf.sharding.is_equivalent_to(param.sharding, param.ndim)
        assert same, (leaf.shape, leaf.sharding, param.sharding)

    jax.tree.map(check, updates)
    for s in (init_state, state):
        mirrors = [x for x in jax.tree.leaves(s) if x.shape in by_shape and x.ndim > 0]
        assert mirrors or CASES[name].state_bytes_per_param < 1
        for leaf in mirrors:
            check(leaf)


def test_the_sharding_check_catches_a_replicated_state(monkeypatch):
    """The check above fails for optax.adam, whose jitted init replicates the moments on an
    Auto mesh (the README's claim; if Optax changes this, update the README)."""
    monkeypatch.setitem(CASES, "optax_adam", Case(lambda lr: optax.adam(lr), 8, 0, 0, 0))
    with pytest.raises(AssertionError):
        test_state_is_sharded_like_the_params("optax_adam", AxisType.Auto)
