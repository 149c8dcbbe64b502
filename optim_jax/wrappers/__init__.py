"""Wrappers around whole optimizers: parameter groups, layer-wise LR decay, freezing,
injectable hyperparameters, gradient accumulation and skipping non-finite updates."""

from optim_jax.wrappers.accumulation import (
    AccumulationState,
    accumulate_gradients,
    accumulation_step_applied,
)
from optim_jax.wrappers.groups import (
    DEFAULT_NO_DECAY_NAMES,
    decay_mask,
    freeze,
    layerwise_lr_decay,
    layerwise_lr_scales,
    param_groups,
    param_paths,
)
from optim_jax.wrappers.hyperparams import (
    InjectHyperparamsState,
    inject_hyperparams,
    set_hyperparam,
)
from optim_jax.wrappers.nonfinite import (
    SkipNotFiniteState,
    nonfinite_skip_counts,
    skip_not_finite,
)

__all__ = [
    "AccumulationState",
    "DEFAULT_NO_DECAY_NAMES",
    "InjectHyperparamsState",
    "SkipNotFiniteState",
    "accumulate_gradients",
    "accumulation_step_applied",
    "decay_mask",
    "freeze",
    "inject_hyperparams",
    "layerwise_lr_decay",
    "layerwise_lr_scales",
    "nonfinite_skip_counts",
    "param_groups",
    "param_paths",
    "set_hyperparam",
    "skip_not_finite",
]
