"""Schedules against torch.optim.lr_scheduler, Optax and float64 Python references.

Step convention under test: ``schedule(t)`` equals torch's ``get_last_lr()[0]``
after ``t`` calls to ``scheduler.step()`` (each after an ``optimizer.step()``).

Comparisons are scaled by the largest reference value over the steps checked:
``max_t |ours(t) - ref(t)| <= rtol * max_t |ref(t)|``, rtol 1e-12 in float64
and 1e-6 in float32. A per-value relative bar would be meaningless where a
schedule approaches 0 (the tail of a cosine is ``1 + cos(pi * x)`` with
``x`` near 1, which float32 cannot resolve below ~1e-7 of the peak).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim_jax
from optim_jax import schedules
from tests import harness
from tests.reference import schedules as ref

torch = pytest.importorskip("torch")

RTOL = {np.float64: 1e-12, np.float32: 1e-6}


# --------------------------------------------------------------------------- helpers


def evaluate(schedule, steps: np.ndarray, dtype) -> np.ndarray:
    """``schedule`` on all ``steps`` at once, jitted, in float64 (x64) or float32 mode."""
    with jax.enable_x64(dtype == np.float64):
        values = jax.jit(schedule)(jnp.asarray(steps))
        assert values.dtype == dtype, values.dtype
        return np.asarray(values, np.float64)


def assert_schedule_close(schedule, want, steps=None, rtol=None) -> None:
    """Checks ``schedule`` at ``steps`` (default ``0..len(want)-1``) in float64 and float32."""
    want = np.asarray(want, np.float64)
    steps = np.arange(len(want)) if steps is None else np.asarray(steps)
    scale = max(np.max(np.abs(want)), 1e-30)
    for dtype in (np.float64, np.float32):
        got = evaluate(schedule, steps, dtype)
        err = np.abs(got - want) / scale
        worst = int(np.argmax(err))
        bar = (rtol or RTOL)[dtype]
        assert err[worst] <= bar, (
            f"{np.dtype(dtype).name}: step {steps[worst]}: got {got[worst]!r}, "
            f"want {want[worst]!r} (scaled error {err[worst]:.3g} > {bar:g})"
        )


def torch_values(make_scheduler, steps: int, optimizer: str = "sgd", read: str = "lr") -> list:
    """What torch's optimizer uses for each of ``steps`` updates, in the usual loop.

    ``read``: ``"lr"`` (``get_last_lr()[0]``), ``"momentum"`` (SGD's
    ``param_groups[0]['momentum']``) or ``"beta1"`` (Adam's ``betas[0]``).
    """
    param = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    if optimizer == "sgd":
        opt = torch.optim.SGD([param], lr=1.0, momentum=0.9)
    else:
        opt = torch.optim.Adam([param], lr=1.0)
    scheduler = make_scheduler(opt)
    readers = {
        "lr": lambda: scheduler.get_last_lr()[0],
        "momentum": lambda: opt.param_groups[0]["momentum"],
        "beta1": lambda: opt.param_groups[0]["betas"][0],
    }
    values = []
    for _ in range(steps):
        values.append(float(readers[read]()))
        opt.step()
        scheduler.step()
    return values


def with_base_lr(base_lr, make):
    """A scheduler factory that first sets the optimizer's lr (torch schedulers scale it)."""

    def factory(opt):
        for group in opt.param_groups:
            group["lr"] = base_lr
        return make(opt)

    return factory


sched = torch.optim.lr_scheduler

# (id, our schedule, torch scheduler factory, number of steps compared)
TORCH_CASES = [
    ("StepLR", schedules.step_decay(0.1, 7, 0.5), lambda o: sched.StepLR(o, 7, 0.5), 300),
    (
        "MultiStepLR",
        schedules.multistep_decay(0.1, [10, 30, 30, 100, 250], 0.3),
        lambda o: sched.MultiStepLR(o, [10, 30, 30, 100, 250], 0.3),
        300,
    ),
    (
        "MultiStepLR-milestone-0",
        schedules.multistep_decay(0.1, [0, 5], 0.5),
        lambda o: sched.MultiStepLR(o, [0, 5], 0.5),
        20,
    ),
    (
        "ExponentialLR",
        schedules.exponential_decay(0.1, 0.98),
        lambda o: sched.ExponentialLR(o, 0.98),
        300,
    ),
    (
        "PolynomialLR-p1",
        schedules.polynomial_decay(0.1, 150),
        lambda o: sched.PolynomialLR(o, total_iters=150),
        300,
    ),
    (
        "PolynomialLR-p2.5",
        schedules.polynomial_decay(0.1, 150, power=2.5),
        lambda o: sched.PolynomialLR(o, total_iters=150, power=2.5),
        300,
    ),
    (
        "LinearLR-up",
        schedules.linear(0.1 * 0.25, 0.1, 40),
        lambda o: sched.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=40),
        300,
    ),
    (
        "LinearLR-down",
        schedules.linear(0.1, 0.1 * 0.05, 170),
        lambda o: sched.LinearLR(o, start_factor=1.0, end_factor=0.05, total_iters=170),
        300,
    ),
    (
        "CosineAnnealingLR",
        schedules.cosine_decay(0.1, 250, end_value=0.001),
        lambda o: sched.CosineAnnealingLR(o, T_max=250, eta_min=0.001),
        251,  # steps 0..T_max; past T_max torch climbs back up (see test below)
    ),
    (
        "CosineAnnealingWarmRestarts-T_mult1",
        schedules.cosine_warm_restarts(0.1, T_0=10, eta_min=0.002),
        lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=10, eta_min=0.002),
        1200,
    ),
    (
        "CosineAnnealingWarmRestarts-T_mult2",
        schedules.cosine_warm_restarts(0.1, T_0=3, T_mult=2, eta_min=0.002),
        lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2, eta_min=0.002),
        1600,
    ),
    (
        "CosineAnnealingWarmRestarts-T_0=1-T_mult3",
        schedules.cosine_warm_restarts(0.1, T_0=1, T_mult=3),
        lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=1, T_mult=3),
        1200,
    ),
    (
        "LambdaLR-hf-linear-warmup",
        schedules.warmup_linear_decay(0.1, 30, 250),
        lambda o: sched.LambdaLR(o, lambda t: ref.hf_linear_with_warmup_factor(t, 30, 250)),
        300,
    ),
    (
        "LambdaLR-fairseq-inverse-sqrt",
        schedules.inverse_sqrt(0.1, 40, init_value=1e-4),
        lambda o: sched.LambdaLR(o, lambda t: ref.fairseq_inverse_sqrt(t, 0.1, 40, 1e-4) / 0.1),
        300,
    ),
]


@pytest.mark.parametrize(
    "schedule, make_scheduler, steps", [c[1:] for c in TORCH_CASES], ids=[c[0] for c in TORCH_CASES]
)
def test_matches_torch_scheduler(schedule, make_scheduler, steps):
    want = torch_values(with_base_lr(0.1, make_scheduler), steps)
    assert_schedule_close(schedule, want)


ONE_CYCLE_CASES = [
    dict(total_steps=300, pct_start=0.3, anneal_strategy="cos", three_phase=False),
    dict(total_steps=300, pct_start=0.3, anneal_strategy="linear", three_phase=False),
    dict(total_steps=300, pct_start=0.25, anneal_strategy="cos", three_phase=True),
    dict(total_steps=300, pct_start=0.25, anneal_strategy="linear", three_phase=True),
    # Fractional phase ends: 0.37 * 157 - 1 = 57.09, 2 * 0.37 * 157 - 2 = 114.18.
    dict(total_steps=157, pct_start=0.37, anneal_strategy="cos", three_phase=True),
    dict(total_steps=157, pct_start=0.37, anneal_strategy="linear", three_phase=False),
    # pct_start * total_steps just above 1: a one-step warm-up phase ending at 0.2.
    dict(total_steps=40, pct_start=0.03, anneal_strategy="cos", three_phase=False),
]


def _one_cycle_ids(case):
    phases = "3phase" if case["three_phase"] else "2phase"
    return f"T{case['total_steps']}-p{case['pct_start']}-{case['anneal_strategy']}-{phases}"


@pytest.mark.parametrize("case", ONE_CYCLE_CASES, ids=_one_cycle_ids)
def test_one_cycle_matches_torch(case):
    """lr and momentum at every step 0..T-1; SGD's momentum and Adam's beta1 both."""
    kwargs = dict(div_factor=20.0, final_div_factor=300.0, base_momentum=0.8, max_momentum=0.93)

    def make(opt):
        return sched.OneCycleLR(opt, max_lr=0.5, **case, **kwargs)

    total = case["total_steps"]
    lr = schedules.one_cycle(0.5, div_factor=20.0, final_div_factor=300.0, **case)
    momentum = schedules.one_cycle_momentum(base_momentum=0.8, max_momentum=0.93, **case)
    torch_momentum = torch_values(make, total, "sgd", "momentum")
    assert torch_values(make, total, "adam", "beta1") == torch_momentum
    # Past T - 1 both hold their last value (torch raises past T).
    steps = [*range(total), total, 10 * total]
    assert_schedule_close(lr, torch_values(make, total) + [0.5 / 20.0 / 300.0] * 2, steps)
    assert_schedule_close(momentum, torch_momentum + [0.93] * 2, steps)


def test_one_cycle_defaults_match_torch():
    def make(opt):
        return sched.OneCycleLR(opt, max_lr=1.0, total_steps=100)

    assert_schedule_close(schedules.one_cycle(1.0, 100), torch_values(make, 100))
    assert_schedule_close(
        schedules.one_cycle_momentum(100), torch_values(make, 100, "sgd", "momentum")
    )


def test_sgd_with_one_cycle_matches_torch_trajectory():
    """End to end: the schedules fed to an optimizer reproduce torch's loop, lr and momentum."""
    total = 30
    params, grads = harness.random_params(3), harness.random_grads(3, total)
    tx = optim_jax.sgd(
        schedules.one_cycle(0.2, total, pct_start=0.4),
        momentum=schedules.one_cycle_momentum(total, pct_start=0.4),
    )
    want = harness.run_torch(
        lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9),
        params,
        grads,
        scheduler=lambda o: sched.OneCycleLR(o, max_lr=0.2, total_steps=total, pct_start=0.4),
    )
    harness.assert_trajectories_close(harness.run_ours(tx, params, grads), want, 1e-12, "torch")


def test_cosine_decay_holds_where_torch_oscillates():
    """Past T_max torch's CosineAnnealingLR climbs back to the initial value; we hold eta_min."""
    T = 20
    want = torch_values(with_base_lr(1.0, lambda o: sched.CosineAnnealingLR(o, T, 0.1)), 2 * T + 1)
    assert want[2 * T] == pytest.approx(1.0)
    assert_schedule_close(
        schedules.cosine_decay(1.0, T, 0.1), [0.1] * 4, steps=[T, T + 1, 2 * T, 10**6]
    )


# --------------------------------------------------------------------------- Optax


def optax_values(schedule, steps: int) -> np.ndarray:
    with jax.enable_x64(True):
        return np.asarray(jax.jit(schedule)(jnp.arange(steps)), np.float64)


WARMUP_COSINE_CASES = [
    dict(init_value=0.0, peak_value=1.0, warmup_steps=10, decay_steps=100, end_value=0.0),
    dict(init_value=0.1, peak_value=1.0, warmup_steps=25, decay_steps=200, end_value=0.05),
    dict(init_value=0.3, peak_value=0.3, warmup_steps=0, decay_steps=50, end_value=0.01),
    dict(init_value=0.0, peak_value=3e-4, warmup_steps=1, decay_steps=2, end_value=3e-5),
]


@pytest.mark.parametrize("kwargs", WARMUP_COSINE_CASES)
def test_warmup_cosine_decay_matches_optax(kwargs):
    steps = kwargs["decay_steps"] + 50  # past the end too
    want = optax_values(optax.warmup_cosine_decay_schedule(**kwargs), steps)
    assert_schedule_close(schedules.warmup_cosine_decay(**kwargs), want)


def test_join_schedules_matches_optax():
    pieces = [
        optax.linear_schedule(0.0, 1.0, 10),
        optax.constant_schedule(0.7),
        optax.cosine_decay_schedule(1.0, 30, alpha=0.1),
        optax.exponential_decay(0.5, 7, 0.8),
    ]
    boundaries = [10, 25, 25]  # an empty third piece
    want = optax_values(optax.join_schedules(pieces, boundaries), 80)
    assert_schedule_close(schedules.join_schedules(pieces, boundaries), want)
    ours = [
        schedules.linear(0.0, 1.0, 10),
        schedules.constant(0.7),
        schedules.cosine_decay(1.0, 30, 0.1),
        schedules.exponential_decay(0.5, 0.8, 7),
    ]
    assert_schedule_close(schedules.join_schedules(ours, boundaries), want)


OPTAX_CASES = [
    (
        "linear_schedule-begin",
        schedules.linear(0.2, 0.9, 40, transition_begin=15),
        optax.linear_schedule(0.2, 0.9, 40, transition_begin=15),
    ),
    (
        "cosine_decay_schedule",
        schedules.cosine_decay(0.4, 90, end_value=0.04),
        optax.cosine_decay_schedule(0.4, 90, alpha=0.1),
    ),
    (
        "polynomial_schedule",
        schedules.polynomial_decay(0.4, 90, end_value=0.01, power=3.0),
        optax.polynomial_schedule(0.4, 0.01, 3.0, 90),
    ),
    (
        "exponential_decay",
        schedules.exponential_decay(0.4, 0.5, transition_steps=13),
        optax.exponential_decay(0.4, 13, 0.5),
    ),
    (
        "exponential_decay-staircase",
        schedules.exponential_decay(0.4, 0.5, transition_steps=13, staircase=True),
        optax.exponential_decay(0.4, 13, 0.5, staircase=True),
    ),
]


@pytest.mark.parametrize(
    "ours, theirs", [c[1:] for c in OPTAX_CASES], ids=[c[0] for c in OPTAX_CASES]
)
def test_matches_optax_schedule(ours, theirs):
    assert_schedule_close(ours, optax_values(theirs, 150))


# --------------------------------------------------------------------------- semantics


def _restart_steps(T_0: int, T_mult: int, below: int) -> list[int]:
    """Steps where SGDR restarts, below ``below`` (a sample of them for ``T_mult = 1``)."""
    if T_mult == 1:
        return [T_0 * k for k in (1, 2, 10**6, 10**12, 10**17) if T_0 * k < below]
    starts, length = [], T_0
    while sum(starts[-1:]) + length < below:
        starts.append(sum(starts[-1:]) + length)
        length *= T_mult
    return starts


@pytest.mark.parametrize(
    "T_0, T_mult", [(3, 2), (1, 2), (5, 3), (7, 1)], ids=["3x2", "1x2", "5x3", "7x1"]
)
def test_cosine_warm_restarts_far_out(T_0, T_mult):
    """Exact cycle boundaries up to the largest int32 and int64 steps (integer cycle search)."""
    schedule = schedules.cosine_warm_restarts(1.0, T_0, T_mult, eta_min=0.25)
    for dtype, int_dtype in [(np.float32, np.int32), (np.float64, np.int64)]:
        limit = int(np.iinfo(int_dtype).max)
        restarts = _restart_steps(T_0, T_mult, limit)
        # A restart gives the initial value exactly, in float32 as well as float64.
        values = evaluate(schedule, np.asarray(restarts, int_dtype), dtype)
        assert np.all(values == 1.0), values
        near = sorted({s + d for s in restarts for d in (-1, 1)} | {limit, limit // 3})
        near = np.asarray([s for s in near if 0 <= s <= limit], int_dtype)
        want = np.asarray([ref.sgdr(int(s), 1.0, T_0, T_mult, 0.25) for s in near])
        got = evaluate(schedule, near, dtype)
        np.testing.assert_allclose(got, want, rtol=RTOL[dtype], atol=0)


LONG_CASES = [
    schedules.constant(0.3),
    schedules.linear(0.1, 0.4, 20, 5),
    schedules.cosine_decay(1.0, 30),
    schedules.polynomial_decay(1.0, 30, power=2.0),
    schedules.exponential_decay(1.0, 0.9),
    schedules.step_decay(1.0, 4),
    schedules.multistep_decay(1.0, [3, 9]),
    schedules.warmup_cosine_decay(0.0, 1.0, 5, 30),
    schedules.warmup_linear_decay(1.0, 5, 30),
    schedules.inverse_sqrt(1.0, 5),
    schedules.cosine_warm_restarts(1.0, 4, 2),
    schedules.one_cycle(1.0, 30, three_phase=True),
    schedules.one_cycle_momentum(30),
    schedules.join_schedules([schedules.constant(0.1), schedules.cosine_decay(1.0, 9)], [3]),
]


@pytest.mark.parametrize("schedule", LONG_CASES)
def test_scalar_vector_jit_and_vmap_agree(schedule):
    @jax.jit
    def three_ways(steps):
        return schedule(steps), jax.vmap(schedule)(steps), schedule(steps.reshape(4, 10))

    vector, vmapped, matrix = (np.asarray(x) for x in three_ways(jnp.arange(40)))
    assert vector.shape == (40,) and vector.dtype == np.float32
    np.testing.assert_allclose(vmapped, vector, rtol=1e-6)
    np.testing.assert_array_equal(matrix, vector.reshape(4, 10))  # elementwise on any shape
    jitted = jax.jit(schedule)
    for t in (0, 1, 7, 39):  # Python ints
        scalar = jitted(t)
        assert scalar.shape == () and scalar.dtype == jnp.float32
        np.testing.assert_allclose(float(scalar), vector[t], rtol=1e-6, atol=1e-7)
    assert float(jitted(-5)) == float(jitted(0))  # negative steps count as step 0


def test_python_int_and_float_steps():
    """Eager calls with a Python int work; a float step is an error, not a silent truncation."""
    schedule = schedules.warmup_cosine_decay(0.0, 1.0, 4, 12)
    assert float(schedule(2)) == 0.5 and schedule(2).shape == ()
    assert float(schedule(jnp.uint32(2))) == 0.5  # no wrap-around in ``t - boundary``
    with pytest.raises(TypeError, match="integer step"):
        schedule(1.5)


def test_multistep_repeated_milestones_multiply():
    schedule = schedules.multistep_decay(1.0, [2, 2, 2], gamma=0.5)
    assert_schedule_close(schedule, [1.0, 1.0, 0.125, 0.125])


def test_zero_gamma():
    assert_schedule_close(schedules.exponential_decay(2.0, 0.0), [2.0, 0.0, 0.0])
    assert_schedule_close(schedules.step_decay(2.0, 2, gamma=0.0), [2.0, 2.0, 0.0, 0.0])


def test_zero_length_transitions_jump():
    assert_schedule_close(schedules.linear(1.0, 0.5, 0, transition_begin=2), [1.0, 1.0, 0.5, 0.5])
    # Warm-up as long as the whole schedule: the warm-up ramp, then end_value at once.
    assert_schedule_close(
        schedules.warmup_cosine_decay(0.0, 1.0, 4, 4, end_value=0.1),
        [0.0, 0.25, 0.5, 0.75, 0.1, 0.1],
    )
    # HF's recipe with W = 0 and with W = T.
    for warmup, total in [(0, 10), (10, 10)]:
        want = [ref.hf_linear_with_warmup_factor(t, warmup, total) for t in range(15)]
        assert_schedule_close(schedules.warmup_linear_decay(1.0, warmup, total), want)


def test_warmup_linear_decay_with_init_and_end_values():
    want = [0.1 + 0.9 * t / 4 for t in range(4)] + [1.0 - 0.8 * t / 6 for t in range(7)] + [0.2]
    assert_schedule_close(
        schedules.warmup_linear_decay(1.0, 4, 10, init_value=0.1, end_value=0.2), want
    )


def test_inverse_sqrt_without_warmup_and_t5_form():
    want = [1.0, 1.0] + [1.0 / math.sqrt(t) for t in range(2, 50)]
    assert_schedule_close(schedules.inverse_sqrt(1.0, 0), want)
    k = 100
    t5 = schedules.inverse_sqrt(k**-0.5, k, init_value=k**-0.5)
    assert_schedule_close(t5, [1.0 / math.sqrt(max(t, k)) for t in range(300)])


def test_schedule_drives_an_optimizer_learning_rate():
    """An alias reads the schedule at the 0-based update count (the documented convention)."""
    schedule = schedules.step_decay(0.5, 2, gamma=0.1)
    params = {"w": np.ones(3)}
    grads = [{"w": np.ones(3)} for _ in range(5)]
    traj = harness.run_ours(optim_jax.sgd(schedule), params, grads)
    steps = np.diff([1.0] + [p["w"][0] for p in traj])
    np.testing.assert_allclose(-steps, [0.5, 0.5, 0.05, 0.05, 0.005], rtol=1e-12)


# --------------------------------------------------------------------------- validation

BAD_ARGUMENTS = [
    (lambda: schedules.constant(-1.0), "value"),
    (lambda: schedules.constant(float("nan")), "value"),
    (lambda: schedules.constant(float("inf")), "value"),
    (lambda: schedules.linear(1.0, -0.1, 10), "end_value"),
    (lambda: schedules.linear(1.0, 0.1, -1), "transition_steps"),
    (lambda: schedules.linear(1.0, 0.1, 2.5), "transition_steps"),
    (lambda: schedules.linear(1.0, 0.1, True), "transition_steps"),
    (lambda: schedules.linear(1.0, 0.1, 10, transition_begin=-2), "transition_begin"),
    (lambda: schedules.cosine_decay(float("nan"), 10), "init_value"),
    (lambda: schedules.cosine_decay(1.0, -10), "decay_steps"),
    (lambda: schedules.polynomial_decay(1.0, 10, power=0.0), "power"),
    (lambda: schedules.exponential_decay(1.0, -0.5), "gamma"),
    (lambda: schedules.exponential_decay(1.0, 0.5, transition_steps=0), "transition_steps"),
    (lambda: schedules.step_decay(1.0, 0), "step_size"),
    (lambda: schedules.step_decay(1.0, -3), "step_size"),
    (lambda: schedules.step_decay(1.0, 3, gamma=float("nan")), "gamma"),
    (lambda: schedules.multistep_decay(1.0, [10, 5]), "milestones"),
    (lambda: schedules.multistep_decay(1.0, [-1, 5]), "milestones"),
    (
        lambda: schedules.warmup_cosine_decay(0.0, 1.0, 11, 10),
        "warmup_steps (11).*decay_steps (10)",
    ),
    (lambda: schedules.warmup_cosine_decay(0.0, -1.0, 1, 10), "peak_value"),
    (lambda: schedules.warmup_linear_decay(1.0, 11, 10), "warmup_steps (11).*total_steps (10)"),
    (lambda: schedules.inverse_sqrt(1.0, -1), "warmup_steps"),
    (lambda: schedules.inverse_sqrt(-1.0, 1), "peak_value"),
    (lambda: schedules.cosine_warm_restarts(1.0, 0), "T_0"),
    (lambda: schedules.cosine_warm_restarts(1.0, 10, T_mult=0), "T_mult"),
    (lambda: schedules.cosine_warm_restarts(1.0, 10, eta_min=-1.0), "eta_min"),
    (lambda: schedules.one_cycle(1.0, 0), "total_steps"),
    (lambda: schedules.one_cycle(1.0, 100, pct_start=0.0), "pct_start"),
    (lambda: schedules.one_cycle(1.0, 100, pct_start=1.0), "pct_start"),
    (lambda: schedules.one_cycle(1.0, 100, pct_start=float("nan")), "pct_start"),
    (lambda: schedules.one_cycle(1.0, 10, pct_start=0.1), "pct_start"),  # warm-up of length 0
    (lambda: schedules.one_cycle(1.0, 100, pct_start=0.6, three_phase=True), "pct_start"),
    (lambda: schedules.one_cycle(1.0, 100, anneal_strategy="exp"), "anneal_strategy"),
    (lambda: schedules.one_cycle(1.0, 100, div_factor=0.0), "div_factor"),
    (lambda: schedules.one_cycle(1.0, 100, final_div_factor=-1.0), "final_div_factor"),
    (lambda: schedules.one_cycle(-1.0, 100), "max_value"),
    (lambda: schedules.one_cycle_momentum(100, base_momentum=1.0), "base_momentum"),
    (lambda: schedules.one_cycle_momentum(100, max_momentum=-0.1), "max_momentum"),
    (lambda: schedules.one_cycle_momentum(100, pct_start=1.5), "pct_start"),
    (lambda: schedules.join_schedules([], []), "schedules"),
    (lambda: schedules.join_schedules([schedules.constant(1.0)] * 2, []), "boundaries"),
    (lambda: schedules.join_schedules([schedules.constant(1.0)] * 3, [5, 2]), "boundaries"),
]


@pytest.mark.parametrize("build, name", BAD_ARGUMENTS)
def test_bad_arguments_raise_value_error_naming_them(build, name):
    with pytest.raises(ValueError, match=name.replace("(", r"\(").replace(")", r"\)")):
        build()


def test_one_cycle_edge_of_valid_pct_start_matches_torch():
    """The largest three-phase pct_start we accept is one torch also handles (last phase > 0)."""
    case = dict(total_steps=21, pct_start=0.5, three_phase=True)  # last phase: 20 - 19 = 1 step

    def make(opt):
        return sched.OneCycleLR(opt, max_lr=1.0, **case)

    assert_schedule_close(schedules.one_cycle(1.0, **case), torch_values(make, 21))


TRACEABLE = {
    "constant": (optim_jax.constant, dict(value=0.1)),
    "linear": (optim_jax.linear, dict(init_value=0.1, end_value=0.01, transition_steps=10)),
    "cosine_decay": (optim_jax.cosine_decay, dict(init_value=0.1, decay_steps=10, end_value=0.01)),
    "polynomial_decay": (
        optim_jax.polynomial_decay,
        dict(init_value=0.1, decay_steps=10, end_value=0.01, power=2.0),
    ),
    "exponential_decay": (optim_jax.exponential_decay, dict(init_value=0.1, gamma=0.9)),
    "multistep_decay": (
        optim_jax.multistep_decay,
        dict(init_value=0.1, milestones=[2, 5], gamma=0.5),
    ),
    "warmup_cosine_decay": (
        optim_jax.warmup_cosine_decay,
        dict(init_value=0.01, peak_value=0.1, warmup_steps=3, decay_steps=10, end_value=0.001),
    ),
    "inverse_sqrt": (optim_jax.inverse_sqrt, dict(peak_value=0.1, warmup_steps=3, init_value=0.01)),
    "cosine_warm_restarts": (
        optim_jax.cosine_warm_restarts,
        dict(init_value=0.1, T_0=4, T_mult=2, eta_min=0.01),
    ),
    "one_cycle": (
        optim_jax.one_cycle,
        dict(max_value=0.1, total_steps=12, div_factor=25.0, final_div_factor=1e4),
    ),
}


@pytest.mark.parametrize("name", sorted(TRACEABLE))
def test_value_arguments_may_be_traced(name):
    """Every value argument of a schedule may be a traced scalar: ``jax.vmap`` over it gives
    the schedules built one value at a time, and ``jax.grad`` of the sum over 12 steps equals
    the central difference (float64, h = 1e-6 of the value: 1e-7 relative is curvature and
    rounding, plus 1e-12 absolute for a derivative near zero, such as one_cycle's in
    final_div_factor, -1.9e-10, where the difference's rounding is ~1e-14).
    ``one_cycle``'s ``pct_start``, which places the phases, must be a number."""
    build, kwargs = TRACEABLE[name]
    with jax.enable_x64(True):
        for arg, value in kwargs.items():
            if not isinstance(value, float):
                continue

            def total(x, arg=arg):
                return jnp.sum(build(**{**kwargs, arg: x})(jnp.arange(12)))

            def values(x, arg=arg):
                return build(**{**kwargs, arg: x})(jnp.arange(12))

            xs = np.array([value, 0.5 * value])
            swept = jax.vmap(values)(jnp.asarray(xs))
            np.testing.assert_allclose(swept, [values(x) for x in xs], rtol=1e-12, err_msg=arg)
            h = 1e-6 * value
            central = (total(value + h) - total(value - h)) / (2 * h)
            np.testing.assert_allclose(
                jax.grad(total)(value), central, rtol=1e-7, atol=1e-12, err_msg=arg
            )
    with pytest.raises(TypeError, match="pct_start must be a number"):
        jax.vmap(lambda p: optim_jax.one_cycle(0.1, 12, pct_start=p)(3))(jnp.array([0.3]))
