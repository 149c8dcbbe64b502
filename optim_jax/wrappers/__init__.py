"""Wrappers around whole optimizers: parameter groups, layer-wise LR decay, freezing,
injectable hyperparameters, gradient accumulation, skipping non-finite updates, SAM,
Lookahead and reduce-on-plateau."""

from optim_jax.wrappers.accumulation import (
    AccumulationState,
    accumulate_gradients,
    accumulation_step_applied,
)
from optim_jax.wrappers.complex_params import complex_as_real
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
from optim_jax.wrappers.lookahead import LookaheadState, lookahead
from optim_jax.wrappers.nonfinite import (
    SkipNotFiniteState,
    nonfinite_skip_counts,
    skip_not_finite,
)
from optim_jax.wrappers.plateau import (
    PlateauState,
    observe_plateau,
    plateau_scale,
    reduce_on_plateau,
)
from optim_jax.wrappers.sam import SAMState, sam, sam_perturbation

__all__ = [
    "AccumulationState",
    "DEFAULT_NO_DECAY_NAMES",
    "InjectHyperparamsState",
    "LookaheadState",
    "PlateauState",
    "SAMState",
    "SkipNotFiniteState",
    "accumulate_gradients",
    "accumulation_step_applied",
    "complex_as_real",
    "decay_mask",
    "freeze",
    "inject_hyperparams",
    "layerwise_lr_decay",
    "layerwise_lr_scales",
    "lookahead",
    "nonfinite_skip_counts",
    "observe_plateau",
    "param_groups",
    "param_paths",
    "plateau_scale",
    "reduce_on_plateau",
    "sam",
    "sam_perturbation",
    "set_hyperparam",
    "skip_not_finite",
]
