"""Small image classifiers for ``[batch, height, width, channels]`` images: a CNN and an MLP.

``CNN`` (``model.kind: cnn``): ``model.n_layers`` stages, each a 3x3 convolution
(``SAME`` padding) with ReLU followed by a 2x2 max-pool that halves the height
and width; stage ``i`` has ``model.channels * 2**i`` channels. Then a global
average over positions, a ReLU layer of ``model.hidden`` units and a linear
classifier of ``model.num_classes`` logits.

``MLP`` (``model.kind: mlp``): the flattened image through ``model.n_layers``
ReLU layers of ``model.hidden`` units and a linear classifier.

Initialisation: every kernel followed by a ReLU is He (Kaiming) normal, variance
``2 / fan_in`` with ``fan_in = kh * kw * c_in`` for a convolution (He et al.
2015, what ``torch.nn.init.kaiming_normal_`` does for ReLU); the classifier is
LeCun normal (variance ``1 / fan_in``); biases start at zero. ``model.init`` other than
``default`` gives every kernel that initialiser instead (train/models/initializers.py). There is no
normalisation layer: BatchNorm's running statistics would be state outside the
parameters, which the pure train step does not carry, and a GroupNorm after
each convolution made the shapes recipe no more stable and 1.4x slower on CPU.

Sharding: a kernel's input features/channels carry the logical name ``embed``
(split over ``fsdp`` by the default rules) and its output features/channels
``mlp`` (split over ``tensor``); the 3x3 window, the first convolution's input
channels (one, for grayscale) and the class dimension (a handful) are never
split. Parameters are float32; the layers compute in ``dtype`` (bfloat16 by
default) and the logits come out in ``dtype``; the loss casts them to float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from train import mesh as mesh_lib
from train.config import ConfigError, ModelConfig
from train.models import initializers

KINDS = ("cnn", "mlp")
KERNEL = (3, 3)
POOL = 2  # max-pool window and stride along height and width

_he = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
_lecun = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")


def _param(init, axes: tuple[str | None, ...]):
    return nnx.with_partitioning(init, axes)


def _kernel_inits(cfg: ModelConfig):
    """``(hidden, classifier)`` kernel initialisers: He and LeCun under ``model.init=default``,
    else the chosen one for both."""
    chosen = initializers.make(cfg.init, cfg.init_mode, cfg.init_gain, activation="relu")
    return (_he, _lecun) if chosen is None else (chosen, chosen)


def _dense(n_in: int, n_out: int, init, axes, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        n_in,
        n_out,
        kernel_init=_param(init, axes),
        bias_init=_param(nnx.initializers.zeros, axes[-1:]),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def max_pool(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 of ``[B, H, W, C]`` (an odd last row/column is dropped).

    The same values as ``nnx.max_pool(x, (2, 2), strides=(2, 2))``, written as a
    reshape and a max: on CPU its gradient is about 3x faster than the
    select-and-scatter that ``reduce_window`` differentiates to.
    """
    b, h, w, c = x.shape
    h, w = h // POOL, w // POOL
    x = x[:, : h * POOL, : w * POOL]
    return x.reshape(b, h, POOL, w, POOL, c).max(axis=(2, 4))


def _check_common(cfg: ModelConfig, in_channels: int) -> None:
    for key in ("n_layers", "hidden", "image_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.num_classes < 2:
        raise ConfigError(f"model.num_classes must be >= 2, got {cfg.num_classes}")
    if in_channels < 1:
        raise ConfigError(f"images must have >= 1 channel, got {in_channels}")


class CNN(nnx.Module):
    """``images [B, S, S, C]`` -> logits ``[B, num_classes]`` (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, in_channels: int, dtype: jnp.dtype, rngs: nnx.Rngs):
        _check_common(cfg, in_channels)
        if cfg.channels < 1:
            raise ConfigError(f"model.channels must be >= 1, got {cfg.channels}")
        if cfg.image_size < 2**cfg.n_layers:
            raise ConfigError(
                f"model.image_size={cfg.image_size} is too small for model.n_layers="
                f"{cfg.n_layers} conv stages (each halves it; needs >= {2**cfg.n_layers})"
            )
        self.image_size, self.in_channels = cfg.image_size, in_channels
        widths = [in_channels] + [cfg.channels * 2**i for i in range(cfg.n_layers)]
        stages = [(w, f"model.channels x 2**{i}") for i, w in enumerate(widths[1:])]
        mesh_lib.check_model_fits(
            dims=[
                # Convolutions after the first, and the hidden layer, take stage widths in.
                *[("embed", w, source) for w, source in stages],
                *[("mlp", w, source) for w, source in stages],
                ("mlp", cfg.hidden, "model.hidden"),
            ],
            together=[("embed", "mlp")],
        )
        hidden_init, classifier_init = _kernel_inits(cfg)
        self.convs = nnx.List(
            [
                nnx.Conv(
                    c_in,
                    c_out,
                    KERNEL,
                    padding="SAME",
                    # The image's own channels (1 for grayscale) are too few to split.
                    kernel_init=_param(hidden_init, (None, None, "embed" if i else None, "mlp")),
                    bias_init=_param(nnx.initializers.zeros, ("mlp",)),
                    dtype=dtype,
                    param_dtype=jnp.float32,
                    rngs=rngs,
                )
                for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:], strict=True))
            ]
        )
        self.hidden = _dense(widths[-1], cfg.hidden, hidden_init, ("embed", "mlp"), dtype, rngs)
        self.classifier = _dense(
            cfg.hidden, cfg.num_classes, classifier_init, ("mlp", None), dtype, rngs
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        x = images
        for conv in self.convs:
            x = max_pool(nnx.relu(conv(x)))
        x = jnp.mean(x, axis=(1, 2))
        return self.classifier(nnx.relu(self.hidden(x)))

    def flops_per_example(self) -> float:
        """Training model FLOPs of one image: 3 x 2 x the multiply-adds of convolutions and
        dense layers (forward 2 per multiply-add, backward 4: the convention of
        :func:`train.metrics.model_flops_per_token`). Pooling, ReLU and biases are not counted.
        """
        macs, size = 0, self.image_size
        for conv in self.convs:
            kh, kw, c_in, c_out = conv.kernel.get_value().shape
            macs += size * size * kh * kw * c_in * c_out
            size //= POOL
        macs += self.hidden.kernel.get_value().size + self.classifier.kernel.get_value().size
        return 6.0 * macs


class MLP(nnx.Module):
    """``images [B, S, S, C]`` -> flattened -> ReLU layers -> logits ``[B, num_classes]``."""

    def __init__(self, cfg: ModelConfig, in_channels: int, dtype: jnp.dtype, rngs: nnx.Rngs):
        _check_common(cfg, in_channels)
        widths = [cfg.image_size**2 * in_channels] + [cfg.hidden] * cfg.n_layers
        mesh_lib.check_model_fits(
            dims=[
                ("embed", widths[0], "model.image_size**2 x image channels"),
                # Hidden layers after the first take model.hidden features in.
                *([("embed", cfg.hidden, "model.hidden")] if cfg.n_layers > 1 else []),
                ("mlp", cfg.hidden, "model.hidden"),
            ],
            together=[("embed", "mlp")],
        )
        hidden_init, classifier_init = _kernel_inits(cfg)
        self.layers = nnx.List(
            [
                _dense(n_in, n_out, hidden_init, ("embed", "mlp"), dtype, rngs)
                for n_in, n_out in zip(widths[:-1], widths[1:], strict=True)
            ]
        )
        self.classifier = _dense(
            cfg.hidden, cfg.num_classes, classifier_init, ("mlp", None), dtype, rngs
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        x = images.reshape(images.shape[0], -1)
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.classifier(x)

    def flops_per_example(self) -> float:
        """Training model FLOPs of one image: 6 x the dense layers' multiply-adds."""
        macs = sum(layer.kernel.get_value().size for layer in self.layers)
        return 6.0 * float(macs + self.classifier.kernel.get_value().size)


def build(cfg: ModelConfig, in_channels: int, dtype: jnp.dtype, rngs: nnx.Rngs) -> CNN | MLP:
    """The classifier named by ``cfg.kind`` (``cnn`` or ``mlp``)."""
    if cfg.kind not in KINDS:
        raise ConfigError(f"model.kind must be one of {KINDS} for an image model, got {cfg.kind!r}")
    return (CNN if cfg.kind == "cnn" else MLP)(cfg, in_channels, dtype, rngs)
