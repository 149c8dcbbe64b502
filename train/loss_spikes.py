"""Loss-spike detection inside the jitted step.

A *spike* is a finite training loss above ``factor`` x the median of the recent
losses. The median comes from a ring buffer of the last ``window`` losses kept
in the training state, so detection costs no host round trip and survives a
checkpoint and resume. Nothing is flagged until the buffer is full.

A spiking loss enters the buffer clipped to the threshold (``factor`` x
median): one wild batch barely moves the median, while a lasting change of
level (a new data mix, a learning-rate restart) raises it within about
``window / 2`` steps, so the detector follows it instead of flagging every
step from then on. Non-finite losses never enter the buffer; the step's finite
check handles them.

What happens to a spiking step is the run's policy (``run.spike_policy``):
``warn`` keeps its update, ``skip`` and ``rollback`` discard it in the step
(as for a non-finite gradient) and the loop of a ``rollback`` run then returns
to the newest checkpoint and trains on past the offending batches.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SpikeRule:
    factor: float  # a loss above factor x the recent median is a spike (> 1)
    window: int  # how many recent losses the median is over
    discard: bool  # whether a spiking step's update is thrown away (policies skip, rollback)


class LossWatch(NamedTuple):
    recent: jax.Array  # float32[window]: a ring buffer of the last accepted losses
    seen: jax.Array  # int32: losses written into ``recent`` so far
    spikes: jax.Array  # int32: spikes detected so far


def init_loss_watch(rule: SpikeRule) -> LossWatch:
    return LossWatch(
        recent=jnp.zeros([rule.window], jnp.float32),
        seen=jnp.zeros([], jnp.int32),
        spikes=jnp.zeros([], jnp.int32),
    )


def watch_loss(rule: SpikeRule, watch: LossWatch, loss: jax.Array) -> tuple[jax.Array, LossWatch]:
    """``(is_spike, new_watch)`` for this step's training loss (a float32 scalar)."""
    loss = loss.astype(jnp.float32)
    full = watch.seen >= rule.window
    threshold = rule.factor * jnp.median(watch.recent)
    finite = jnp.isfinite(loss)
    spike = full & finite & (loss > threshold)
    accepted = jnp.where(full, jnp.minimum(loss, threshold), loss)
    recent = jnp.where(
        finite, watch.recent.at[watch.seen % rule.window].set(accepted), watch.recent
    )
    new_watch = LossWatch(
        recent=recent,
        seen=watch.seen + finite.astype(jnp.int32),
        spikes=watch.spikes + spike.astype(jnp.int32),
    )
    return spike, new_watch
