"""Weight initialisers as Flax initialisers: ``init(key, shape, dtype) -> array``.

Each works as ``kernel_init=`` of ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Conv``
and composes with ``nnx.with_partitioning``. Kernels are laid out as Flax lays them
out: dense ``[in, out]`` (``LinearGeneral`` flattens its kernel to that before calling
the initialiser) and convolution ``[*window, in, out]``, so

    fan_in  = receptive field x in-channels   (receptive field = prod(window), 1 for dense)
    fan_out = receptive field x out-channels

as ``torch.nn.init._calculate_fan_in_and_fan_out`` computes them for torch's
``[out, in, *window]`` layout.

* Xavier/Glorot (Glorot & Bengio 2010, eq. 16): variance ``gain^2 * 2 / (fan_in + fan_out)``;
  uniform on ``+-gain * sqrt(6 / (fan_in + fan_out))`` or normal with that variance
  (``torch.nn.init.xavier_uniform_`` / ``xavier_normal_``).
* Kaiming/He (He et al. 2015, eq. 10 for fan_in, eq. 14 for fan_out): variance
  ``gain^2 / fan``; uniform on ``+-gain * sqrt(3 / fan)`` or normal (not truncated, as
  ``torch.nn.init.kaiming_uniform_`` / ``kaiming_normal_``).
* Gains (:data:`GAINS`): ``linear`` 1; ``relu`` sqrt(2) (He et al.: E[relu(z)^2] = 1/2 for
  z ~ N(0, 1), what ``torch.nn.init.calculate_gain("relu")`` returns); ``gelu``
  1 / sqrt(E[gelu(z)^2]) = 1.5335 for z ~ N(0, 1), the same second-moment argument
  applied to GELU (exact erf form; E[gelu(z)^2] = 0.425221 by float64 quadrature).
  ``torch.nn.init.calculate_gain`` has no ``gelu`` entry (it knows linear, conv*,
  sigmoid, tanh, relu, leaky_relu, selu), so there is no torch value to match.
* GPT-2's scaled residual initialisation (Radford et al. 2019, sec. 2.3): normal with
  standard deviation ``0.02 / sqrt(2 * n_layers)`` on the projections that write into the
  residual stream (two per block); every other GPT kernel normal 0.02.

:func:`make` turns the config's ``model.init`` / ``init_mode`` / ``init_gain`` into one
of these; ``default`` (None from :func:`make`) keeps each model's own scheme.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from train.config import INIT_GAINS, INIT_MODES, INITS, ConfigError

Initializer = Callable[..., jax.Array]  # (key, shape, dtype=float32) -> array

GPT2_STD = 0.02
# 1 / sqrt(E[gelu(z)^2]), z ~ N(0, 1), with gelu(z) = z * Phi(z): float64 quadrature of
# z^2 Phi(z)^2 phi(z) over the real line gives 0.4252214826, so the gain is 1.5335305.
GELU_GAIN = 1.5335305
GAINS: dict[str, float] = {"linear": 1.0, "relu": math.sqrt(2.0), "gelu": GELU_GAIN}


def fans(shape: Sequence[int]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a dense ``[in, out]`` or convolution ``[*window, in, out]``
    kernel: the window's size times the input / output channels."""
    if len(shape) < 2:
        raise ValueError(
            f"fans need a kernel of rank >= 2 ([in, out] or [*window, in, out]), "
            f"got shape {tuple(shape)}"
        )
    receptive_field = math.prod(shape[:-2])
    return receptive_field * shape[-2], receptive_field * shape[-1]


def _uniform(key: jax.Array, shape: Sequence[int], dtype, bound: float) -> jax.Array:
    return jax.random.uniform(key, tuple(shape), dtype, minval=-bound, maxval=bound)


def _normal(key: jax.Array, shape: Sequence[int], dtype, std: float) -> jax.Array:
    return std * jax.random.normal(key, tuple(shape), dtype)


def normal(std: float) -> Initializer:
    """Normal with mean 0 and standard deviation ``std``, whatever the shape."""

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return _normal(key, shape, dtype, std)

    return init


def scaled_residual_normal(n_layers: int, std: float = GPT2_STD) -> Initializer:
    """GPT-2's residual projections: normal with standard deviation ``std / sqrt(2 n_layers)``
    (each block adds two residual branches, so the stream's variance grows with ``2 n``)."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    return normal(std / math.sqrt(2 * n_layers))


def xavier_std(shape: Sequence[int], gain: float = 1.0) -> float:
    fan_in, fan_out = fans(shape)
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def kaiming_std(shape: Sequence[int], mode: str = "fan_in", gain: float = GAINS["relu"]) -> float:
    if mode not in INIT_MODES:
        raise ValueError(f"mode must be one of {INIT_MODES}, got {mode!r}")
    fan_in, fan_out = fans(shape)
    return gain / math.sqrt(fan_in if mode == "fan_in" else fan_out)


def xavier_uniform(gain: float = 1.0) -> Initializer:
    """Uniform on ``+-sqrt(3) * std`` with ``std = gain * sqrt(2 / (fan_in + fan_out))``."""

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return _uniform(key, shape, dtype, math.sqrt(3.0) * xavier_std(shape, gain))

    return init


def xavier_normal(gain: float = 1.0) -> Initializer:
    """Normal with ``std = gain * sqrt(2 / (fan_in + fan_out))``."""

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return _normal(key, shape, dtype, xavier_std(shape, gain))

    return init


def kaiming_uniform(mode: str = "fan_in", gain: float = GAINS["relu"]) -> Initializer:
    """Uniform on ``+-sqrt(3) * std`` with ``std = gain / sqrt(fan)``, fan by ``mode``."""
    kaiming_std((1, 1), mode)  # rejects a bad mode now rather than at the first call

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return _uniform(key, shape, dtype, math.sqrt(3.0) * kaiming_std(shape, mode, gain))

    return init


def kaiming_normal(mode: str = "fan_in", gain: float = GAINS["relu"]) -> Initializer:
    """Normal with ``std = gain / sqrt(fan)``, fan by ``mode``."""
    kaiming_std((1, 1), mode)

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return _normal(key, shape, dtype, kaiming_std(shape, mode, gain))

    return init


def make(name: str, mode: str, gain: str, activation: str) -> Initializer | None:
    """The kernel initialiser of ``model.init=name`` (None for ``default``: the model's own).

    ``gain`` is a key of :data:`GAINS` or ``auto``: for Xavier ``linear`` (Glorot's
    derivation has no activation gain), for Kaiming the model's ``activation``.
    """
    if name not in INITS:
        raise ConfigError(f"model.init must be one of {', '.join(INITS)}, got {name!r}")
    if mode not in INIT_MODES:
        raise ConfigError(f"model.init_mode must be one of {', '.join(INIT_MODES)}, got {mode!r}")
    if gain not in INIT_GAINS:
        raise ConfigError(f"model.init_gain must be one of {', '.join(INIT_GAINS)}, got {gain!r}")
    if name == "default":
        return None
    if gain == "auto":
        gain = "linear" if name.startswith("xavier") else activation
    value = GAINS[gain]
    if name == "xavier_uniform":
        return xavier_uniform(value)
    if name == "xavier_normal":
        return xavier_normal(value)
    if name == "kaiming_uniform":
        return kaiming_uniform(mode, value)
    return kaiming_normal(mode, value)
