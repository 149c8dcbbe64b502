"""Adafactor vs its float64 reference and Optax; factoring, memory, dtypes, sharding, inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optim_jax
from optim_jax import base, transforms
from tests import harness
from tests.reference import adafactor as ref


def decaying(value):
    """A schedule: checks that hyperparameters are read at the 0-based update count."""
    return lambda step: value / (1.0 + 0.1 * step)


def threshold(n):
    return lambda shape: len(shape) >= 2 and min(shape[-2:]) >= n


SHAPES_WITH_SQUARE = {**harness.LEAF_SHAPES, "square": (130, 130)}
DECAY_MASK = {k: len(s) >= 2 for k, s in harness.LEAF_SHAPES.items()}


def decay_matrices(params):
    """A mask given as a function of the params: decay only tensors of rank >= 2."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


# (our keyword arguments, reference keyword arguments, leaf shapes)
CASES = {
    "defaults": ({}, {}, harness.LEAF_SHAPES),
    "warmup_init": ({"warmup_init": True}, {"warmup_init": True}, harness.LEAF_SHAPES),
    "manual_lr_no_param_scale": (
        {"learning_rate": decaying(0.05), "scale_parameter": False},
        {"lr": decaying(0.05), "scale_parameter": False},
        harness.LEAF_SHAPES,
    ),
    "manual_lr_b1_weight_decay": (
        {"learning_rate": 0.02, "b1": 0.9, "weight_decay": 0.1},
        {"lr": 0.02, "b1": 0.9, "wd": 0.1},
        harness.LEAF_SHAPES,
    ),
    "relative_b1_scheduled_decay_masked": (
        {"b1": 0.8, "weight_decay": decaying(0.5), "mask": decay_matrices},
        {"b1": 0.8, "wd": decaying(0.5), "decay_mask": DECAY_MASK},
        harness.LEAF_SHAPES,
    ),
    "clipping_active_and_other_eps": (
        {"clip_threshold": 0.5, "eps": (1e-20, 0.5), "decay_rate": -0.5},
        {"clip": 0.5, "eps1": 1e-20, "eps2": 0.5, "decay_rate": -0.5},
        harness.LEAF_SHAPES,
    ),
    "no_clipping_unfactored": (
        {"clip_threshold": None, "factored": False},
        {"clip": None, "factor": lambda shape: False},
        harness.LEAF_SHAPES,
    ),
    "min_dim_size_to_factor_128": (
        {"min_dim_size_to_factor": 128, "b1": 0.9},
        {"factor": threshold(128), "b1": 0.9},
        SHAPES_WITH_SQUARE,
    ),
}


def view(opt_state):
    """Reference names -> our buffers; leaves a leaf does not use (None) are left out."""
    state = base.find_state(opt_state, transforms.AdafactorState)
    out = {
        name: {k: x for k, x in tree.items() if x is not None}
        for name, tree in (("v_row", state.v_row), ("v_col", state.v_col), ("v", state.v))
    }
    if state.mu is not None:
        out["m"] = state.mu
    return out


@pytest.mark.usefixtures("platform_branch")
@pytest.mark.parametrize("name", sorted(CASES))
def test_adafactor_matches_reference(name):
    ours, theirs, shapes = CASES[name]
    init, step = ref.make(**theirs)
    harness.check_against_reference(
        lambda: optim_jax.adafactor(**ours), init, step, view, shapes=shapes
    )


@pytest.mark.usefixtures("platform_branch")
def test_scale_by_factored_rms_matches_reference():
    """The preconditioner alone: p - lr * g / sqrt(v_hat), no clipping or parameter scale."""

    def factored_view(opt_state):
        state = base.find_state(opt_state, transforms.FactoredRmsState)
        trees = (("v_row", state.v_row), ("v_col", state.v_col), ("v", state.v))
        return {name: {k: x for k, x in t.items() if x is not None} for name, t in trees}

    init, step = ref.make(lr=0.01, clip=None, scale_parameter=False, factor=threshold(3))
    harness.check_against_reference(
        lambda: optax.chain(
            transforms.scale_by_factored_rms(min_dim_size_to_factor=3),
            transforms.scale_by_learning_rate(0.01),
        ),
        init,
        step,
        factored_view,
    )


def optax_decay_float64(step, exponent):
    """Optax's default decay schedule 1 - (step + 1)^-exponent, formed in float64."""
    return 1.0 - (step + 1).astype(jnp.float64) ** (-exponent)


@pytest.mark.usefixtures("platform_branch")
@pytest.mark.parametrize("min_dim", [0, 128])
def test_scale_by_factored_rms_matches_optax(min_dim):
    shapes = SHAPES_WITH_SQUARE
    params, grads = harness.random_params(8, shapes), harness.random_grads(8, 20, shapes)
    ours = optax.chain(
        transforms.scale_by_factored_rms(min_dim_size_to_factor=min_dim),
        transforms.scale_by_learning_rate(0.01),
    )
    theirs = optax.chain(
        optax.scale_by_factored_rms(
            min_dim_size_to_factor=min_dim, decay_rate_fn=optax_decay_float64
        ),
        optax.scale(-0.01),
    )
    harness.assert_trajectories_close(
        harness.run_ours(ours, params, grads),
        harness.run_ours(theirs, params, grads),
        1e-12,
        "optax.scale_by_factored_rms",
    )


OPTAX_CASES = [
    # (ours, optax.adafactor keyword arguments)
    (
        {"learning_rate": 0.01, "min_dim_size_to_factor": 128},
        {"learning_rate": 0.01, "min_dim_size_to_factor": 128},
    ),
    (
        {"learning_rate": decaying(0.05), "scale_parameter": False, "b1": 0.9},
        {
            "learning_rate": decaying(0.05),
            "min_dim_size_to_factor": 0,
            "multiply_by_parameter_scale": False,
            "momentum": 0.9,
        },
    ),
    # Relative step: Optax has none, but takes it as a schedule.
    (
        {},
        {
            "learning_rate": lambda c: jnp.minimum(1e-2, 1 / jnp.sqrt(c + 1.0)),
            "min_dim_size_to_factor": 0,
        },
    ),
    # Optax's decay is not multiplied by the step size: equal only for a constant
    # learning rate without parameter scaling, with Optax's rate = wd * lr.
    (
        {"learning_rate": 0.01, "scale_parameter": False, "weight_decay": 0.1},
        {
            "learning_rate": 0.01,
            "min_dim_size_to_factor": 0,
            "multiply_by_parameter_scale": False,
            "weight_decay_rate": 0.1 * 0.01,
        },
    ),
]


@pytest.mark.usefixtures("platform_branch")
@pytest.mark.parametrize("case", range(len(OPTAX_CASES)))
def test_adafactor_matches_optax_adafactor(case):
    """Same semantics configured on both sides (see the adafactor docstring).

    Optax forms beta2_t = 1 - t^-0.8 in float32 even under x64 (and keeps its
    momentum in float32 unless told otherwise), so the float64 parameter
    trajectories agree to about 1e-9 relative (measured), not 1e-12. The exact
    comparison is the preconditioner test above, where Optax's decay function
    can be replaced by a float64 one.
    """
    ours_kw, optax_kw = OPTAX_CASES[case]
    shapes = SHAPES_WITH_SQUARE
    params, grads = harness.random_params(9, shapes), harness.random_grads(9, 20, shapes)
    with jax.enable_x64(True):
        theirs = optax.adafactor(**optax_kw, dtype_momentum=jnp.float64)
    harness.assert_trajectories_close(
        harness.run_ours(optim_jax.adafactor(**ours_kw), params, grads),
        harness.run_ours(theirs, params, grads),
        1e-8,
        "optax.adafactor",
    )


def test_factoring_rule_and_state_shapes():
    shapes = {
        "scalar": (),
        "vector": (7,),
        "wide": (3, 130),
        "tall": (129, 2),
        "square": (130, 130),
        "tensor3": (2, 128, 129),
    }
    params = {k: jnp.zeros(s) for k, s in shapes.items()}

    def factored_leaves(**kwargs):
        state = base.find_state(
            jax.eval_shape(optim_jax.adafactor(**kwargs).init, params), transforms.AdafactorState
        )
        for k in shapes:
            assert (state.v_row[k] is None) == (state.v_col[k] is None) == (state.v[k] is not None)
        return {k for k in shapes if state.v_row[k] is not None}, state

    names, state = factored_leaves()
    assert names == {"wide", "tall", "square", "tensor3"}
    assert state.v_row["tensor3"].shape == (2, 128) and state.v_col["tensor3"].shape == (2, 129)
    assert state.v_row["wide"].shape == (3,) and state.v_col["wide"].shape == (130,)
    assert state.mu is None
    assert factored_leaves(min_dim_size_to_factor=128)[0] == {"square", "tensor3"}
    assert factored_leaves(min_dim_size_to_factor=131)[0] == set()
    assert factored_leaves(factored=False)[0] == set()


def state_bytes(tx, params):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(tx.init, params)))


def test_state_of_a_large_matrix_is_under_one_percent_of_adamw():
    params = {"w": jax.ShapeDtypeStruct((1024, 1024), jnp.float32)}
    adamw = state_bytes(optim_jax.adamw(1e-3), params)
    assert adamw >= 8 * 1024 * 1024
    ours = state_bytes(optim_jax.adafactor(), params)
    assert ours < 0.01 * 8 * 1024 * 1024, ours
    assert ours == 2 * 1024 * 4 + 2 * 4  # row and column statistics, two int32 counters


def test_bfloat16_params_give_finite_updates_and_documented_state_dtypes():
    params32 = {
        k: jnp.asarray(v, jnp.bfloat16).astype(jnp.float32)
        for k, v in harness.random_params(11).items()
    }
    grads32 = [
        {k: jnp.asarray(v, jnp.bfloat16).astype(jnp.float32) for k, v in g.items()}
        for g in harness.random_grads(11, 3)
    ]
    to_bf16 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)  # noqa: E731
    tx = optim_jax.adafactor(b1=0.9, weight_decay=0.01)
    update = jax.jit(tx.update)
    s16, s32 = tx.init(to_bf16(params32)), tx.init(params32)
    for g in grads32:
        u16, s16 = update(to_bf16(g), s16, to_bf16(params32))
        u32, s32 = update(g, s32, params32)
        for k in u16:
            assert u16[k].dtype == jnp.bfloat16
            assert bool(jnp.all(jnp.isfinite(u16[k])))
            np.testing.assert_allclose(
                np.asarray(u16[k], np.float32), np.asarray(u32[k]), rtol=0.02, atol=1e-5
            )
    state = base.find_state(s16, transforms.AdafactorState)
    stats = jax.tree.leaves((state.v_row, state.v_col, state.v))
    assert stats and all(x.dtype == jnp.float32 for x in stats)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.mu))


def test_state_is_sharded_like_the_parameters():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    specs = {"w": P("data", "model"), "t": P(None, "data", "model"), "b": P("data")}
    shapes = {"w": (16, 8), "t": (3, 8, 4), "b": (16,)}
    params = {k: jax.device_put(jnp.ones(shapes[k]), NamedSharding(mesh, specs[k])) for k in shapes}
    tx = optim_jax.adafactor(b1=0.9)

    def check(opt_state):
        state = base.find_state(opt_state, transforms.AdafactorState)
        want = {
            ("v_row", "w"): P("data"),
            ("v_col", "w"): P("model"),
            ("v_row", "t"): P(None, "data"),
            ("v_col", "t"): P(None, "model"),
            ("v", "b"): P("data"),
            ("mu", "w"): specs["w"],
            ("mu", "t"): specs["t"],
            ("mu", "b"): specs["b"],
        }
        for (field, k), spec in want.items():
            x = getattr(state, field)[k]
            assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim), (field, k)

    opt_state = jax.jit(tx.init)(params)
    check(opt_state)
    _, opt_state = jax.jit(tx.update)(params, opt_state, params)
    check(opt_state)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"clip_threshold": 0.0}, "clip_threshold"),
        ({"clip_threshold": -1.0}, "clip_threshold"),
        ({"eps": (-1e-30, 1e-3)}, "eps"),
        ({"eps": (1e-30, -1e-3)}, "eps"),
        ({"eps": 1e-30}, "eps"),
        ({"b1": 1.0}, "b1"),
        ({"b1": -0.1}, "b1"),
        ({"learning_rate": 1e-3, "relative_step": True}, "learning_rate"),
        ({"relative_step": False}, "learning_rate"),
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"learning_rate": 1e-3, "warmup_init": True}, "warmup_init"),
        ({"decay_rate": 0.8}, "decay_rate"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"min_dim_size_to_factor": -1}, "min_dim_size_to_factor"),
        ({"min_dim_size_to_factor": 1.5}, "min_dim_size_to_factor"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        optim_jax.adafactor(**kwargs)


def test_manual_learning_rate_selects_the_manual_step():
    """``adafactor(lr)`` needs no ``relative_step=False``: None derives it from the lr.

    The relative step is min(1e-2, 1/sqrt(t)) = 1e-2 for t <= 10^4, so the
    default equals a manual learning rate of 0.01 over a short run.
    """
    params, grads = harness.random_params(12), harness.random_grads(12, 5)
    manual = harness.run_ours(optim_jax.adafactor(0.01), params, grads)
    explicit = harness.run_ours(optim_jax.adafactor(0.01, relative_step=False), params, grads)
    relative = harness.run_ours(optim_jax.adafactor(), params, grads)
    harness.assert_trajectories_close(manual, explicit, 0.0, "relative_step=None")
    harness.assert_trajectories_close(manual, relative, 1e-15, "relative step")


def test_update_without_params_raises():
    tx = optim_jax.adafactor()
    params = {"w": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's reduction kernels")
@pytest.mark.parametrize(("factored", "bound"), [(True, 29.0), (False, 40.5)])
def test_the_cpu_step_writes_no_temporary(factored, bound):
    """Each reduction computes its input as it reads (``_apart``): the row and the column
    statistics square g, RMS(u) recomputes the update. With a shared ``g * g + eps1`` and a
    shared update XLA:CPU wrote both out and read them back: 44.3 bytes per parameter for
    this tree (measured before the change) against 28.3 now: the statistics 8, RMS(u) 4,
    RMS(p) 4 and the parameter update 12 (p and g read, p written). Optax's Adafactor: 56.2.
    Unfactored, the full statistic: 44.0 before (the update written out for its RMS), 40.0
    now (v read and written 8, g read for it 4, RMS(u) from g and the new v 8, RMS(p) 4, the
    parameter update reading p, g and v 16)."""
    shapes = {"embed": (512, 256), "q": (256, 256), "o": (256, 256), "norm": (256,)}
    params = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}
    n = sum(np.prod(v) for v in shapes.values())
    assert harness.step_bytes(optim_jax.adafactor(factored=factored), params) / n < bound
