"""The training and evaluation steps: pure functions, jitted once with explicit shardings.

One step, as data: float32 master params -> model in the compute dtype (layers
cast their float32 params) -> loss in float32, times the loss scale ->
gradients (float32, since the params are) summed over micro-batches -> divided
by scale x micro-batches -> finite check and loss-spike check -> optimizer
update (with SAM, a second forward/backward over the same micro-batches at the
perturbed params, through the optimizer's ``grad_fn``) -> new params and state,
or the old ones when a gradient was not finite or the policy discards a loss
spike (skipped and counted).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import optim_jax
from train import loss_spikes, precision
from train.config import PrecisionConfig


class TrainState(NamedTuple):
    step: jax.Array  # int32: optimizer updates applied (skipped steps included)
    params: Any  # nnx.State of float32 master weights
    opt_state: Any
    loss_scale: precision.LossScale
    skipped: jax.Array  # int32: steps whose update was discarded (non-finite or loss spike)
    loss_watch: loss_spikes.LossWatch  # recent losses, for loss-spike detection


@dataclasses.dataclass(frozen=True)
class Task:
    """Which batch entries a model reads and predicts: ``model(batch[inputs])`` gives logits
    ``[..., classes]`` for the integer labels ``batch[targets]`` (same leading shape).

    Chosen once when the run is built, so the jitted steps hold no branch on the data.
    """

    name: str
    inputs: str
    targets: str
    unit: str  # what one target counts as, for throughput: "tokens", "examples"


# Next-token prediction: inputs and targets [batch, seq] token ids (train.data.Batches).
LANGUAGE_MODELING = Task("language_modeling", "inputs", "targets", "tokens")
# Image classification: images [batch, H, W, C], labels [batch] (train.data.ImageBatches).
CLASSIFICATION = Task("classification", "images", "labels", "examples")


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy over every target, computed in float32 whatever the logits' dtype."""
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def accuracy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """The fraction of targets whose logit is the largest (float32)."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == targets, dtype=jnp.float32)


def merge(graphdef: nnx.GraphDef, params: Any) -> nnx.Module:
    """The model with ``params``: per-leaf, or views cut out of the flat layout
    (``optimizer.flat_layout``), whose gradient then arrives flat."""
    return nnx.merge(graphdef, optim_jax.flat.unflatten(params))


def loss_fn(
    graphdef: nnx.GraphDef,
    params: Any,
    batch: dict[str, jax.Array],
    task: Task = LANGUAGE_MODELING,
) -> jax.Array:
    model = merge(graphdef, params)
    return cross_entropy(model(batch[task.inputs]), batch[task.targets])


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    precision_cfg: PrecisionConfig,
    accumulation_steps: int,
    learning_rate: Callable[[jax.Array], jax.Array],
    spike_rule: loss_spikes.SpikeRule,
    *,
    hessian_seed: int | None = None,
    task: Task = LANGUAGE_MODELING,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure function ``(state, batch) -> (state, metrics)`` for ``jax.jit``.

    ``batch`` holds ``[accumulation_steps, batch, ...]`` arrays: the micro-batches
    are scanned inside the one jitted step, so the effective batch is
    micro-batch x accumulation x data-parallel size.

    ``spike_rule`` says when a loss is a spike and whether the step then keeps
    its update (see :mod:`train.loss_spikes`).

    With ``hessian_seed`` (Sophia), refresh steps also compute the
    Gauss-Newton-Bartlett estimate of the Hessian diagonal on the first
    micro-batch and pass it to the optimizer as ``hessian_diag``.
    """

    def logits_fn(params, inputs):
        return merge(graphdef, params)(inputs)

    def hessian_diag(state: TrainState, micro_batch: dict[str, jax.Array]) -> dict:
        if hessian_seed is None:
            return {}
        key = jax.random.fold_in(jax.random.key(hessian_seed), state.step)
        estimate = jax.lax.cond(
            optim_jax.sophia_hessian_due(state.opt_state),
            lambda: optim_jax.hessian.gauss_newton_bartlett_diag(
                logits_fn, state.params, key, micro_batch[task.inputs]
            ),
            lambda: optim_jax.hessian.zeros_like_estimate(state.params),
        )
        return {"hessian_diag": estimate}

    def scaled_loss(params, micro_batch, scale):
        loss = loss_fn(graphdef, params, micro_batch, task)
        return loss * scale, loss

    grad_fn = jax.grad(scaled_loss, has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        scale = state.loss_scale.scale
        first_micro_batch = jax.tree.map(lambda x: x[0], batch)
        # Read from the state's structure when tracing: optimizer.sam_rho > 0 and
        # optimizer.plateau_factor < 1 (train.optimizer.with_tuning_wrappers).
        uses_sam = bool(optim_jax.base.find_states(state.opt_state, optim_jax.SAMState))
        plateaus = optim_jax.base.find_states(state.opt_state, optim_jax.PlateauState)
        # The factor reduce-on-plateau multiplies this step's learning rate by.
        lr_scale = plateaus[0].scale if plateaus else 1.0

        def batch_gradient(params):
            """The gradient at ``params`` summed over the micro-batches, then unscaled and
            averaged; and the micro-batches' losses."""

            def accumulate(grad_sum, micro_batch):
                grads, loss = grad_fn(params, micro_batch, scale)
                return jax.tree.map(jnp.add, grad_sum, grads), loss

            if accumulation_steps == 1:
                # No loop for one micro-batch: XLA:CPU runs convolutions inside a while loop
                # (which lax.scan always emits, even unrolled) about 30x slower.
                grad_sum, loss = grad_fn(params, first_micro_batch, scale)
                losses = loss[None]
            else:
                zeros = jax.tree.map(jnp.zeros_like, params)
                grad_sum, losses = jax.lax.scan(accumulate, zeros, batch)
            return jax.tree.map(lambda g: g / (scale * accumulation_steps), grad_sum), losses

        grads, losses = batch_gradient(state.params)
        grads_finite = optim_jax.base.all_finite(grads)
        loss = jnp.mean(losses)
        spike, loss_watch = loss_spikes.watch_loss(spike_rule, state.loss_watch, loss)
        apply = grads_finite & ~(spike & spike_rule.discard)
        extra_args = hessian_diag(state, first_micro_batch)
        if uses_sam:
            # SAM's second forward/backward pass: the same micro-batches at the perturbed params.
            extra_args["grad_fn"] = lambda params: batch_gradient(params)[0]

        def update():
            updates, new_opt_state = tx.update(grads, state.opt_state, state.params, **extra_args)
            new_params = optax.apply_updates(state.params, updates)
            # Lower-precision moments stored after the params: on CPU, no copy of them a step.
            new_opt_state = optim_jax.stored_after(new_opt_state, new_params)
            return new_params, new_opt_state, _grad_norm(grads, new_opt_state), updates

        if uses_sam:
            # The gradient at the perturbed point can overflow where the first did not, which
            # shows only after the update: the step is then skipped and counted like a
            # non-finite gradient, by selecting the old state.
            new_params, new_opt_state, grad_norm, updates = update()
            grads_finite = grads_finite & optim_jax.base.all_finite(updates)
            apply = grads_finite & ~(spike & spike_rule.discard)
            new_params, new_opt_state = jax.tree.map(
                lambda a, b: jnp.where(apply, a, b),
                (new_params, new_opt_state),
                (state.params, state.opt_state),
            )
        else:
            # Only the branch taken runs: a skipped step makes no optimizer pass, and an
            # applied one writes params and state once, with no select over them after.
            new_params, new_opt_state, grad_norm = jax.lax.cond(
                apply,
                lambda: update()[:3],
                lambda: (state.params, state.opt_state, optim_jax.base.global_norm(grads)),
            )

        new_state = TrainState(
            step=state.step + 1,
            params=new_params,
            opt_state=new_opt_state,
            loss_scale=precision.next_loss_scale(precision_cfg, state.loss_scale, grads_finite),
            skipped=state.skipped + jnp.where(apply, 0, 1).astype(jnp.int32),
            loss_watch=loss_watch,
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            # The optimizer's count advances only on applied updates, so does its schedule.
            "learning_rate": learning_rate(state.step - state.skipped) * lr_scale,
            "loss_scale": scale,
            "finite": grads_finite,
            "spike": spike,
        }
        if plateaus:
            metrics["lr_scale"] = lr_scale
        return new_state, metrics

    return train_step


def _grad_norm(grads: Any, opt_state: Any) -> jax.Array:
    """The gradients' global norm: read from the clipping state when the optimizer has one
    (it already took the norm of exactly these gradients), so the step takes it once."""
    clip_states = optim_jax.base.find_states(opt_state, optim_jax.ClipState)
    if clip_states:
        return clip_states[0].pre_clip_norm
    return optim_jax.base.global_norm(grads)


def make_eval_step(
    graphdef: nnx.GraphDef, task: Task = LANGUAGE_MODELING
) -> Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]:
    """``(params, batch) -> {"loss", "accuracy"}`` on one ``[batch, ...]`` evaluation batch."""

    def eval_step(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logits = merge(graphdef, params)(batch[task.inputs])
        targets = batch[task.targets]
        return {"loss": cross_entropy(logits, targets), "accuracy": accuracy(logits, targets)}

    return eval_step
