"""Reduce-on-plateau (optim_jax.reduce_on_plateau / observe_plateau) against torch.

What is proved here:

* stepping ``jax.jit(observe_plateau)`` and ``torch.optim.lr_scheduler.ReduceLROnPlateau``
  (on an optimizer with ``lr = 1``) through the same metric sequences -- noisy descents
  with plateaus, exact repeats of the best value and a NaN -- gives, after every
  observation, our scale = torch's lr, and the same best value, bad-observation count and
  cooldown counter; over modes min/max, thresholds rel/abs, patience, cooldown, min_scale;
* under ``jax_enable_x64`` the state is float64 and the scale is torch's lr exactly where
  float32 could not tell the metrics apart (improvements of 2e-8 relative, 1e-9 absolute);
* the update is the wrapped optimizer's times the scale, and ``update`` never changes the
  scale; ``observe_plateau`` finds the state nested inside other wrappers;
* a state without ``reduce_on_plateau`` and bad hyperparameters are clear errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import optim_jax

CASES = {
    "torch_defaults_short_patience": dict(factor=0.1, patience=2, threshold=1e-4),
    "cooldown_and_floor": dict(factor=0.5, patience=1, threshold=1e-3, cooldown=2, min_scale=0.1),
    "abs_threshold": dict(factor=0.3, patience=0, threshold=0.02, threshold_mode="abs"),
    "max_mode": dict(factor=0.5, patience=1, threshold=0.01, mode="max"),
    "max_abs_cooldown": dict(factor=0.7, patience=0, threshold=0.005, cooldown=1, mode="max",
                             threshold_mode="abs", min_scale=0.2),
}  # fmt: skip


def metric_sequence(seed: int, mode: str) -> list[float]:
    """60 values: a noisy descent (ascent in mode max) with flat stretches, a repeat of the
    best value so far and a NaN; float32-exact, so both sides compare the same numbers."""
    rng = np.random.default_rng(seed)
    t = np.arange(60)
    trend = 1.0 / (1.0 + 0.15 * np.minimum(t, 15) + 0.05 * np.maximum(t - 40, 0))
    values = trend + 0.02 * rng.normal(size=60)
    values = values if mode == "min" else 1.0 - values
    best = np.minimum.accumulate(values) if mode == "min" else np.maximum.accumulate(values)
    values[25] = best[24]  # equal to the best is not an improvement
    values[33] = np.nan  # never an improvement
    return [float(np.float32(v)) for v in values]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_torch_reduce_lr_on_plateau(name, seed):
    kwargs = CASES[name]
    ours = dict(kwargs)
    torch_kwargs = dict(kwargs)
    if "min_scale" in torch_kwargs:
        torch_kwargs["min_lr"] = torch_kwargs.pop("min_scale")
    tx = optax.chain(optim_jax.sgd(1.0), optim_jax.reduce_on_plateau(**ours))
    state = tx.init({"w": jnp.zeros(3)})
    observe = jax.jit(optim_jax.observe_plateau)

    weight = torch.zeros(3, requires_grad=True)
    torch_opt = torch.optim.SGD([weight], lr=1.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(torch_opt, **torch_kwargs)
    reductions = 0
    for i, value in enumerate(metric_sequence(seed, kwargs.get("mode", "min"))):
        state = observe(state, value)
        scheduler.step(value)
        plateau = optim_jax.base.find_state(state, optim_jax.PlateauState)
        where = f"[{name} seed {seed} observation {i}]"
        # float32 scale vs torch's float64 lr: a product of at most ~10 factors, 1e-6 relative.
        want_lr = torch_opt.param_groups[0]["lr"]
        assert float(plateau.scale) == pytest.approx(want_lr, rel=1e-6), where
        assert float(plateau.best) == pytest.approx(float(np.float32(scheduler.best))), where
        assert int(plateau.bad_evals) == scheduler.num_bad_epochs, where
        assert int(plateau.cooldown_left) == scheduler.cooldown_counter, where
        assert int(plateau.observations) == i + 1, where
        reductions = max(reductions, round(np.log(want_lr) / np.log(kwargs["factor"])))
    # The sequences do trigger the rule (else the comparison proves little).
    assert reductions >= 2


def torch_lr_after(metrics: list[float], **kwargs) -> float:
    weight = torch.zeros(1, requires_grad=True)
    torch_opt = torch.optim.SGD([weight], lr=1.0)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(torch_opt, **kwargs)
    for value in metrics:
        scheduler.step(value)
    return torch_opt.param_groups[0]["lr"]


@pytest.mark.parametrize(
    "metrics, kwargs",
    [
        # A summed loss near 1e5 improving by 2e-3 a time: below float32's spacing there (8e-3).
        (
            [1e5 - 0.002 * i for i in range(20)],
            dict(threshold=1e-3, threshold_mode="abs", patience=1),
        ),
        # Improvements of 1e-9 with threshold 0.
        ([1.0 + 1e-9 * (50 - i) for i in range(20)], dict(threshold=0.0, patience=2)),
        # Eight reductions: 0.1**8 in float64, not float32(0.1)**8.
        ([1.0] * 40, dict(patience=2)),
    ],
    ids=["large_metric_abs", "tiny_improvements", "eight_reductions"],
)  # fmt: skip
def test_float64_under_x64(metrics, kwargs):
    with jax.enable_x64(True):
        tx = optim_jax.reduce_on_plateau(**kwargs)
        state = tx.init({"w": jnp.zeros(1)})
        assert state.scale.dtype == state.best.dtype == jnp.float64
        observe = jax.jit(optim_jax.observe_plateau)
        for value in metrics:
            state = observe(state, value)
        assert float(optim_jax.plateau_scale(state)) == torch_lr_after(metrics, **kwargs)


def test_update_is_scaled_and_leaves_the_scale():
    params = {"w": jnp.arange(4.0), "b": jnp.ones(())}
    grads = {"w": jnp.asarray([1.0, -2.0, 3.0, 0.5]), "b": jnp.asarray(-1.0)}
    # Nested the way the trainer nests it: lookahead(sam(chain(sgd, plateau))).
    inner = optax.chain(optim_jax.sgd(0.1), optim_jax.reduce_on_plateau(0.5, patience=0))
    tx = optim_jax.lookahead(optim_jax.sam(inner, 0.0), 100, 0.5)
    state = tx.init(params)
    observe = jax.jit(optim_jax.observe_plateau)
    for value in (1.0, 2.0, 3.0):  # one improvement, then two reductions: scale 0.25
        state = observe(state, value)
    assert float(optim_jax.plateau_scale(state)) == 0.25
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=lambda _: grads))
    updates, new_state = update(grads, state, params)
    for name in params:
        np.testing.assert_array_equal(updates[name], -0.1 * 0.25 * grads[name])
    assert float(optim_jax.plateau_scale(new_state)) == 0.25


def test_errors():
    with pytest.raises(ValueError, match="PlateauState"):
        optim_jax.observe_plateau(optim_jax.sgd(0.1).init({"w": jnp.zeros(2)}), 1.0)
    for kwargs, match in [
        ({"factor": 1.0}, "factor"),
        ({"factor": 0.0}, "factor"),
        ({"patience": -1}, "patience"),
        ({"threshold": 1.0}, "threshold"),
        ({"min_scale": 2.0}, "min_scale"),
        ({"mode": "lowest"}, "mode"),
    ]:
        with pytest.raises(ValueError, match=match):
            optim_jax.reduce_on_plateau(**kwargs)
