"""A GPT-style decoder: pre-norm blocks, causal attention, GELU MLP, untied head.

Parameters carry logical axis names (``vocab``, ``embed``, ``heads``, ``kv``,
``mlp``); ``train/mesh.py`` maps them onto the device mesh. Residual output
projections start with standard deviation ``0.02 / sqrt(2 * n_layers)`` (GPT-2's
scaled residual initialisation), every other kernel with 0.02; ``model.init`` other than
``default`` gives every kernel that initialiser instead (train/models/initializers.py).
"""

from __future__ import annotations

import math

import jax
import jax.extend
import jax.numpy as jnp
from flax import nnx

from train import mesh as mesh_lib
from train.config import ConfigError, ModelConfig
from train.models import initializers

INIT_STD = 0.02


def _init(std: float, axes: tuple[str | None, ...]):
    return nnx.with_partitioning(nnx.initializers.normal(std), axes)


def _kernel(cfg: ModelConfig, std: float, axes: tuple[str | None, ...]):
    """A matmul kernel's initialiser: normal ``std`` under ``model.init=default``, else the
    chosen one (embeddings are lookups, not matmuls, and keep normal 0.02 either way)."""
    chosen = initializers.make(cfg.init, cfg.init_mode, cfg.init_gain, activation="gelu")
    return _init(std, axes) if chosen is None else nnx.with_partitioning(chosen, axes)


def attention_implementation(
    cfg: ModelConfig, dtype: jnp.dtype, platform_version: str | None = None
) -> str:
    """The attention kernel ``model.attention`` resolves to on this backend: xla or cudnn.

    ``cudnn`` is ``jax.nn.dot_product_attention``'s fused (flash) kernel: the
    ``[seq, seq]`` scores stay in on-chip memory instead of making a round trip through
    HBM per layer, which at GPT-2-small's sequence 1024 moves more bytes than the
    matmuls take time. cuDNN runs it on NVIDIA GPUs, for bfloat16/float16 inputs and a
    head dimension that is a multiple of 8 (at most 128 before Hopper, 256 from Hopper
    on). ``auto`` picks it where all of that holds with a head dimension of at most 128,
    else ``xla``; an explicit ``cudnn`` that cannot run is a ConfigError.
    ``platform_version`` defaults to the default backend's (``"cuda ..."`` on CUDA).
    """
    if platform_version is None:
        platform_version = jax.extend.backend.get_backend().platform_version
    head_dim = cfg.d_model // cfg.n_heads
    missing = []
    if "cuda" not in platform_version.lower():
        missing.append(f"an NVIDIA GPU (the backend is {platform_version!r})")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        missing.append(f"bfloat16 or float16 compute (precision.compute is {jnp.dtype(dtype)})")
    if head_dim % 8 or head_dim > 256:
        missing.append(f"a head dimension that is a multiple of 8 up to 256 (it is {head_dim})")
    if cfg.attention == "cudnn" and missing:
        raise ConfigError(f"model.attention=cudnn needs {' and '.join(missing)}; use xla or auto")
    if cfg.attention == "auto":
        return "cudnn" if not missing and head_dim <= 128 else "xla"
    return cfg.attention


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, residual_std: float, rngs: nnx.Rngs):
        if cfg.d_model % cfg.n_heads:
            raise ConfigError(
                f"model.d_model ({cfg.d_model}) must be divisible by model.n_heads ({cfg.n_heads})"
            )
        self.implementation = attention_implementation(cfg, dtype)
        head_dim = cfg.d_model // cfg.n_heads
        shape = (cfg.n_heads, head_dim)

        def project_in():
            return nnx.LinearGeneral(
                cfg.d_model,
                shape,
                kernel_init=_kernel(cfg, INIT_STD, ("embed", "heads", "kv")),
                bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("heads", "kv")),
                dtype=dtype,
                param_dtype=jnp.float32,
                rngs=rngs,
            )

        self.query, self.key, self.value = project_in(), project_in(), project_in()
        self.out = nnx.LinearGeneral(
            shape,
            cfg.d_model,
            axis=(-2, -1),
            kernel_init=_kernel(cfg, residual_std, ("heads", "kv", "embed")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",)),
            dtype=dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = self.query(x), self.key(x), self.value(x)
        if self.implementation == "cudnn":
            attended = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
            return self.out(attended)
        # Attention logits and softmax in float32 whatever the compute dtype. Written out
        # rather than jax.nn.dot_product_attention, whose float16 form XLA:CPU cannot compile.
        logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
        logits = logits * q.shape[-1] ** -0.5
        seq = x.shape[-2]
        causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
        logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.out(jnp.einsum("bnts,bsnh->btnh", probs, v))


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, residual_std: float, rngs: nnx.Rngs):
        hidden = cfg.mlp_ratio * cfg.d_model
        common = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.up = nnx.Linear(
            cfg.d_model,
            hidden,
            kernel_init=_kernel(cfg, INIT_STD, ("embed", "mlp")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("mlp",)),
            **common,
        )
        self.down = nnx.Linear(
            hidden,
            cfg.d_model,
            kernel_init=_kernel(cfg, residual_std, ("mlp", "embed")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",)),
            **common,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(nnx.gelu(self.up(x)))


def _layer_norm(cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        cfg.d_model,
        scale_init=nnx.with_partitioning(nnx.initializers.ones, ("embed",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",)),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        residual_std = INIT_STD / math.sqrt(2 * cfg.n_layers)
        self.attn_norm = _layer_norm(cfg, dtype, rngs)
        self.attn = CausalSelfAttention(cfg, dtype, residual_std, rngs)
        self.mlp_norm = _layer_norm(cfg, dtype, rngs)
        self.mlp = Mlp(cfg, dtype, residual_std, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


def _check_fits_mesh(cfg: ModelConfig) -> None:
    """Every parameter dimension divisible by the mesh axis its logical axis is split over."""
    if cfg.d_model % cfg.n_heads:
        raise ConfigError(
            f"model.d_model ({cfg.d_model}) must be divisible by model.n_heads ({cfg.n_heads})"
        )
    mesh_lib.check_model_fits(
        dims=[
            ("vocab", cfg.vocab_size, "model.vocab_size"),
            ("embed", cfg.d_model, "model.d_model"),
            ("heads", cfg.n_heads, "model.n_heads"),
            ("kv", cfg.d_model // cfg.n_heads, "model.d_model / model.n_heads"),
            ("mlp", cfg.mlp_ratio * cfg.d_model, "model.mlp_ratio x model.d_model"),
        ],
        # The parameters' logical axes: embeddings and head, attention kernels, MLP kernels.
        together=[("vocab", "embed"), ("embed", "heads", "kv"), ("embed", "mlp")],
    )


class GPT(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        _check_fits_mesh(cfg)
        self.cfg = cfg
        self.token_embed = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=_init(INIT_STD, ("vocab", "embed")),
            dtype=dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )
        self.position_embed = nnx.Embed(
            cfg.seq_len,
            cfg.d_model,
            embedding_init=_init(INIT_STD, (None, "embed")),
            dtype=dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )
        self.blocks = nnx.List([Block(cfg, dtype, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = _layer_norm(cfg, dtype, rngs)
        self.head = nnx.Linear(
            cfg.d_model,
            cfg.vocab_size,
            use_bias=False,
            kernel_init=_kernel(cfg, INIT_STD, ("embed", "vocab")),
            dtype=dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``tokens [batch, seq]`` -> logits ``[batch, seq, vocab]`` in the compute dtype."""
        positions = jnp.arange(tokens.shape[-1])
        x = self.token_embed(tokens) + self.position_embed(positions)
        for block in self.blocks:
            x = nnx.remat(lambda b, h: b(h))(block, x) if self.cfg.remat else block(x)
        return self.head(self.final_norm(x))
