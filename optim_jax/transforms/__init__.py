"""Building blocks: each is a small ``optax.GradientTransformation``."""

from optim_jax.transforms.adaptive import (
    AdagradState,
    AdamState,
    RmspropState,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_rmsprop,
)
from optim_jax.transforms.momentum import TraceState, trace
from optim_jax.transforms.scale import scale_by_learning_rate
from optim_jax.transforms.weight_decay import add_decayed_weights

__all__ = [
    "AdagradState",
    "AdamState",
    "RmspropState",
    "TraceState",
    "add_decayed_weights",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_rmsprop",
    "trace",
]
