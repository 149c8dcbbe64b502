"""LAMB and LARS (optim_jax/transforms/trust_ratio.py and their aliases) against float64
references from the papers, and against Optax where the semantics agree."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_jax
from optim_jax import base, transforms
from tests import harness
from tests.reference import trust_ratio as ref


def constant(value):
    return lambda step: value


def decaying(value):
    """A schedule: checks that hyperparameters are read at the 0-based update count."""
    return lambda step: value / (1.0 + 0.1 * step)


# Exempt the vector and the scalar (bias-like leaves) from decay / adaptation.
MASK = {name: len(shape) >= 2 for name, shape in harness.LEAF_SHAPES.items()}


def max_rel_diff(ours, want):
    """The largest leafwise ``max|a - b| / max|b|`` over a trajectory."""
    worst = 0.0
    for a, b in zip(ours, want, strict=True):
        for k in b:
            worst = max(worst, np.max(np.abs(a[k] - b[k])) / np.max(np.abs(b[k])))
    return worst


# ----------------------------------------------------------------------------- LAMB


def adam_view(opt_state):
    state = base.find_state(opt_state, transforms.AdamState)
    return {"m": state.mu, "v": state.nu}


LAMB_CASES = [
    dict(lr=constant(1e-2), kwargs=dict()),
    dict(lr=decaying(1e-2), kwargs=dict(weight_decay=0.1)),
    dict(lr=constant(3e-2), kwargs=dict(b1=0.8, b2=0.99, eps=1e-3, weight_decay=0.3, mask=MASK)),
]


@pytest.mark.usefixtures("platform_branch")
@pytest.mark.parametrize("case", LAMB_CASES)
def test_lamb_matches_reference(case):
    kwargs = case["kwargs"]
    init, step = ref.lamb(
        case["lr"],
        kwargs.get("b1", 0.9),
        kwargs.get("b2", 0.999),
        kwargs.get("eps", 1e-6),
        kwargs.get("weight_decay", 0.0),
        kwargs.get("mask"),
    )
    harness.check_against_reference(
        lambda: optim_jax.lamb(case["lr"], **kwargs), init, step, adam_view
    )


@pytest.mark.usefixtures("platform_branch")
@pytest.mark.parametrize("case", LAMB_CASES)
def test_lamb_matches_optax(case):
    """Optax applies the trust ratio to every leaf and the mask to the decay only, as we do."""
    params, grads = harness.random_params(1), harness.random_grads(1, 20)
    ours = harness.run_ours(optim_jax.lamb(case["lr"], **case["kwargs"]), params, grads)
    want = harness.run_ours(optax.lamb(case["lr"], **case["kwargs"]), params, grads)
    harness.assert_trajectories_close(ours, want, 1e-12, "optax.lamb")


@pytest.mark.usefixtures("platform_branch")
def test_lamb_mask_exempts_decay_but_not_trust_ratio():
    """A masked leaf steps exactly as it would with weight_decay=0, trust ratio included."""
    params, grads = harness.random_params(2), harness.random_grads(2, 5)
    masked = harness.run_ours(optim_jax.lamb(1e-2, weight_decay=0.5, mask=MASK), params, grads)
    no_decay = harness.run_ours(optim_jax.lamb(1e-2), params, grads)
    decayed = harness.run_ours(optim_jax.lamb(1e-2, weight_decay=0.5), params, grads)
    for a, b, c in zip(masked, no_decay, decayed, strict=True):
        for k in params:
            np.testing.assert_allclose(a[k], (c if MASK[k] else b)[k], rtol=1e-13, atol=0)
    # The trust ratio is active on the exempt leaves: their step has norm lr * ||p||.
    step = {k: masked[0][k] - params[k] for k in params}
    for k in ("vector", "scalar"):
        np.testing.assert_allclose(np.linalg.norm(step[k]), 1e-2 * np.linalg.norm(params[k]))


def _lamb_as_a_chain(wd, mask=None, moment_dtype=None):
    """LAMB as the chain ``scale_by_lamb`` must equal: Adam, decay, trust ratio, lr."""
    direction = [transforms.scale_by_adam(0.9, 0.999, 1e-6, moment_dtype)]
    if wd:
        direction.append(transforms.add_decayed_weights(wd, mask))
    return optax.chain(
        optax.chain(optax.chain(*direction), transforms.scale_by_trust_ratio()),
        transforms.scale_by_learning_rate(1e-2),
    )


LAMB_CPU_CASES = {
    "no_decay": dict(wd=0.0),
    "decay": dict(wd=0.1),
    "scheduled_decay_and_mask": dict(wd=decaying(0.1), mask=lambda p: {k: k != "b" for k in p}),
    "bf16_params_f32_moments": dict(wd=0.1, moment_dtype="float32", dtype=jnp.bfloat16),
    "bf16_moments": dict(wd=0.1, moment_dtype="bfloat16"),
    "int8_moments": dict(wd=0.1, moment_dtype="int8"),
}


# int8 moments refuse the flat layout (tests/optim_jax/test_quantization.py).
LAMB_CPU_RUNS = [
    (case, layout)
    for case in LAMB_CPU_CASES
    for layout in ("per_leaf", "flat")
    if (case, layout) != ("int8_moments", "flat")
]


@pytest.mark.usefixtures("platform_branch")
@pytest.mark.parametrize("case, layout", LAMB_CPU_RUNS)
def test_lamb_is_its_chain_on_every_layout_and_moment_dtype(case, layout):
    """On CPU ``scale_by_lamb`` takes ``||u||`` from ``u`` computed again inside the norm's
    kernel (and, with rounded moments, from ``u`` itself): its 8 steps must move the
    parameters as the plain chain does. Not bit for bit: the two programs' norms are float32
    sums that XLA may block differently, so the trust ratios differ by float32 roundings
    (1e-7 relative); the bound 1e-5 of the largest move is far below what a missing or
    misplaced decay term does to a ratio (10% here)."""
    case = dict(LAMB_CPU_CASES[case])
    dtype = case.pop("dtype", jnp.float32)
    rng = np.random.default_rng(0)
    shapes = {"w": (384, 256), "e": (300, 64), "b": (256,)}
    params = {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in shapes.items()}
    grads = [
        {k: jnp.asarray(1e-2 * rng.standard_normal(s), dtype) for k, s in shapes.items()}
        for _ in range(8)
    ]
    wd, mask, moment_dtype = case["wd"], case.get("mask"), case.get("moment_dtype")
    results = []
    for tx in (
        optim_jax.lamb(1e-2, 0.9, 0.999, 1e-6, wd, mask, moment_dtype),
        _lamb_as_a_chain(wd, mask, moment_dtype),
    ):
        p = params
        if layout == "flat":
            p = optim_jax.flat_layout(params).pack(params)
        state, step = tx.init(p), jax.jit(harness.apply_step(tx))
        for g in grads:
            g = optim_jax.flat.flatten_like(p, g)
            p, state = step(p, state, g)
        results.append(optim_jax.flat.unflatten(p))
    for k in shapes:
        ours, chain = (np.asarray(r[k], np.float64) for r in results)
        if dtype == jnp.bfloat16:
            # Ratios a float32 rounding apart can round a bfloat16 parameter the other way, and
            # its later steps then round from another value: a few elements may part by a few
            # bfloat16 ulps (2^-7 relative each) of the parameter or of a step (lr = 1e-2).
            assert np.all(np.abs(ours - chain) <= 2.0**-5 * np.maximum(np.abs(chain), 1e-2)), k
            assert np.mean(ours != chain) < 0.005, k
            continue
        start = np.asarray(params[k], np.float64)
        moved, moved_by_chain = ours - start, chain - start
        assert np.max(np.abs(moved - moved_by_chain)) <= 1e-5 * np.max(np.abs(moved_by_chain)), k


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusion of reductions")
@pytest.mark.parametrize("layout", ["per_leaf", "flat"])
def test_the_cpu_lamb_step_writes_no_update_out(layout):
    """14 float32 accesses per parameter: Adam's two moment kernels (g, m -> m; g, v -> v),
    the sum of squares of u computed inside its kernel from p and the new m and v, that of p,
    and the update (p, m, v -> p). The chain writes u out for the sum and reads it back:
    60 bytes per parameter on the per-leaf layout, 63 on the flat one (its norms' chunk sums
    read u again), as measured when this test was written."""
    shapes = {"embed": (512, 256), "norm": (256,), "q": (256, 256), "bias": (256,)}
    params = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}
    bound = 56.5
    if layout == "flat":
        params = jax.eval_shape(optim_jax.flat_layout(params).pack, params)
        bound = 59.5  # the chunk sums' and segment sums' small arrays
    n = sum(np.prod(v) for v in shapes.values())
    assert harness.step_bytes(optim_jax.lamb(1e-3, weight_decay=0.1), params) / n < bound


def test_trust_ratio_scales_update_norm_to_param_norm():
    params = {"w": jnp.arange(1.0, 7.0).reshape(2, 3), "b": jnp.array([3.0, -4.0])}
    updates = {"w": jnp.full((2, 3), 0.25), "b": jnp.array([1e-3, 0.0])}
    out, _ = transforms.scale_by_trust_ratio().update(updates, optax.EmptyState(), params)
    for k in params:
        np.testing.assert_allclose(jnp.linalg.norm(out[k]), jnp.linalg.norm(params[k]), rtol=1e-6)
        # Same direction as the incoming update.
        cos = jnp.vdot(out[k], updates[k]) / (jnp.linalg.norm(out[k]) * jnp.linalg.norm(updates[k]))
        np.testing.assert_allclose(cos, 1.0, rtol=1e-6)


def test_trust_ratio_is_one_where_a_norm_is_zero():
    params = {"zero_param": jnp.zeros(3), "zero_update": jnp.ones(3), "both": jnp.zeros(2)}
    updates = {
        "zero_param": jnp.array([1.0, -2.0, 3.0]),
        "zero_update": jnp.zeros(3),
        "both": jnp.zeros(2),
    }
    tx = transforms.scale_by_trust_ratio()
    out, _ = tx.update(updates, tx.init(params), params)
    for k in params:
        np.testing.assert_array_equal(out[k], updates[k])
    # and the gradient through the zero case is finite (no 0/0 in the untaken branch)
    grad = jax.grad(lambda u: jnp.sum(tx.update(u, tx.init(params), params)[0]["both"]))(updates)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grad))


@pytest.mark.parametrize("trust_coefficient,eps", [(1.0, 0.0), (0.02, 1e-3)])
def test_scale_by_trust_ratio_matches_optax(trust_coefficient, eps):
    params = harness.random_params(3)
    params["zero"] = np.zeros(4)
    updates = harness.random_grads(3, 1)[0]
    updates["zero"] = np.ones(4)
    updates["vector"] = np.zeros_like(updates["vector"])
    with jax.enable_x64(True):
        ours, _ = transforms.scale_by_trust_ratio(trust_coefficient, eps).update(
            updates, optax.EmptyState(), params
        )
        theirs, _ = optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=eps).update(
            updates, optax.ScaleByTrustRatioState(), params
        )
        harness.assert_close(ours, theirs, 1e-14, "scale_by_trust_ratio ")


# ----------------------------------------------------------------------------- LARS


def lars_view(opt_state):
    found = base.find_states(opt_state, transforms.TraceState)
    return {"momentum": found[0].momentum} if found else {}


def our_buffer_layout(init, step):
    """The reference with its velocity ``v`` stored as ``-v``, the buffer our chain keeps.

    ``lars`` is ``scale_by_lars -> scale_by_learning_rate -> trace``: the learning rate
    flips the sign before the momentum trace, so the buffer is the step applied, ``-v``.
    """

    def to_ours(state):
        return {"momentum": {k: -x for k, x in state["v"].items()}} if state else {}

    def to_ref(state):
        return {"v": {k: -x for k, x in state["momentum"].items()}} if state else {}

    def our_step(params, grads, state, t):
        new_params, new_state = step(params, grads, to_ref(state), t)
        return new_params, to_ours(new_state)

    return lambda params: to_ours(init(params)), our_step


LARS_CASES = [
    dict(lr=decaying(1.0), kwargs=dict()),
    dict(lr=constant(0.5), kwargs=dict(weight_decay=0.5, trust_coefficient=0.02)),
    dict(lr=decaying(0.5), kwargs=dict(weight_decay=decaying(0.3), trust_coefficient=0.05)),
    dict(
        lr=decaying(1.0),
        kwargs=dict(momentum=0.8, weight_decay=0.2, trust_coefficient=0.01, eps=1e-2, mask=MASK),
    ),
    dict(lr=constant(0.1), kwargs=dict(momentum=0.0, weight_decay=0.1, trust_coefficient=0.1)),
]


def lars_reference(lr, kwargs, **variant):
    return ref.lars(
        lr,
        kwargs.get("momentum", 0.9),
        kwargs.get("weight_decay", 0.0),
        kwargs.get("trust_coefficient", 0.001),
        kwargs.get("eps", 0.0),
        kwargs.get("mask"),
        **variant,
    )


@pytest.mark.parametrize("case", LARS_CASES)
def test_lars_matches_reference(case):
    init, step = our_buffer_layout(*lars_reference(case["lr"], case["kwargs"]))
    harness.check_against_reference(
        lambda: optim_jax.lars(case["lr"], **case["kwargs"]), init, step, lars_view
    )


@pytest.mark.parametrize("mask", [None, MASK])
def test_lars_matches_optax_without_weight_decay(mask):
    """With weight_decay=0 the paper's denominator and Optax's coincide."""
    params, grads = harness.random_params(4), harness.random_grads(4, 20)
    ours = optim_jax.lars(decaying(1.0), trust_coefficient=0.02, eps=1e-3, mask=mask)
    theirs = optax.lars(
        decaying(1.0),
        trust_coefficient=0.02,
        eps=1e-3,
        weight_decay_mask=True if mask is None else mask,
        trust_ratio_mask=True if mask is None else mask,
    )
    harness.assert_trajectories_close(
        harness.run_ours(ours, params, grads),
        harness.run_ours(theirs, params, grads),
        1e-12,
        "optax.lars",
    )


def reference_trajectory(init, step, params, grads):
    """The free-running float64 parameter trajectory of a reference."""
    p, s, trajectory = params, init(params), []
    for t, g in enumerate(grads, start=1):
        p, s = step(p, g, s, t)
        trajectory.append(p)
    return trajectory


def largest_gap(a, b):
    return max(np.max(np.abs(a[k] - b[k])) for k in a)


def test_lars_denominator_is_the_papers_not_optaxs():
    """With weight decay, Optax divides by ||g + wd*w||; we follow the paper's ||g|| + wd*||w||."""
    params, grads = harness.random_params(5), harness.random_grads(5, 20)
    kwargs = dict(weight_decay=0.5, trust_coefficient=0.02)
    ours = harness.run_ours(optim_jax.lars(1.0, **kwargs), params, grads)
    theirs = harness.run_ours(optax.lars(1.0, **kwargs), params, grads)
    paper = reference_trajectory(*lars_reference(constant(1.0), kwargs), params, grads)
    optax_rule = reference_trajectory(
        *lars_reference(constant(1.0), kwargs, denominator="optax"), params, grads
    )
    harness.assert_trajectories_close(ours, paper, 1e-11, "paper denominator")
    # The difference from Optax is exactly the denominator: its rule reproduces optax.lars.
    harness.assert_trajectories_close(theirs, optax_rule, 1e-11, "optax denominator")
    # ... and the two rules take visibly different steps.
    moved = largest_gap(ours[-1], params)
    assert largest_gap(ours[-1], theirs[-1]) > 0.05 * moved


def test_lars_learning_rate_is_inside_the_momentum_buffer():
    """With a schedule, ``v = m v + lr_t * ...`` (paper, Optax) is not timm's ``w -= lr_t * v``."""
    params, grads = harness.random_params(6), harness.random_grads(6, 20)
    kwargs = dict(trust_coefficient=0.02)
    for lr, should_differ in ((decaying(1.0), True), (constant(1.0), False)):
        ours = harness.run_ours(optim_jax.lars(lr, **kwargs), params, grads)
        outside = reference_trajectory(
            *lars_reference(lr, kwargs, lr_placement="outside"), params, grads
        )
        moved = largest_gap(ours[-1], params)
        gap = largest_gap(ours[-1], outside[-1])
        assert gap > 0.05 * moved if should_differ else gap <= 1e-12 * moved, (gap, moved)


def test_lars_masked_leaves_take_plain_sgd_momentum_steps():
    """Mask-False leaves: no decay, no local lr; with a constant lr exactly torch-style SGD."""
    params, grads = harness.random_params(7), harness.random_grads(7, 10)
    lars = harness.run_ours(
        optim_jax.lars(0.1, weight_decay=0.5, trust_coefficient=0.02, mask=MASK), params, grads
    )
    sgd = harness.run_ours(optim_jax.sgd(0.1, momentum=0.9), params, grads)
    for a, b in zip(lars, sgd, strict=True):
        for k in params:
            if MASK[k]:
                assert np.max(np.abs(a[k] - b[k])) > 1e-6  # adapted leaves do differ
            else:
                np.testing.assert_allclose(a[k], b[k], rtol=1e-13)


def test_scale_by_lars_zero_norms_fall_back_to_ratio_one():
    params = {"zero_w": jnp.zeros(3), "zero_g": jnp.array([1.0, 2.0]), "w": jnp.array([3.0, 4.0])}
    grads = {
        "zero_w": jnp.array([1.0, -2.0, 3.0]),
        "zero_g": jnp.zeros(2),
        "w": jnp.array([0.0, 2.0]),
    }
    tx = transforms.scale_by_lars(trust_coefficient=0.1, weight_decay=0.5)
    out, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(out["zero_w"], grads["zero_w"])
    np.testing.assert_allclose(out["zero_g"], 0.5 * params["zero_g"])
    # ||w|| = 5, ||g|| = 2: local lr = 0.1 * 5 / (2 + 0.5 * 5)
    np.testing.assert_allclose(out["w"], 0.5 / 4.5 * (grads["w"] + 0.5 * params["w"]), rtol=1e-6)


# ----------------------------------------------------------------------------- both


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: optim_jax.lamb(-1e-3), "learning_rate"),
        (lambda: optim_jax.lamb(1e-3, eps=-1e-6), "eps"),
        (lambda: optim_jax.lamb(1e-3, b1=1.0), "b1"),
        (lambda: optim_jax.lamb(1e-3, b2=-0.1), "b2"),
        (lambda: optim_jax.lamb(1e-3, weight_decay=-0.1), "weight_decay"),
        (lambda: optim_jax.lars(-1.0), "learning_rate"),
        (lambda: optim_jax.lars(1.0, momentum=1.0), "momentum"),
        (lambda: optim_jax.lars(1.0, momentum=-0.5), "momentum"),
        (lambda: optim_jax.lars(1.0, weight_decay=-1e-4), "weight_decay"),
        (lambda: optim_jax.lars(1.0, trust_coefficient=0.0), "trust_coefficient"),
        (lambda: optim_jax.lars(1.0, trust_coefficient=-1e-3), "trust_coefficient"),
        (lambda: optim_jax.lars(1.0, eps=-1e-8), "eps"),
        (lambda: transforms.scale_by_trust_ratio(trust_coefficient=0.0), "trust_coefficient"),
        (lambda: transforms.scale_by_trust_ratio(eps=-1.0), "eps"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("make", [lambda: optim_jax.lamb(1e-3), lambda: optim_jax.lars(1.0)])
def test_update_without_params_raises(make):
    tx = make()
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))


@pytest.mark.parametrize(
    "make",
    [lambda: optim_jax.lamb(1e-3, weight_decay=0.1), lambda: optim_jax.lars(1.0, weight_decay=0.1)],
)
def test_bfloat16_params_keep_their_dtype(make):
    params = {"w": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.bfloat16).reshape(4, 3)}
    tx = make()
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(params, state, params)
    assert updates["w"].dtype == jnp.bfloat16
    assert all(
        x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state) if x.shape == params["w"].shape
    )
    assert np.all(np.isfinite(np.asarray(updates["w"], np.float32)))
