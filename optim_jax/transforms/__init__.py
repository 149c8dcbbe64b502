"""Building blocks: each is a small ``optax.GradientTransformation``."""

from optim_jax.transforms.adafactor import (
    AdafactorState,
    FactoredRmsState,
    is_factored,
    scale_by_adafactor,
    scale_by_factored_rms,
)
from optim_jax.transforms.adaptive import (
    AdagradState,
    AdamState,
    AmsgradState,
    RmspropState,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_rmsprop,
)
from optim_jax.transforms.lion import LionState, scale_by_lion
from optim_jax.transforms.momentum import TraceState, trace
from optim_jax.transforms.scale import scale_by_learning_rate
from optim_jax.transforms.sophia import SophiaState, scale_by_sophia, sophia_hessian_due
from optim_jax.transforms.trust_ratio import scale_by_lamb, scale_by_lars, scale_by_trust_ratio
from optim_jax.transforms.weight_decay import add_decayed_weights

__all__ = [
    "AdafactorState",
    "AdagradState",
    "AdamState",
    "AmsgradState",
    "FactoredRmsState",
    "LionState",
    "RmspropState",
    "SophiaState",
    "TraceState",
    "add_decayed_weights",
    "is_factored",
    "scale_by_adafactor",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_factored_rms",
    "scale_by_lamb",
    "scale_by_lars",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_rmsprop",
    "scale_by_sophia",
    "scale_by_trust_ratio",
    "sophia_hessian_due",
    "trace",
]
