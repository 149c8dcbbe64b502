"""optim_jax: Optax-style gradient transformations, checked against reference math."""

from optim_jax import transforms
from optim_jax.aliases import adagrad, adam, adamw, rmsprop, sgd
from optim_jax.base import ScalarOrSchedule, Schedule

__all__ = [
    "ScalarOrSchedule",
    "Schedule",
    "adagrad",
    "adam",
    "adamw",
    "rmsprop",
    "sgd",
    "transforms",
]
