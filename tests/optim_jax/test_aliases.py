"""SGD, Adagrad, RMSprop, Adam and AdamW against float64 references, torch.optim and Optax."""

import numpy as np
import optax
import pytest

import optim_jax
from optim_jax import base, transforms
from tests import harness
from tests.reference import adaptive as ref
from tests.reference import sgd as ref_sgd

torch = pytest.importorskip("torch")


def constant(value):
    return lambda step: value


def decaying(value):
    """A schedule: checks that hyperparameters are read at the 0-based update count."""
    return lambda step: value / (1.0 + 0.1 * step)


SGD_CASES = [
    dict(momentum=0.0, nesterov=False, weight_decay=0.0),
    dict(momentum=0.9, nesterov=False, weight_decay=0.0),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
]


def momentum_view(opt_state):
    found = base.find_states(opt_state, transforms.TraceState)
    return {"momentum": found[0].momentum} if found else {}


@pytest.mark.parametrize("kwargs", SGD_CASES)
@pytest.mark.parametrize("schedule", [constant, decaying])
def test_sgd_matches_reference(kwargs, schedule):
    init, step = ref_sgd.make(schedule(0.05), **kwargs)
    harness.check_against_reference(
        lambda: optim_jax.sgd(schedule(0.05), **kwargs), init, step, momentum_view
    )


@pytest.mark.parametrize("kwargs", SGD_CASES)
def test_sgd_matches_torch_and_optax(kwargs):
    params, grads = harness.random_params(1), harness.random_grads(1, 20)
    ours = harness.run_ours(optim_jax.sgd(0.05, **kwargs), params, grads)
    want = harness.run_torch(lambda ps: torch.optim.SGD(ps, lr=0.05, **kwargs), params, grads)
    harness.assert_trajectories_close(ours, want, 1e-12, "torch")
    optax_tx = optax.chain(
        optax.add_decayed_weights(kwargs["weight_decay"]),
        optax.sgd(0.05, kwargs["momentum"] or None, kwargs["nesterov"]),
    )
    harness.assert_trajectories_close(
        ours, harness.run_ours(optax_tx, params, grads), 1e-12, "optax"
    )


@pytest.mark.parametrize("initial", [0.0, 0.1])
def test_adagrad_matches_reference_and_torch(initial):
    harness.check_against_reference(
        lambda: optim_jax.adagrad(decaying(0.1), initial_accumulator_value=initial),
        ref.adagrad_init(initial),
        ref.adagrad_step(decaying(0.1), 1e-10),
        lambda s: {"sum": base.find_state(s, transforms.AdagradState).sum_of_squares},
    )
    params, grads = harness.random_params(2), harness.random_grads(2, 20)
    ours = harness.run_ours(
        optim_jax.adagrad(0.1, initial_accumulator_value=initial), params, grads
    )
    want = harness.run_torch(
        lambda ps: torch.optim.Adagrad(ps, lr=0.1, initial_accumulator_value=initial), params, grads
    )
    harness.assert_trajectories_close(ours, want, 1e-12, "torch")


RMSPROP_CASES = [
    dict(momentum=0.0, centered=False),
    dict(momentum=0.9, centered=False),
    dict(momentum=0.0, centered=True),
    dict(momentum=0.5, centered=True),
]


def rmsprop_view(opt_state):
    state = base.find_state(opt_state, transforms.RmspropState)
    names = {"square_avg": state.square_avg, "grad_avg": state.grad_avg, "momentum": state.momentum}
    return {k: v for k, v in names.items() if v is not None}


@pytest.mark.parametrize("kwargs", RMSPROP_CASES)
def test_rmsprop_matches_reference_torch_and_optax(kwargs):
    harness.check_against_reference(
        lambda: optim_jax.rmsprop(decaying(0.01), **kwargs),
        ref.rmsprop_init(kwargs["centered"], kwargs["momentum"]),
        ref.rmsprop_step(decaying(0.01), 0.99, 1e-8, **kwargs),
        rmsprop_view,
    )
    params, grads = harness.random_params(3), harness.random_grads(3, 20)
    ours = harness.run_ours(optim_jax.rmsprop(0.01, **kwargs), params, grads)
    want = harness.run_torch(lambda ps: torch.optim.RMSprop(ps, lr=0.01, **kwargs), params, grads)
    harness.assert_trajectories_close(ours, want, 1e-12, "torch")
    optax_tx = optax.rmsprop(0.01, decay=0.99, eps=1e-8, eps_in_sqrt=False, **kwargs)
    harness.assert_trajectories_close(
        ours, harness.run_ours(optax_tx, params, grads), 1e-12, "optax"
    )


def adam_view(opt_state):
    state = base.find_state(opt_state, transforms.AdamState)
    return {"m": state.mu, "v": state.nu}


@pytest.mark.parametrize("schedule", [constant, decaying])
def test_adam_matches_reference_torch_and_optax(schedule):
    harness.check_against_reference(
        lambda: optim_jax.adam(schedule(1e-2)),
        ref.adam_init,
        ref.adam_step(schedule(1e-2), 0.9, 0.999, 1e-8),
        adam_view,
    )
    params, grads = harness.random_params(4), harness.random_grads(4, 20)
    ours = harness.run_ours(optim_jax.adam(1e-2), params, grads)
    want = harness.run_torch(lambda ps: torch.optim.Adam(ps, lr=1e-2), params, grads)
    harness.assert_trajectories_close(ours, want, 1e-12, "torch")
    harness.assert_trajectories_close(
        ours, harness.run_ours(optax.adam(1e-2), params, grads), 1e-12, "optax"
    )


@pytest.mark.parametrize("schedule", [constant, decaying])
def test_adamw_matches_reference_torch_and_optax(schedule):
    harness.check_against_reference(
        lambda: optim_jax.adamw(schedule(1e-2), weight_decay=0.1),
        ref.adam_init,
        ref.adam_step(schedule(1e-2), 0.9, 0.999, 1e-8, weight_decay=0.1),
        adam_view,
    )
    params, grads = harness.random_params(5), harness.random_grads(5, 20)
    ours = harness.run_ours(optim_jax.adamw(1e-2, weight_decay=0.1), params, grads)
    want = harness.run_torch(
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), params, grads
    )
    harness.assert_trajectories_close(ours, want, 1e-12, "torch")
    optax_tx = optax.adamw(1e-2, weight_decay=0.1)
    harness.assert_trajectories_close(
        ours, harness.run_ours(optax_tx, params, grads), 1e-12, "optax"
    )


def test_adamw_default_weight_decay_is_torch_not_optax():
    params, grads = harness.random_params(6), harness.random_grads(6, 5)
    ours = harness.run_ours(optim_jax.adamw(1e-2), params, grads)
    want = harness.run_torch(lambda ps: torch.optim.AdamW(ps, lr=1e-2), params, grads)
    harness.assert_trajectories_close(ours, want, 1e-12, "torch defaults")


def test_adamw_mask_excludes_leaves_from_decay():
    params, grads = harness.random_params(7), harness.random_grads(7, 10)
    mask = {k: v.ndim >= 2 for k, v in params.items()}
    harness.check_against_reference(
        lambda: optim_jax.adamw(1e-2, weight_decay=0.5, mask=mask),
        ref.adam_init,
        masked_reference(mask, 1e-2, 0.5),
        adam_view,
        params=params,
        grads=grads,
    )


def masked_reference(mask, lr, wd):
    decayed = ref.adam_step(lambda _: lr, 0.9, 0.999, 1e-8, weight_decay=wd)
    plain = ref.adam_step(lambda _: lr, 0.9, 0.999, 1e-8)

    def step(params, grads, state, t):
        p1, s1 = decayed(params, grads, state, t)
        p0, _ = plain(params, grads, state, t)
        return {k: p1[k] if mask[k] else p0[k] for k in params}, s1

    return step


@pytest.mark.parametrize(
    "make",
    [
        lambda: optim_jax.sgd(-1.0),
        lambda: optim_jax.adam(-1e-3),
        lambda: optim_jax.adam(1e-3, eps=-1.0),
        lambda: optim_jax.adam(1e-3, b1=1.0),
        lambda: optim_jax.adamw(1e-3, b2=-0.1),
        lambda: optim_jax.rmsprop(1e-3, decay=1.5),
        lambda: optim_jax.adagrad(1e-3, eps=-1e-10),
        lambda: optim_jax.sgd(1e-3, nesterov=True),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(make):
    with pytest.raises(ValueError, match=r"learning_rate|eps|b1|b2|decay|nesterov"):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda: optim_jax.adamw("1e-3"),
        lambda: optim_jax.sgd(learning_rate="0.1"),
        lambda: optim_jax.adam(1e-3, b1="0.9"),
        lambda: optim_jax.lion(True),
    ],
)
def test_strings_and_flags_are_not_numbers(make):
    with pytest.raises(TypeError, match=r"learning_rate|b1"):
        make()


def test_state_keeps_parameter_dtype_for_bfloat16():
    import jax.numpy as jnp

    params = {"w": jnp.ones((4, 3), jnp.bfloat16)}
    tx = optim_jax.adamw(1e-3)
    state = tx.init(params)
    updates, state = tx.update(params, state, params)
    assert updates["w"].dtype == jnp.bfloat16
    adam_state = base.find_state(state, transforms.AdamState)
    assert adam_state.mu["w"].dtype == jnp.bfloat16 and adam_state.nu["w"].dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(updates["w"], np.float32)))


L2_CASES = {
    "adam": (
        lambda wd: optim_jax.adam(1e-2, weight_decay=wd),
        ref.adam_init,
        ref.adam_step(constant(1e-2), 0.9, 0.999, 1e-8),
        adam_view,
        lambda ps, wd: torch.optim.Adam(ps, lr=1e-2, weight_decay=wd),
    ),
    "rmsprop": (
        lambda wd: optim_jax.rmsprop(1e-2, momentum=0.9, centered=True, weight_decay=wd),
        ref.rmsprop_init(True, 0.9),
        ref.rmsprop_step(constant(1e-2), 0.99, 1e-8, momentum=0.9, centered=True),
        rmsprop_view,
        lambda ps, wd: torch.optim.RMSprop(
            ps, lr=1e-2, momentum=0.9, centered=True, weight_decay=wd
        ),
    ),
    "adagrad": (
        lambda wd: optim_jax.adagrad(0.1, weight_decay=wd),
        ref.adagrad_init(0.0),
        ref.adagrad_step(constant(0.1), 1e-10),
        lambda s: {"sum": base.find_state(s, transforms.AdagradState).sum_of_squares},
        lambda ps, wd: torch.optim.Adagrad(ps, lr=0.1, weight_decay=wd),
    ),
}


@pytest.mark.parametrize("name", sorted(L2_CASES))
def test_l2_weight_decay_is_torchs(name):
    """``weight_decay`` of adam, rmsprop and adagrad is torch's L2 term, added to the
    gradient before the moments: the float64 reference with ``g + wd p`` step by step, and
    torch's trajectory to 1e-12; 0 leaves the chain as it was (no decay transformation)."""
    make, init, step, view, make_torch = L2_CASES[name]
    wd = 0.1
    harness.check_against_reference(lambda: make(wd), init, ref.with_l2(step, wd), view)
    params, grads = harness.random_params(5), harness.random_grads(5, 20)
    ours = harness.run_ours(make(wd), params, grads)
    want = harness.run_torch(lambda ps: make_torch(ps, wd), params, grads)
    harness.assert_trajectories_close(ours, want, 1e-12, "torch")
    without = harness.run_ours(make(0.0), params, grads)
    assert not np.allclose(ours[-1]["matrix"], without[-1]["matrix"])
    state = make(0.0).init({k: np.float32(v) for k, v in params.items()})
    assert len(state) == 2  # the scaling and the learning rate only


def amsgrad_view(opt_state):
    state = base.find_state(opt_state, transforms.AmsgradState)
    return {"m": state.mu, "v": state.nu, "v_max": state.nu_max}


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_amsgrad_is_torchs(decoupled):
    """``amsgrad=True``: the float64 reference of torch's AMSGrad (the maximum of the raw
    ``v``, corrected by the current ``1 - b2**t``) step by step, and torch's Adam/AdamW
    trajectory to 1e-12, on gradients that shrink (0.85x a step) so that the maximum is
    what the denominator holds. Optax's ``amsgrad`` (the maximum of the corrected ``v_hat``)
    ends elsewhere."""
    wd = 0.05 if decoupled else 0.0
    params = harness.random_params(6)
    grads = [
        {k: g * 0.85**t for k, g in step.items()}
        for t, step in enumerate(harness.random_grads(6, 20))
    ]

    def make():
        if decoupled:
            return optim_jax.adamw(1e-2, weight_decay=wd, amsgrad=True)
        return optim_jax.adam(1e-2, amsgrad=True)

    harness.check_against_reference(
        make,
        ref.amsgrad_init,
        ref.amsgrad_step(constant(1e-2), 0.9, 0.999, 1e-8, wd),
        amsgrad_view,
        params=params,
        grads=grads,
    )
    ours = harness.run_ours(make(), params, grads)
    torch_optimizer = torch.optim.AdamW if decoupled else torch.optim.Adam
    want = harness.run_torch(
        lambda ps: torch_optimizer(ps, lr=1e-2, weight_decay=wd, amsgrad=True), params, grads
    )
    harness.assert_trajectories_close(ours, want, 1e-12, "torch")
    plain = harness.run_ours(optim_jax.adamw(1e-2, weight_decay=wd), params, grads)
    assert not np.allclose(ours[-1]["matrix"], plain[-1]["matrix"], rtol=1e-6)
    if not decoupled:
        theirs = harness.run_ours(optax.amsgrad(1e-2), params, grads)
        assert not np.allclose(ours[-1]["matrix"], theirs[-1]["matrix"], rtol=1e-6)
