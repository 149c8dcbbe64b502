"""train.precision: the dtype policy, dynamic loss scaling, and what the trainer makes of them.

* the policy's pieces (compute dtype, when scaling is on, the initial scale) and their errors;
* ``next_loss_scale``: halves (and the step is skipped) on overflow, doubles after
  ``growth_interval`` finite steps in a row, replayed under ``jit`` against a plain-Python model;
* bf16 compute in the trainer: float32 master weights and optimizer moments, bf16 logits, float32
  loss and gradients, every matmul of the step fed bf16;
* float16 needs the loss scale: with it a run trains like float32 would, without it the
  gradients of most logits flush to zero.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train import config, loop, precision
from train import step as step_lib
from train.config import ConfigError, PrecisionConfig

# ------------------------------------------------------------------------------ the policy


def test_compute_dtypes_and_unknown_one():
    assert precision.compute_dtype(PrecisionConfig(compute="float32")) == jnp.float32
    assert precision.compute_dtype(PrecisionConfig(compute="bfloat16")) == jnp.bfloat16
    assert precision.compute_dtype(PrecisionConfig(compute="float16")) == jnp.float16
    with pytest.raises(ConfigError, match=r"precision\.compute must be one of .*'float64'"):
        precision.compute_dtype(PrecisionConfig(compute="float64"))


@pytest.mark.parametrize(
    "compute, mode, dynamic",
    [
        ("float16", "auto", True),
        ("bfloat16", "auto", False),
        ("float32", "auto", False),
        ("bfloat16", "dynamic", True),
        ("float16", "none", False),
    ],
)
def test_when_the_loss_is_scaled(compute, mode, dynamic):
    cfg = PrecisionConfig(compute=compute, loss_scale=mode, initial_scale=1024.0)
    assert precision.uses_dynamic_scale(cfg) is dynamic
    state = precision.initial_loss_scale(cfg)
    assert state.scale.dtype == jnp.float32 and state.finite_steps.dtype == jnp.int32
    assert float(state.scale) == (1024.0 if dynamic else 1.0)
    assert int(state.finite_steps) == 0


def test_bad_loss_scale_settings_name_the_key():
    with pytest.raises(ConfigError, match=r"precision\.loss_scale must be .*got 'static'"):
        precision.uses_dynamic_scale(PrecisionConfig(loss_scale="static"))
    with pytest.raises(ConfigError, match=r"precision\.initial_scale must be > 0, got 0\.0"):
        precision.initial_loss_scale(PrecisionConfig(compute="float16", initial_scale=0.0))


# ------------------------------------------------------------------------------ dynamic scale


def _dynamic(growth_interval: int) -> PrecisionConfig:
    return PrecisionConfig(
        compute="float16", initial_scale=2.0**15, growth_interval=growth_interval
    )


def _state(scale: float, finite_steps: int = 0) -> precision.LossScale:
    return precision.LossScale(jnp.float32(scale), jnp.int32(finite_steps))


def test_overflow_halves_the_scale_and_restarts_the_count():
    cfg = _dynamic(growth_interval=4)
    for finite_steps in (0, 3):
        new = precision.next_loss_scale(cfg, _state(2.0**15, finite_steps), jnp.bool_(False))
        assert float(new.scale) == 2.0**14 and int(new.finite_steps) == 0


def test_growth_interval_finite_steps_double_the_scale():
    cfg = _dynamic(growth_interval=3)
    state = _state(2.0**10)
    for expected_count in (1, 2):
        state = precision.next_loss_scale(cfg, state, jnp.bool_(True))
        assert float(state.scale) == 2.0**10 and int(state.finite_steps) == expected_count
    state = precision.next_loss_scale(cfg, state, jnp.bool_(True))
    assert float(state.scale) == 2.0**11 and int(state.finite_steps) == 0


def test_scale_never_falls_below_one():
    new = precision.next_loss_scale(_dynamic(10), _state(1.0), jnp.bool_(False))
    assert float(new.scale) == 1.0


def test_without_scaling_the_state_never_moves():
    cfg = PrecisionConfig(compute="bfloat16", loss_scale="none")
    state = precision.initial_loss_scale(cfg)
    for finite in (False, True, True):
        state = precision.next_loss_scale(cfg, state, jnp.bool_(finite))
        assert float(state.scale) == 1.0 and int(state.finite_steps) == 0


def _model_scales(flags, scale, growth_interval):
    """The rule in plain Python: the scale in force at each step of ``flags``."""
    out, run = [], 0
    for finite in flags:
        out.append(scale)
        if not finite:
            scale, run = max(scale / 2, 1.0), 0
        elif run + 1 >= growth_interval:
            scale, run = scale * 2, 0
        else:
            run += 1
    return out


def test_a_sequence_under_jit_follows_the_rule():
    cfg = _dynamic(growth_interval=3)
    rng = np.random.default_rng(0)
    flags = rng.random(200) < 0.8  # mostly finite, with overflows scattered in

    @jax.jit
    def replay(flags):
        def one(state, finite):
            return precision.next_loss_scale(cfg, state, finite), state.scale

        return jax.lax.scan(one, precision.initial_loss_scale(cfg), flags)[1]

    scales = np.asarray(replay(jnp.asarray(flags)))
    expected = _model_scales(flags, 2.0**15, 3)
    np.testing.assert_array_equal(scales, np.float32(expected))
    assert len(set(expected)) > 3  # it went both up and down


def test_growth_stops_short_of_float32_overflow():
    """Doubling from 2^127 would give inf, and inf/2 stays inf: every later step skipped."""
    cfg = _dynamic(growth_interval=1)
    state = _state(2.0**60)
    for _ in range(100):
        state = precision.next_loss_scale(cfg, state, jnp.bool_(True))
    assert float(state.scale) == precision.MAX_SCALE
    state = precision.next_loss_scale(cfg, state, jnp.bool_(False))
    assert float(state.scale) == precision.MAX_SCALE / 2


# ------------------------------------------------------------------------------ in the trainer

SMALL = (
    "model.n_layers=1",
    "model.d_model=64",
    "model.n_heads=4",
    "model.seq_len=32",
    "data.batch_size=16",
    "data.max_bytes=200000",
    "run.steps=8",
    "run.eval_batches=1",
    "optimizer.warmup_steps=2",
)


def _dot_operand_dtypes(jaxpr) -> collections.Counter:
    """(lhs dtype, rhs dtype) of every dot_general in ``jaxpr`` and its sub-jaxprs."""
    found: collections.Counter = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found[tuple(str(v.aval.dtype) for v in eqn.invars)] += 1
            for param in eqn.params.values():
                for sub in param if isinstance(param, list | tuple) else (param,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(jaxpr)
    return found


def test_bf16_compute_keeps_float32_master_weights_and_moments():
    setup = loop.build(config.load(None, [*SMALL, "precision.compute=bfloat16"]))
    batch = loop.train_batch(setup, 0)
    micro = jax.tree.map(lambda x: x[0], batch)

    # The model computes in bf16 (its logits are bf16); the loss is float32, and so are the
    # gradients with respect to the float32 master weights.
    def logits_of(params, inputs):
        return nnx.merge(setup.graphdef, params)(inputs)

    assert jax.eval_shape(logits_of, setup.state.params, micro["inputs"]).dtype == jnp.bfloat16
    loss = jax.eval_shape(lambda p: step_lib.loss_fn(setup.graphdef, p, micro), setup.state.params)
    assert loss.dtype == jnp.float32
    grads = jax.eval_shape(
        jax.grad(lambda p: step_lib.loss_fn(setup.graphdef, p, micro)), setup.state.params
    )
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}

    # Every matmul of the whole step (forward, backward) takes a bf16 operand: none runs in
    # float32 end to end. (Attention's backward multiplies its float32 logit gradient by bf16.)
    dots = _dot_operand_dtypes(jax.make_jaxpr(setup.train_step)(setup.state, batch).jaxpr)
    assert dots and ("float32", "float32") not in dots, dots
    assert dots[("bfloat16", "bfloat16")] > sum(dots.values()) / 2

    state = setup.state
    for step in range(2):
        state, stats = setup.train_step(state, loop.train_batch(setup, step))
    assert stats["loss"].dtype == jnp.float32 and np.isfinite(float(stats["loss"]))
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert len(moments) == 2 * len(jax.tree.leaves(state.params))  # AdamW's mu and nu
    assert {x.dtype for x in moments} == {jnp.dtype(jnp.float32)}


# Where float16 without a loss scale underflows, and why this setting is a realistic one.
# The gradient of the mean cross-entropy with respect to a logit is (p - y) / N for N tokens in
# the batch. At the start of training p is about 1/V for every entry of the vocabulary, so all but
# the target logits get about 1/(N V). Entering the float16 head, values below 2^-25 (half the
# smallest float16 subnormal, 2.98e-8) round to zero. With GPT-2's padded vocabulary (V = 50304,
# as in configs/gpt2_small.yaml) and a batch of N = 32 x 32 = 1024 tokens, 1/(N V) = 1.9e-8: the
# gradients of 99.5% of the logits flush to zero, so the head columns of tokens absent from the
# batch get no gradient and AdamW never moves them. A real GPT-2 batch (0.5M tokens) is 500x
# deeper into underflow. A scale of 2^15 lifts those values to ~6e-4, well inside float16's range.
# (The tiny 256-byte vocabulary of the other tests does not underflow: 1/(512 x 256) = 7.6e-6.)
FP16_UNDERFLOW = (
    "model.vocab_size=50304",
    "model.d_model=16",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.seq_len=32",
    "data.batch_size=32",
    "data.max_bytes=200000",
    "run.steps=4",
    "run.eval_batches=1",
    "optimizer.schedule=constant",
    "optimizer.learning_rate=1e-2",
    "precision.compute=float16",
)


def _head_kernel(params) -> np.ndarray:
    (kernel,) = jax.tree.leaves(params["head"])
    return np.asarray(kernel)


def _train_fp16(loss_scale: str) -> tuple[list[float], float, int]:
    """(losses, fraction of head weights moved by the first update, skipped steps)."""
    cfg = config.load(None, [*FP16_UNDERFLOW, f"precision.loss_scale={loss_scale}"])
    setup = loop.build(cfg)
    head0 = _head_kernel(setup.state.params)
    state, losses, moved = setup.state, [], None
    for step in range(cfg.run.steps):
        state, stats = setup.train_step(state, loop.train_batch(setup, step))
        losses.append(float(stats["loss"]))
        if moved is None:
            change = np.abs(_head_kernel(state.params) - head0)
            moved = float(np.mean(change > 0.5 * cfg.optimizer.learning_rate))
    return losses, moved, int(state.skipped)


@pytest.mark.slow
def test_float16_trains_with_loss_scaling_and_underflows_without():
    scaled, moved_scaled, skipped_scaled = _train_fp16("dynamic")
    plain, moved_plain, skipped_plain = _train_fp16("none")
    # No overflow anywhere: the difference below is underflow alone.
    assert skipped_scaled == skipped_plain == 0
    assert scaled[0] == pytest.approx(plain[0], abs=1e-3)  # same start (ln 50304 = 10.83)
    # AdamW moves every head weight whose gradient is non-zero by about the learning rate.
    # Measured: 99.8% of them with the scale, 0.14% without (only the columns of the targets).
    assert moved_scaled > 0.95
    assert moved_plain < 0.05
    # And the loss: measured 10.83 -> 10.28 with the scale, -> 10.52 without, after 3 updates
    # (the 4th step's loss); each step is ~2 s of float16 logits over a 50304-entry vocabulary.
    assert scaled[0] - scaled[-1] > 0.4
    assert plain[-1] - scaled[-1] > 0.15
