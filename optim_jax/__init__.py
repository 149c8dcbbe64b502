"""optim_jax: Optax-style gradient transformations, checked against reference math."""

from optim_jax import flat, hessian, quantization, schedules, transforms
from optim_jax.aliases import (
    adafactor,
    adagrad,
    adam,
    adamw,
    lamb,
    lars,
    lion,
    rmsprop,
    sgd,
    sophia,
)
from optim_jax.base import ScalarOrSchedule, Schedule
from optim_jax.clipping import (
    ClipState,
    adaptive_grad_clip,
    clip_by_global_norm,
    clip_by_value,
    pre_clip_global_norm,
)
from optim_jax.flat import FlatLayout, FlatParams, flat_layout
from optim_jax.in_place import stored_after
from optim_jax.quantization import MomentFormat
from optim_jax.schedules import (
    constant,
    cosine_decay,
    cosine_warm_restarts,
    exponential_decay,
    inverse_sqrt,
    join_schedules,
    linear,
    multistep_decay,
    one_cycle,
    one_cycle_momentum,
    polynomial_decay,
    step_decay,
    warmup_cosine_decay,
    warmup_linear_decay,
)
from optim_jax.transforms.sophia import sophia_hessian_due
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
from optim_jax.wrappers.nonfinite import SkipNotFiniteState, nonfinite_skip_counts, skip_not_finite
from optim_jax.wrappers.plateau import (
    PlateauState,
    observe_plateau,
    plateau_scale,
    reduce_on_plateau,
)
from optim_jax.wrappers.sam import SAMState, sam

__all__ = [
    "AccumulationState",
    "ClipState",
    "DEFAULT_NO_DECAY_NAMES",
    "FlatLayout",
    "FlatParams",
    "InjectHyperparamsState",
    "LookaheadState",
    "MomentFormat",
    "PlateauState",
    "SAMState",
    "ScalarOrSchedule",
    "Schedule",
    "SkipNotFiniteState",
    "accumulate_gradients",
    "accumulation_step_applied",
    "adafactor",
    "adagrad",
    "adam",
    "adamw",
    "adaptive_grad_clip",
    "clip_by_global_norm",
    "clip_by_value",
    "complex_as_real",
    "constant",
    "cosine_decay",
    "cosine_warm_restarts",
    "decay_mask",
    "exponential_decay",
    "flat",
    "flat_layout",
    "freeze",
    "hessian",
    "inject_hyperparams",
    "inverse_sqrt",
    "join_schedules",
    "lamb",
    "lars",
    "layerwise_lr_decay",
    "layerwise_lr_scales",
    "linear",
    "lion",
    "lookahead",
    "multistep_decay",
    "nonfinite_skip_counts",
    "observe_plateau",
    "one_cycle",
    "one_cycle_momentum",
    "param_groups",
    "param_paths",
    "plateau_scale",
    "polynomial_decay",
    "pre_clip_global_norm",
    "quantization",
    "reduce_on_plateau",
    "rmsprop",
    "sam",
    "schedules",
    "set_hyperparam",
    "sgd",
    "skip_not_finite",
    "sophia",
    "sophia_hessian_due",
    "step_decay",
    "stored_after",
    "transforms",
    "warmup_cosine_decay",
    "warmup_linear_decay",
]
