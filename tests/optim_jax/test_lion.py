"""Lion (optim_jax/transforms/lion.py and the ``lion`` alias) against the paper's float64
reference, the lion-pytorch update order and optax.lion.

The float32 run of ``check_against_reference`` compares ``sign(b1 m + (1 - b1) g)``
computed in float32 with the float64 one. They could legitimately differ on a
coordinate within float32 rounding (~1e-7 relative) of zero; with the Gaussian
data of these seeds no coordinate comes that close, so the seeds are kept.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_jax
from optim_jax import base, transforms
from tests import harness
from tests.reference import lion as ref


def constant(value):
    return lambda step: value


def decaying(value):
    """A schedule: checks that hyperparameters are read at the 0-based update count."""
    return lambda step: value / (1.0 + 0.1 * step)


MASK = {name: len(shape) >= 2 for name, shape in harness.LEAF_SHAPES.items()}


def lion_view(opt_state):
    return {"m": base.find_state(opt_state, transforms.LionState).mu}


CASES = [
    dict(lr=constant(1e-3), kwargs=dict()),
    dict(lr=decaying(1e-3), kwargs=dict(weight_decay=0.1)),
    dict(lr=constant(3e-3), kwargs=dict(b1=0.95, b2=0.98, weight_decay=1.0, mask=MASK)),
]


def reference(rule, case):
    kwargs = case["kwargs"]
    return rule(
        case["lr"],
        kwargs.get("b1", 0.9),
        kwargs.get("b2", 0.99),
        kwargs.get("weight_decay", 0.0),
        kwargs.get("mask"),
    )


@pytest.mark.usefixtures("platform_branch")
@pytest.mark.parametrize("case", CASES)
def test_lion_matches_reference(case):
    harness.check_against_reference(
        lambda: optim_jax.lion(case["lr"], **case["kwargs"]),
        *reference(ref.paper, case),
        lion_view,
    )


@pytest.mark.usefixtures("platform_branch")
@pytest.mark.parametrize("case", CASES)
def test_lion_matches_optax_and_lion_pytorch_rule(case):
    params, grads = harness.random_params(1), harness.random_grads(1, 20)
    ours = harness.run_ours(optim_jax.lion(case["lr"], **case["kwargs"]), params, grads)
    # Optax's default weight_decay is 1e-3, ours 0: pass it explicitly.
    theirs = optax.lion(case["lr"], **{"weight_decay": 0.0, **case["kwargs"]})
    harness.assert_trajectories_close(ours, harness.run_ours(theirs, params, grads), 1e-12, "optax")
    init, step = reference(ref.lion_pytorch, case)
    p, s, want = params, init(params), []
    for t, g in enumerate(grads, start=1):
        p, s = step(p, g, s, t)
        want.append(p)
    harness.assert_trajectories_close(ours, want, 1e-12, "lion-pytorch order")


def test_optax_default_weight_decay_differs_from_ours():
    params, grads = harness.random_params(2), harness.random_grads(2, 5)
    ours = harness.run_ours(optim_jax.lion(1e-3), params, grads)
    theirs = harness.run_ours(optax.lion(1e-3), params, grads)
    assert max(np.max(np.abs(ours[-1][k] - theirs[-1][k])) for k in params) > 1e-8


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_state_is_exactly_one_buffer_per_parameter(dtype):
    params = {k: jnp.asarray(v, dtype) for k, v in harness.random_params(3).items()}
    state = transforms.scale_by_lion().init(params)
    assert state.count.shape == ()  # the update counter, a scalar
    leaves = jax.tree.leaves(state.mu)
    assert len(leaves) == len(params)
    for buffer, p in zip(leaves, jax.tree.leaves(params), strict=True):
        assert buffer.shape == p.shape and buffer.dtype == p.dtype
    n_params = sum(p.size for p in jax.tree.leaves(params))
    assert sum(x.nbytes for x in leaves) == n_params * jnp.dtype(dtype).itemsize
    # The whole optimizer adds only scalar counters (learning rate, weight decay) to that.
    full = optim_jax.lion(decaying(1e-3), weight_decay=0.1).init(params)
    lion_state = base.find_state(full, transforms.LionState)
    others = [
        x for x in jax.tree.leaves(full) if not any(x is y for y in jax.tree.leaves(lion_state))
    ]
    assert all(x.shape == () for x in others)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's copy insertion")
@pytest.mark.parametrize("layout", ["per_leaf", "flat"])
def test_the_cpu_step_updates_the_moment_in_place(layout):
    """The direction is computed from the new moment on CPU, so XLA needs no copy of the old
    one: 7 float32 accesses per parameter (the moment kernel reads m and g and writes m; the
    parameter kernel reads p, the new m and g and writes p). From the old moment, as Optax
    computes it, XLA:CPU copies m every step: 36 bytes (9 accesses) for this tree, measured
    with ``optax.lion`` when the test was written."""
    shapes = {"embed": (512, 256), "norm": (256,), "q": (256, 256), "bias": (256,)}
    params = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}
    if layout == "flat":
        params = jax.eval_shape(optim_jax.flat_layout(params).pack, params)
    n = sum(np.prod(v) for v in shapes.values())
    assert harness.step_bytes(optim_jax.lion(1e-4, weight_decay=0.1), params) / n < 28.5


@pytest.mark.usefixtures("platform_branch")
@pytest.mark.parametrize("b1,b2", [(0.9, 0.99), (0.95, 0.98), (0.9, 0.9), (0.0, 0.5)])
def test_the_direction_from_the_new_moment_has_the_papers_sign(b1, b2):
    """On CPU the direction is ``sign((b1/b2) m_t + (1 - b1/b2) g_t)`` (elsewhere the
    paper's form, in float32); float64's ``sign(b1 m_{t-1} + (1 - b1) g_t)`` must agree on
    every coordinate whose interpolation is not within float32 rounding of zero:
    ``|c| > 1e-6 (|m| + |g|)``, a few ulps of the terms (float32's unit roundoff is 6e-8). A
    million coordinates, moments and gradients of mixed scales so that both terms matter."""
    rng = np.random.default_rng(0)
    n = 1_000_000
    m = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 1, n)).astype(np.float32)
    g = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 1, n)).astype(np.float32)
    tx = transforms.scale_by_lion(b1, b2)
    state = transforms.LionState(count=jnp.int32(3), mu=jnp.asarray(m))
    direction, _ = jax.jit(tx.update)(jnp.asarray(g), state)
    m64, g64 = m.astype(np.float64), g.astype(np.float64)
    c = b1 * m64 + (1 - b1) * g64
    clear = np.abs(c) > 1e-6 * (np.abs(m64) + np.abs(g64))
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(np.asarray(direction)[clear], np.sign(c)[clear])


@pytest.mark.usefixtures("platform_branch")
def test_every_coordinate_moves_by_exactly_lr_without_weight_decay():
    lr = 2.0**-7
    params, grads = harness.random_params(4), harness.random_grads(4, 5)
    tx = optim_jax.lion(lr)
    p = jax.tree.map(jnp.asarray, {k: v.astype(np.float32) for k, v in params.items()})
    state = tx.init(p)
    update = jax.jit(tx.update)
    for g in grads:
        m = base.find_state(state, transforms.LionState).mu
        c = jax.tree.map(lambda m, g: 0.9 * np.asarray(m, np.float64) + 0.1 * g, m, g)
        updates, state = update(jax.tree.map(jnp.float32, g), state, p)
        for k in p:
            assert np.all(c[k] != 0)  # Gaussian data: no zero interpolations
            np.testing.assert_array_equal(np.asarray(updates[k]), -lr * np.sign(c[k]))
        new_p = optax.apply_updates(p, updates)
        for k in p:
            # Each parameter moved by lr, up to the rounding of p - lr (half an ulp of p).
            moved = np.abs(np.asarray(new_p[k], np.float64) - np.asarray(p[k], np.float64))
            ulp = np.spacing(np.maximum(np.abs(np.asarray(p[k])), np.abs(np.asarray(new_p[k]))))
            assert np.all(np.abs(moved - lr) <= ulp)
        p = new_p


@pytest.mark.usefixtures("platform_branch")
def test_sign_of_zero_does_not_move_the_coordinate():
    """sign(0) = 0: a coordinate with zero momentum and zero gradient gets no sign step."""
    params = {"w": jnp.array([1.0, -2.0, 3.0, 4.0])}
    grads = {"w": jnp.array([0.5, 0.0, -0.25, 0.0])}
    tx = optim_jax.lion(0.1, weight_decay=0.5, mask=None)
    updates, _ = tx.update(grads, tx.init(params), params)
    # sign(c) = [1, 0, -1, 0]; the decay lr * wd * p applies everywhere.
    want = -0.1 * (np.array([1.0, 0.0, -1.0, 0.0]) + 0.5 * np.asarray(params["w"]))
    np.testing.assert_allclose(updates["w"], want, rtol=1e-6)
    updates, _ = optim_jax.lion(0.1).update(grads, optim_jax.lion(0.1).init(params), params)
    np.testing.assert_array_equal(updates["w"], np.float32([-0.1, 0.0, 0.1, 0.0]))


def test_bfloat16_params_keep_their_dtype():
    params = {"w": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.bfloat16).reshape(4, 3)}
    tx = optim_jax.lion(1e-3, weight_decay=0.1)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(params, state, params)
    assert updates["w"].dtype == jnp.bfloat16
    assert base.find_state(state, transforms.LionState).mu["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: optim_jax.lion(-1e-4), "learning_rate"),
        (lambda: optim_jax.lion(1e-4, b1=1.0), "b1"),
        (lambda: optim_jax.lion(1e-4, b1=1.5), "b1"),
        (lambda: optim_jax.lion(1e-4, b2=-0.1), "b2"),
        (lambda: optim_jax.lion(1e-4, b2=1.0), "b2"),
        (lambda: optim_jax.lion(1e-4, weight_decay=-1e-2), "weight_decay"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_scheduled_betas_are_read_at_the_update_count():
    b1 = lambda step: 0.9 - 0.2 / (1.0 + step)  # noqa: E731
    b2 = lambda step: 0.99 - 0.1 / (1.0 + step)  # noqa: E731
    harness.check_against_reference(
        lambda: optim_jax.lion(constant(1e-3), b1=b1, b2=b2),
        *ref.paper(constant(1e-3), b1, b2),
        lion_view,
    )
