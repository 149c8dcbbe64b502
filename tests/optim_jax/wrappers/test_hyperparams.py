"""Injectable hyperparameters: the plain trajectory, and changes between steps without retracing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_jax
from optim_jax import base, transforms
from tests import harness


def piecewise(before, after, at):
    """A schedule equal to ``before`` for updates ``0..at-1`` and ``after`` from update ``at``."""
    return lambda count: jnp.where(count < at, before, after)


def run_with_changes(tx, params0, grad_seq, changes, dtype=np.float64):
    """Trajectory of ``tx`` with ``set_hyperparam`` applied before chosen updates.

    ``changes`` maps a 0-based update index to ``{name: value}``. Returns the
    trajectory and the number of times the step function was traced.
    """
    traces = 0
    with jax.enable_x64(dtype == np.float64):

        @jax.jit
        def step(params, opt_state, grads):
            nonlocal traces
            traces += 1
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params0)
        opt_state = tx.init(params)
        out = []
        for t, g in enumerate(grad_seq):
            for name, value in changes.get(t, {}).items():
                opt_state = optim_jax.set_hyperparam(opt_state, name, value)
            params, opt_state = step(params, opt_state, jax.tree.map(jnp.asarray, g))
            out.append(jax.tree.map(lambda x: np.asarray(x, np.float64), params))
    return out, traces, opt_state


CASES = [
    ("adamw", dict(weight_decay=0.1)),
    ("adam", dict(b1=0.8)),
    ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("rmsprop", dict(centered=True)),
    ("lion", dict(b1=0.9, b2=0.98, weight_decay=0.1)),
    ("lamb", dict(weight_decay=0.01)),
]


@pytest.mark.parametrize("name,kwargs", CASES, ids=[c[0] for c in CASES])
def test_unchanged_hyperparams_give_the_plain_trajectory(name, kwargs):
    factory = getattr(optim_jax, name)
    params0, grads = harness.random_params(1), harness.random_grads(1, 10)
    for dtype, rtol in ((np.float64, 1e-14), (np.float32, 1e-6)):
        plain = harness.run_ours(factory(0.01, **kwargs), params0, grads, dtype)
        injected = harness.run_ours(
            optim_jax.inject_hyperparams(factory)(0.01, **kwargs), params0, grads, dtype
        )
        harness.assert_trajectories_close(injected, plain, rtol, np.dtype(dtype).name)


def test_injected_names_and_state():
    params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    state = optim_jax.inject_hyperparams(optim_jax.adamw)(1e-3, b2=0.95).init(params)
    assert isinstance(state, optim_jax.InjectHyperparamsState)
    assert set(state.hyperparams) == {"learning_rate", "b1", "b2", "weight_decay"}
    for value in state.hyperparams.values():
        assert value.shape == () and value.dtype == jnp.float32 and not value.weak_type
    np.testing.assert_allclose(state.hyperparams["b2"], 0.95, rtol=1e-7)
    assert base.find_state(state, transforms.AdamState).mu["w"].shape == (2, 3)

    # eps is annotated `float`, not a schedule, so it stays a static Python number.
    assert "eps" not in state.hyperparams


def test_zero_defaults_stay_static_explicit_zero_is_injected():
    params = {"w": jnp.ones((2, 3))}
    plain = optim_jax.inject_hyperparams(optim_jax.sgd)(0.1).init(params)
    assert set(plain.hyperparams) == {"learning_rate"}
    assert not base.find_states(plain, transforms.TraceState)  # no momentum buffer
    explicit = optim_jax.inject_hyperparams(optim_jax.sgd)(0.1, momentum=0.0).init(params)
    assert set(explicit.hyperparams) == {"learning_rate", "momentum"}
    assert base.find_state(explicit, transforms.TraceState).momentum["w"].shape == (2, 3)


def test_changing_learning_rate_equals_a_schedule_and_does_not_retrace():
    params0, grads = harness.random_params(2), harness.random_grads(2, 10)
    tx = optim_jax.inject_hyperparams(optim_jax.adamw)(1e-2, weight_decay=0.1)
    ours, traces, state = run_with_changes(tx, params0, grads, {4: {"learning_rate": 1e-3}})
    assert traces == 1
    want = harness.run_ours(
        optim_jax.adamw(piecewise(1e-2, 1e-3, 4), weight_decay=0.1), params0, grads
    )
    harness.assert_trajectories_close(ours, want, 1e-14, "lr change")
    np.testing.assert_allclose(state.hyperparams["learning_rate"], 1e-3, rtol=1e-15)


def test_changing_betas_and_weight_decay_equals_schedules():
    params0, grads = harness.random_params(3), harness.random_grads(3, 10)
    tx = optim_jax.inject_hyperparams(optim_jax.adamw)(1e-2, weight_decay=0.1)
    changes = {3: {"b2": 0.9}, 6: {"b1": 0.5, "weight_decay": 0.3}}
    ours, traces, _ = run_with_changes(tx, params0, grads, changes)
    assert traces == 1
    want = harness.run_ours(
        optim_jax.adamw(
            1e-2,
            b1=piecewise(0.9, 0.5, 6),
            b2=piecewise(0.999, 0.9, 3),
            weight_decay=piecewise(0.1, 0.3, 6),
        ),
        params0,
        grads,
    )
    harness.assert_trajectories_close(ours, want, 1e-14, "betas and wd")


def test_changing_sgd_momentum():
    params0, grads = harness.random_params(4), harness.random_grads(4, 8)
    tx = optim_jax.inject_hyperparams(optim_jax.sgd)(0.05, momentum=0.9)
    ours, traces, _ = run_with_changes(tx, params0, grads, {5: {"momentum": 0.5}})
    assert traces == 1
    want = harness.run_ours(optim_jax.sgd(0.05, momentum=piecewise(0.9, 0.5, 5)), params0, grads)
    harness.assert_trajectories_close(ours, want, 1e-14, "momentum")


def test_schedules_are_evaluated_and_recorded():
    params0, grads = harness.random_params(5), harness.random_grads(5, 6)
    schedule = lambda count: 0.1 / (1.0 + count)  # noqa: E731
    tx = optim_jax.inject_hyperparams(optim_jax.adam)(schedule, b1=0.8)
    with jax.enable_x64(True):
        params = jax.tree.map(jnp.asarray, params0)
        state = tx.init(params)
        assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.1, rel=1e-15)
        for t in range(3):
            _, state = jax.jit(tx.update)(jax.tree.map(jnp.asarray, grads[t]), state, params)
            # The value the update just used, i.e. the schedule at the count before it.
            assert float(state.hyperparams["learning_rate"]) == pytest.approx(schedule(t), 1e-15)
    # Numbers of a schedule go through unchanged, the trajectory is that of the plain optimizer.
    harness.assert_trajectories_close(
        harness.run_ours(tx, params0, grads),
        harness.run_ours(optim_jax.adam(schedule, b1=0.8), params0, grads),
        1e-14,
        "schedule",
    )


def test_set_hyperparam_inside_jit_and_float32_values():
    params = {"w": jnp.ones(3)}
    tx = optim_jax.inject_hyperparams(optim_jax.sgd)(0.1)
    state = tx.init(params)
    state = jax.jit(lambda s, v: optim_jax.set_hyperparam(s, "learning_rate", v))(state, 0.5)
    assert state.hyperparams["learning_rate"].dtype == jnp.float32
    updates, _ = tx.update({"w": jnp.ones(3)}, state, params)
    np.testing.assert_allclose(updates["w"], -0.5 * np.ones(3))
    bf16 = tx.init({"w": jnp.ones(3, jnp.bfloat16)})
    assert bf16.hyperparams["learning_rate"].dtype == jnp.float32
    chosen = optim_jax.inject_hyperparams(optim_jax.sgd, dtype=jnp.bfloat16)(0.1).init(params)
    assert chosen.hyperparams["learning_rate"].dtype == jnp.bfloat16


def test_inside_param_groups_set_hyperparam_reaches_every_group():
    params0, grads = harness.random_params(6), harness.random_grads(6, 8)
    labels = {k: "decay" if np.ndim(v) >= 2 else "no_decay" for k, v in params0.items()}
    tx = optim_jax.param_groups(
        {"decay": {}, "no_decay": {"weight_decay": 0.0}},
        labels,
        optimizer=optim_jax.inject_hyperparams(optim_jax.adamw),
        learning_rate=1e-2,
        weight_decay=0.1,
    )
    ours, traces, state = run_with_changes(tx, params0, grads, {3: {"learning_rate": 2e-3}})
    assert traces == 1
    lr = piecewise(1e-2, 2e-3, 3)
    want_tx = optim_jax.param_groups(
        {"decay": optim_jax.adamw(lr, weight_decay=0.1), "no_decay": optim_jax.adam(lr)}, labels
    )
    harness.assert_trajectories_close(ours, harness.run_ours(want_tx, params0, grads), 1e-14, "")
    injected = base.find_states(state, optim_jax.InjectHyperparamsState)
    assert len(injected) == 2
    assert all(float(s.hyperparams["learning_rate"]) == 2e-3 for s in injected)


def test_static_arguments_pass_through():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    # `mask` is annotated as a mask, not a schedule: passed to the factory unchanged.
    tx = optim_jax.inject_hyperparams(optim_jax.adamw)(0.1, mask=optim_jax.decay_mask)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, state, params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.01 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["b"], np.zeros(2))

    # An unannotated factory: floats are injected, a callable named in static_args is not.
    def factory(lr, wd_mask, nesterov=False):
        return optim_jax.adamw(lr, mask=wd_mask) if not nesterov else optim_jax.sgd(lr)

    state = optim_jax.inject_hyperparams(factory, static_args=("wd_mask",))(
        0.1, optim_jax.decay_mask
    ).init(params)
    assert set(state.hyperparams) == {"lr"}
    # static_args forces an annotated argument to stay a Python number.
    state = optim_jax.inject_hyperparams(optim_jax.adamw, static_args=["b1", "b2"])(0.1).init(
        params
    )
    assert set(state.hyperparams) == {"learning_rate", "weight_decay"}


def test_extra_args_reach_the_inner_transformation():
    def scaled(learning_rate: base.ScalarOrSchedule):
        def init_fn(params):
            return optax.EmptyState()

        def update_fn(updates, state, params=None, *, factor):
            lr = base.resolve(learning_rate, jnp.zeros([], jnp.int32))
            return jax.tree.map(lambda u: lr * factor * u, updates), state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    tx = optim_jax.inject_hyperparams(scaled)(0.5)
    state = tx.init({"w": jnp.ones(2)})
    updates, _ = tx.update({"w": jnp.ones(2)}, state, None, factor=3.0)
    np.testing.assert_allclose(updates["w"], 1.5 * np.ones(2))


def test_bad_input():
    inject = optim_jax.inject_hyperparams
    with pytest.raises(ValueError, match="b1"):  # the factory's own check, at construction
        inject(optim_jax.adamw)(1e-3, b1=1.5)
    with pytest.raises(TypeError, match="nonsense"):
        inject(optim_jax.adamw)(1e-3, nonsense=1.0)
    with pytest.raises(ValueError, match="static_args"):
        inject(optim_jax.adamw, static_args=("lr",))
    with pytest.raises(TypeError, match="optimizer"):
        inject(0.1)

    state = inject(optim_jax.adamw)(1e-3).init({"w": jnp.ones(2)})
    with pytest.raises(ValueError, match="'learning_rte'") as err:
        optim_jax.set_hyperparam(state, "learning_rte", 1e-4)
    assert "learning_rate" in str(err.value) and "name" in str(err.value)
    with pytest.raises(ValueError, match="inject_hyperparams"):
        optim_jax.set_hyperparam(optim_jax.adamw(1e-3).init({"w": jnp.ones(2)}), "b1", 0.5)
    with pytest.raises(TypeError, match="value"):
        optim_jax.set_hyperparam(state, "learning_rate", lambda count: 1e-4)
    with pytest.raises(TypeError, match="value"):
        optim_jax.set_hyperparam(state, "learning_rate", np.ones(2))


def test_with_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    tx = optim_jax.inject_hyperparams(optim_jax.sgd)(1e-3)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    traces = 0

    @nnx.jit
    def step(model, optimizer):
        nonlocal traces
        traces += 1
        optimizer.update(model, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param)))

    kernel0 = np.asarray(model.kernel[...])
    step(model, optimizer)
    kernel1 = np.asarray(model.kernel[...])
    np.testing.assert_allclose(kernel0 - kernel1, 1e-3, rtol=1e-3)
    optimizer.opt_state = optim_jax.set_hyperparam(optimizer.opt_state, "learning_rate", 0.5)
    step(model, optimizer)
    np.testing.assert_allclose(kernel1 - np.asarray(model.kernel[...]), 0.5, rtol=1e-5)
    assert traces == 1


def test_lion_betas_are_injected():
    params = {"w": jnp.ones((2, 3))}
    state = optim_jax.inject_hyperparams(optim_jax.lion)(1e-3, b1=0.9, b2=0.98).init(params)
    assert {"b1", "b2"} <= set(state.hyperparams)


# Every optimizer under Optax's own wrapper, which passes each numeric argument (defaults and
# zeros included) as an array: concrete to init, traced to the jitted update.
OPTAX_INJECTED = [
    ("sgd", dict(learning_rate=0.1)),
    ("sgd", dict(learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adagrad", dict(learning_rate=0.1, initial_accumulator_value=0.1)),
    ("rmsprop", dict(learning_rate=0.01, momentum=0.9, centered=True)),
    ("adam", dict(learning_rate=0.01, b1=0.8)),
    ("adamw", dict(learning_rate=0.01, weight_decay=0.1)),
    ("lamb", dict(learning_rate=0.01, weight_decay=0.01)),
    ("lars", dict(learning_rate=0.1, weight_decay=1e-3)),
    ("lion", dict(learning_rate=1e-3, b1=0.95, b2=0.98, weight_decay=0.1)),
    ("adafactor", dict(learning_rate=0.01, b1=0.9)),
    ("sophia", dict(learning_rate=0.01, update_interval=3)),
]


@pytest.mark.parametrize(
    "name,kwargs", OPTAX_INJECTED, ids=[f"{n}{i}" for i, (n, _) in enumerate(OPTAX_INJECTED)]
)
def test_optax_inject_hyperparams_follows_the_plain_optimizer(name, kwargs):
    """``optax.inject_hyperparams(optim_jax.X)`` drops in as it does for ``optax.X``. In
    float64 the injected values are the Python numbers exactly, so the trajectory is the
    plain one to float64 rounding (1e-12 relative over 10 steps, where float32 rounding
    would show at 1e-7); in float32 it equals ``optim_jax.inject_hyperparams``' bit for bit
    (both evaluate the hyperparameters as float32 arrays inside the step)."""
    factory = getattr(optim_jax, name)
    # Adafactor's min_dim_size_to_factor decides which leaves are factored (the state's shapes).
    static_args = ("min_dim_size_to_factor",) if name == "adafactor" else ()
    injected = optax.inject_hyperparams(factory, static_args=static_args)(**kwargs)
    params0, grads = harness.random_params(3), harness.random_grads(3, 10)
    plain = harness.run_ours(factory(**kwargs), params0, grads, np.float64)
    ours = harness.run_ours(injected, params0, grads, np.float64)
    harness.assert_trajectories_close(ours, plain, 1e-12, f"{name} float64")
    assert not np.allclose(plain[-1]["matrix"], params0["matrix"])  # the steps moved them

    theirs = harness.run_ours(injected, params0, grads, np.float32)
    wrapped = optim_jax.inject_hyperparams(factory, static_args=static_args)(**kwargs)
    harness.assert_trajectories_close(
        theirs, harness.run_ours(wrapped, params0, grads, np.float32), 0.0, f"{name} float32"
    )


def test_optax_injected_values_steer_the_update_and_init_may_be_jitted():
    """A learning rate written into Optax's injected state acts at the next update (0: the
    parameters stay), with a jitted init (the hyperparameters traced there too)."""
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
    tx = optax.inject_hyperparams(optim_jax.adamw)(learning_rate=1e-2, weight_decay=0.1)
    state = jax.jit(tx.init)(params)
    state.hyperparams["learning_rate"] = jnp.zeros_like(state.hyperparams["learning_rate"])
    updates, state = jax.jit(tx.update)(params, state, params)
    np.testing.assert_array_equal(updates["w"], np.zeros((2, 3)))
    assert set(state.hyperparams) >= {"learning_rate", "b1", "b2", "eps", "weight_decay"}


def test_array_hyperparameters_are_checked_or_named():
    """Concrete arrays are checked like numbers; a traced one passes unchecked if it is a
    real scalar; an int that shapes the state must stay a Python int (the message says how
    to keep Optax's wrapper from turning it into an array)."""
    params = {"w": jnp.ones((4, 3))}
    optim_jax.adam(jnp.float32(1e-3), b1=jnp.float32(0.9)).init(params)
    with pytest.raises(ValueError, match="b1 must be in"):
        optim_jax.adam(1e-3, b1=jnp.float32(1.5))
    with pytest.raises(TypeError, match=r"b2 must be a real scalar, got a traced float32\[3\]"):
        jax.jit(lambda b2: optim_jax.adam(1e-3, b2=b2).init(params))(jnp.ones(3))
    with pytest.raises(ValueError, match="min_dim_size_to_factor must be a Python int"):
        optax.inject_hyperparams(optim_jax.adafactor)(learning_rate=1e-2).init(params)
    with pytest.raises(ValueError, match="update_interval must be a positive integer"):
        optim_jax.sophia(1e-2, update_interval=jnp.int32(0))


def test_an_array_zero_keeps_its_component():
    """A zero momentum given as an array keeps the momentum buffer (the state must have
    one structure whether the value is concrete, at init, or traced, in the update); the
    Python number 0 drops it. Both take plain SGD steps."""
    params = {"w": jnp.ones((2, 3))}
    grads = {"w": jnp.full((2, 3), 0.5)}
    with_buffer = optim_jax.sgd(0.1, momentum=jnp.float32(0.0))
    without = optim_jax.sgd(0.1, momentum=0.0)
    assert base.find_states(with_buffer.init(params), transforms.TraceState)
    assert not base.find_states(without.init(params), transforms.TraceState)
    for tx in (with_buffer, without):
        updates, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_array_equal(updates["w"], np.full((2, 3), -0.05, np.float32))
