"""Sophia: the float64 reference, the official code's form, the refresh cadence, a training step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_jax
from optim_jax import base, transforms
from tests import harness
from tests.reference import sophia as ref


def constant(value):
    return lambda step: value


def decaying(value):
    """A schedule: checks that hyperparameters are read at the 0-based update count."""
    return lambda step: value / (1.0 + 0.1 * step)


def cosine(peak, steps):
    """Cosine decay from ``peak`` to 0 over ``steps`` updates (a schedule of the count)."""
    return lambda count: peak * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(count, steps) / steps))


def feeding(tx, estimate):
    """``tx`` whose update is given ``hessian_diag=estimate(grads)`` on every step.

    Lets the harness, which passes gradients only, drive the Hessian input: the
    estimate is a fixed function of the step's gradients, mirrored in float64 by
    the reference. It is offered on every step, so the check also covers that
    off-refresh estimates are ignored.
    """

    def update(grads, state, params=None):
        return tx.update(grads, state, params, hessian_diag=jax.tree.map(estimate, grads))

    return optax.GradientTransformation(tx.init, update)


def sophia_view(opt_state):
    state = base.find_state(opt_state, transforms.SophiaState)
    return {"mu": state.mu, "hessian": state.hessian}


def fraction_clipped(history, gamma, eps):
    """Share of coordinates, over all steps, where the reference's ratio reached the clip."""
    clipped = total = 0
    for t, (_, state) in enumerate(history[1:]):
        for k in state["mu"]:
            ratio = state["mu"][k] / np.maximum(gamma(t) * state["hessian"][k], eps)
            clipped += int(np.sum(np.abs(ratio) >= 1.0))
            total += ratio.size
    return clipped / total


# Each case: (hyperparameters, the estimate as a function of the gradient). The gammas
# are chosen so that between 20% and 80% of the coordinates are clipped (asserted), so
# both branches of the clip are exercised. "mixed_sign" feeds negative estimates too,
# which meet the eps floor (a sign step), as a Hutchinson estimate can.
CASES = {
    "positive_k3": (
        dict(lr=constant(0.05), b1=0.965, b2=0.99, gamma=2.0, eps=1e-15, wd=0.1, k=3),
        lambda g: g * g + 0.5,
    ),
    "mixed_sign_k1_schedules": (
        dict(
            lr=decaying(0.05),
            b1=decaying(0.9),
            b2=decaying(0.9),
            gamma=decaying(3.0),
            eps=1e-12,
            wd=0.0,
            k=1,
        ),
        lambda g: g * g - 0.5,
    ),
    "default_betas_k10": (
        dict(lr=constant(0.02), b1=0.965, b2=0.99, gamma=5.0, eps=1e-15, wd=0.1, k=10),
        lambda g: abs(g) + 0.1,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference(name):
    hp, estimate = CASES[name]
    as_fn = lambda v: v if callable(v) else constant(v)  # noqa: E731
    ref_step = ref.make_step(
        *(as_fn(hp[k]) for k in ("lr", "b1", "b2", "gamma")),
        *(hp[k] for k in ("eps", "wd", "k")),
        lambda t, grads: {k: estimate(v) for k, v in grads.items()},
    )
    params = harness.random_params(0)
    history = [(params, ref.init(params))]
    for t, g in enumerate(harness.random_grads(0, 20), start=1):
        history.append(ref_step(history[-1][0], g, history[-1][1], t))
    assert 0.2 < fraction_clipped(history, as_fn(hp["gamma"]), hp["eps"]) < 0.8

    def make_tx():
        tx = optim_jax.sophia(
            hp["lr"], hp["b1"], hp["b2"], hp["gamma"], hp["eps"], hp["wd"], hp["k"]
        )
        return feeding(tx, estimate)

    harness.check_against_reference(make_tx, ref.init, ref_step, sophia_view)


def test_gamma_is_the_official_rho_with_the_gnb_batch_factor():
    """Ours fed ``B * ghat**2`` with ``gamma = rho`` equals the official step fed ``ghat**2``
    with ``bs = B``: the factor B lives in the estimator here, in the update there. Both
    refresh on updates 1, 11, 21 here (the official training loop refreshes after updates
    10, 20, ..., a matter of the loop, not of the update rule)."""
    num_labels, rho, lr = 512, 0.05, 0.01
    params, grads = harness.random_params(3), harness.random_grads(3, 25)
    ghat = lambda g: 0.5 * g + 0.05  # noqa: E731  (a stand-in for the sampled-label gradient)
    want = []
    squared = lambda t, gs: {k: ghat(v) ** 2 for k, v in gs.items()}  # noqa: E731
    step = ref.official_step(lr, 0.965, 0.99, rho, num_labels, 0.1, 10, squared)
    p, s = params, ref.init(params)
    for t, g in enumerate(grads, start=1):
        p, s = step(p, g, s, t)
        want.append(p)
    tx = feeding(optim_jax.sophia(lr, gamma=rho), lambda g: num_labels * ghat(g) ** 2)
    ours = harness.run_ours(tx, params, grads)
    harness.assert_trajectories_close(ours, want, 1e-10, "official SophiaG")
    # Not all sign steps: some coordinates are preconditioned.
    ratios = [np.abs(s["mu"][k]) / (rho * num_labels * s["hessian"][k]) for k in params]
    assert 0.2 < np.mean(np.concatenate([r.ravel() for r in ratios]) < 1) < 0.8


def ema(values, b2=0.99):
    """h after blending ``values`` one refresh at a time, from h = 0."""
    h = 0.0
    for value in values:
        h = b2 * h + (1 - b2) * value
    return h


def differs(tree_a, tree_b):
    """True when any entry of any leaf differs."""
    pairs = zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b), strict=True)
    return any(bool(jnp.any(a != b)) for a, b in pairs)


def test_hessian_changes_only_on_refresh_steps_and_due_says_when():
    tx = optim_jax.sophia(0.01, update_interval=4)
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    state = tx.init(params)
    step = jax.jit(functools.partial(tx.update, params=params))
    dues = []
    for t in range(13):
        grads = jax.tree.map(lambda p, v=0.1 * (t + 1): jnp.full_like(p, v), params)
        estimate = jax.tree.map(lambda p, v=float(t + 1): jnp.full_like(p, v), params)
        due = bool(optim_jax.sophia_hessian_due(state))
        before = base.find_state(state, transforms.SophiaState).hessian
        _, state = step(grads, state, hessian_diag=estimate)
        after = base.find_state(state, transforms.SophiaState).hessian
        changed = differs(before, after)
        assert changed == due, t
        dues.append(due)
    assert dues == [t % 4 == 0 for t in range(13)]
    # The refreshes blended the estimates offered at counts 0, 4, 8 and 12 (values 1, 5, 9, 13).
    final = base.find_state(state, transforms.SophiaState).hessian["w"]
    np.testing.assert_allclose(final, ema([1, 5, 9, 13]), rtol=1e-6)


def test_no_estimate_keeps_h_and_takes_sign_steps():
    """``hessian_diag=None`` (or absent) on a refresh step skips the refresh: with h = 0 the
    update is ``-lr * (sign(m) + wd * p)``."""
    lr, wd = 0.1, 0.1
    tx = optim_jax.sophia(lr, weight_decay=wd)
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([0.5, -0.25, 0.0])}
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    sophia_state = base.find_state(state, transforms.SophiaState)
    np.testing.assert_array_equal(sophia_state.hessian["w"], 0.0)
    want = -lr * (np.sign([0.5, -0.25, 0.0]) + wd * np.array([1.0, -2.0, 3.0]))
    np.testing.assert_allclose(updates["w"], want, rtol=1e-6)
    assert not bool(optim_jax.sophia_hessian_due(state))  # the refresh slot was used up


def test_extra_keyword_arguments_pass_through_chains_and_wrappers():
    """optax 0.2.8's ``chain`` hands every keyword to members that take extra args; other
    members' keywords are ignored by Sophia."""

    def needs_value():
        def update(updates, state, params=None, *, value, **extra):
            del params, extra
            return jax.tree.map(lambda u: u * value, updates), state

        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

    tx = optax.chain(needs_value(), optim_jax.sophia(1.0, gamma=1.0, weight_decay=0.0))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    grads = {"w": jnp.full(3, 0.01)}
    estimate = {"w": jnp.full(3, 2.0)}
    updates, state = tx.update(grads, state, params, hessian_diag=estimate, value=0.5)
    # m = 0.035 * 0.005, h = 0.01 * 2, u = m / h
    np.testing.assert_allclose(updates["w"], -(0.035 * 0.005) / 0.02, rtol=1e-5)
    h = base.find_state(state, transforms.SophiaState).hessian["w"]
    np.testing.assert_allclose(h, 0.02, rtol=1e-6)

    # Masked decay and an outer wrapper keep the state findable.
    masked = optim_jax.sophia(0.1, mask={"w": False, "b": True})
    wrapped = optax.MultiSteps(masked, every_k_schedule=1)
    params = {"w": jnp.ones(2), "b": jnp.ones(2)}
    state = wrapped.init(params)
    assert bool(optim_jax.sophia_hessian_due(state))
    _, state = wrapped.update(params, state, params, hessian_diag=params)
    assert not bool(optim_jax.sophia_hessian_due(state))
    np.testing.assert_allclose(base.find_state(state, transforms.SophiaState).hessian["b"], 0.01)


def test_partitioned_sophias_each_refresh_on_their_own_cadence():
    """Two Sophia groups under ``optax.partition`` (with ``mask_compatible_extra_args=True``
    so ``hessian_diag`` is masked like the updates): each blends only its own leaves, on its
    own interval, and ``sophia_hessian_due`` is true when either is due."""
    tx = optax.partition(
        {
            "k2": optim_jax.sophia(0.1, update_interval=2),
            "k3": optim_jax.sophia(0.1, update_interval=3),
        },
        {"w": "k2", "v": "k3"},
        mask_compatible_extra_args=True,
    )
    params = {"w": jnp.ones(2), "v": jnp.ones(3)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    dues = []
    for t in range(7):
        dues.append(bool(optim_jax.sophia_hessian_due(state)))
        estimate = jax.tree.map(lambda p, v=float(t + 1): jnp.full_like(p, v), params)
        _, state = step(params, state, params, hessian_diag=estimate)
    assert dues == [t % 2 == 0 or t % 3 == 0 for t in range(7)]

    k2, k3 = base.find_states(state, transforms.SophiaState)  # in the groups' sorted order
    np.testing.assert_allclose(k2.hessian["w"], ema([1, 3, 5, 7]), rtol=1e-6)
    np.testing.assert_allclose(k3.hessian["v"], ema([1, 4, 7]), rtol=1e-6)


def test_due_without_sophia_state_is_an_error():
    with pytest.raises(ValueError, match="SophiaState"):
        optim_jax.sophia_hessian_due(optim_jax.adam(0.1).init({"w": jnp.ones(2)}))


def test_bfloat16_params_keep_their_dtype():
    tx = optim_jax.sophia(1e-2)
    params = {"w": jnp.ones((4, 3), jnp.bfloat16)}
    state = tx.init(params)
    estimate = {"w": jnp.full((4, 3), 3.0, jnp.float32)}
    updates, state = jax.jit(tx.update)(params, state, params, hessian_diag=estimate)
    sophia_state = base.find_state(state, transforms.SophiaState)
    assert updates["w"].dtype == jnp.bfloat16
    assert sophia_state.mu["w"].dtype == sophia_state.hessian["w"].dtype == jnp.bfloat16


def test_state_is_sharded_like_the_params():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    params = {"w": jax.device_put(jnp.ones((16, 4)), sharding)}
    state = jax.jit(optim_jax.sophia(0.1).init)(params)
    sophia_state = base.find_state(state, transforms.SophiaState)
    assert sophia_state.mu["w"].sharding.is_equivalent_to(sharding, 2)
    assert sophia_state.hessian["w"].sharding.is_equivalent_to(sharding, 2)


# --- a training step that feeds the estimate ---------------------------------------------


def blobs(seed=0, n=512, dim=8, classes=4):
    """Four Gaussian clusters in 8-D, overlapping a little (Bayes error about 2%)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 1.5
    labels = rng.integers(0, classes, size=n)
    inputs = centres[labels] + rng.normal(size=(n, dim))
    return jnp.asarray(inputs, jnp.float32), jnp.asarray(labels, jnp.int32)


def mlp_init(key, sizes=(8, 16, 4)):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"kernel": jax.random.normal(k, (a, b)) / np.sqrt(a), "bias": jnp.zeros(b)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp_logits(params, inputs):
    h = inputs
    for i, layer in enumerate(params):
        h = h @ layer["kernel"] + layer["bias"]
        h = jnp.tanh(h) if i < len(params) - 1 else h
    return h


def mlp_loss(params, inputs, labels):
    return optax.softmax_cross_entropy_with_integer_labels(
        mlp_logits(params, inputs), labels
    ).mean()


def test_training_step_feeds_gnb_estimate_every_k_steps():
    """Sophia-G on a tiny MLP: the jitted step runs the Gauss-Newton-Bartlett estimator
    under ``lax.cond`` only when ``sophia_hessian_due`` says so and passes the result
    as ``hessian_diag``. Cross-entropy falls from 1.16 to below 0.1 in 150 steps of
    mini-batches of 64 (measured 0.026 to 0.078 over eight batch orders); h changes
    exactly on updates 1, 11, 21, ...; over the last 50 steps 10% to 90% of the
    coordinates are preconditioned rather than clipped (measured 37% to 59%; the
    authors suggest 10-50% as healthy), so the estimate's scale matters to the run."""
    inputs, labels = blobs()
    gamma = 1.0  # B = 64 here, not the 5e5 tokens behind the official rho = 0.04
    tx = optim_jax.sophia(cosine(0.05, 150), gamma=gamma, weight_decay=1e-3)
    estimator_calls = []

    def train_step(params, opt_state, key):
        batch_key, sample_key = jax.random.split(key)
        idx = jax.random.choice(batch_key, inputs.shape[0], (64,), replace=False)
        x, y = inputs[idx], labels[idx]
        loss, grads = jax.value_and_grad(mlp_loss)(params, x, y)

        def estimate():
            jax.debug.callback(lambda: estimator_calls.append(1))
            return optim_jax.hessian.gauss_newton_bartlett_diag(mlp_logits, params, sample_key, x)

        hessian_diag = jax.lax.cond(
            optim_jax.sophia_hessian_due(opt_state),
            estimate,
            lambda: optim_jax.hessian.zeros_like_estimate(params),
        )
        updates, opt_state = tx.update(grads, opt_state, params, hessian_diag=hessian_diag)
        return optax.apply_updates(params, updates), opt_state, loss

    def observed_step(carry, key):
        """``train_step`` plus what the test checks: did h change, what share is unclipped."""
        params, opt_state = carry
        h_before = base.find_state(opt_state, transforms.SophiaState).hessian
        params, opt_state, _ = train_step(params, opt_state, key)
        state = base.find_state(opt_state, transforms.SophiaState)
        flat = lambda tree: jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])  # noqa: E731
        changed = jnp.any(flat(state.hessian) != flat(h_before))
        inside = jnp.mean(jnp.abs(flat(state.mu)) < gamma * flat(state.hessian))
        return (params, opt_state), (changed, inside)

    params = mlp_init(jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 150)
    run = jax.jit(lambda p, s: jax.lax.scan(observed_step, (p, s), keys))
    (params, _), (changed, inside) = run(params, tx.init(params))
    jax.effects_barrier()
    initial = float(mlp_loss(mlp_init(jax.random.key(0)), inputs, labels))
    final = float(mlp_loss(params, inputs, labels))
    assert initial > 1.1
    assert final < 0.1, final
    assert 0.1 < float(np.mean(inside[100:])) < 0.9, np.mean(inside[100:])
    assert np.asarray(changed).tolist() == [t % 10 == 0 for t in range(150)]
    assert len(estimator_calls) == 15  # the estimator ran on refresh steps only


def test_sophia_h_converges_at_a_rate_independent_of_curvature():
    """Sophia-H (Hutchinson, one probe per step) on ``0.5 * sum(a_i x_i**2)`` with
    curvatures from 0.01 to 100 and a constant lr of 0.1: with ``gamma = 1`` the
    unclipped step ``lr * m / h`` is a damped Newton step, so every coordinate
    contracts at the same rate; after 300 steps all are below 1e-5 (measured 2e-7).
    Without estimates (h = 0) the same optimizer is sign descent and keeps hovering
    at the scale of the learning rate (largest |x| measured 0.14)."""
    curvatures = jnp.logspace(-2, 2, 9)

    def loss_fn(params):
        return 0.5 * jnp.sum(curvatures * params["x"] ** 2)

    def run(with_estimate):
        tx = optim_jax.sophia(0.1, b1=0.9, gamma=1.0, weight_decay=0.0)

        def body(carry, key):
            params, state = carry
            grads = jax.grad(loss_fn)(params)
            kwargs = {}
            if with_estimate:
                kwargs["hessian_diag"] = optim_jax.hessian.hutchinson_diag(loss_fn, params, key)
            updates, state = tx.update(grads, state, params, **kwargs)
            return (optax.apply_updates(params, updates), state), None

        params = {"x": jnp.linspace(0.77, 1.33, 9)}
        keys = jax.random.split(jax.random.key(0), 300)
        (params, _), _ = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), keys))(params)
        return np.abs(np.asarray(params["x"]))

    assert np.max(run(True)) < 1e-5
    assert np.max(run(False)) > 0.05


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(learning_rate=-1e-3), "learning_rate"),
        (dict(b1=1.0), "b1"),
        (dict(b1=-0.1), "b1"),
        (dict(b2=1.0), "b2"),
        (dict(gamma=-0.01), "gamma"),
        (dict(eps=-1e-12), "eps"),
        (dict(eps=0.0), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(update_interval=0), "update_interval"),
        (dict(update_interval=2.5), "update_interval"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    kwargs = {"learning_rate": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=name):
        optim_jax.sophia(**kwargs)
