"""The GPT's attention: the written-out kernel against float64 NumPy, and the choice of kernel.

cuDNN's fused kernel cannot run (or even trace) without an NVIDIA GPU; here the rule that
picks it is checked for every backend string, and the CPU run refuses it by name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train import mesh as mesh_lib
from train.config import DEFAULT_RULES, ConfigError, MeshConfig, ModelConfig
from train.models.gpt import GPT, CausalSelfAttention, attention_implementation

CUDA = "cuda 12080"  # the form of a CUDA backend's platform_version


def _built(module_class, *args):
    """A module created as the trainer creates it: under a mesh and the sharding rules."""
    mesh = mesh_lib.build_mesh(MeshConfig())
    with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_lib.rules_tuple(DEFAULT_RULES)):
        return module_class(*args, rngs=nnx.Rngs(0))


def _causal_attention_float64(x, attn) -> np.ndarray:
    """softmax(q k^T / sqrt(h) + causal mask) v, then the output projection, in float64."""

    def weights(layer):
        return (
            np.asarray(layer.kernel.get_value(), np.float64),
            np.asarray(layer.bias.get_value(), np.float64),
        )

    x = np.asarray(x, np.float64)
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = map(
        weights, (attn.query, attn.key, attn.value, attn.out)
    )
    q, k, v = (np.einsum("btd,dnh->btnh", x, w) + b for w, b in ((wq, bq), (wk, bk), (wv, bv)))
    seq, head_dim = x.shape[1], q.shape[-1]
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(head_dim)
    scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attended = np.einsum("bnts,bsnh->btnh", probs, v)
    return np.einsum("btnh,nhd->btd", attended, wo) + bo


def test_written_out_attention_is_causal_softmax_attention():
    cfg = ModelConfig(d_model=32, n_heads=4, seq_len=12, attention="xla")
    attn = _built(CausalSelfAttention, cfg, jnp.float32, 0.02)
    # Kernels of std 0.3 give scores of order 1 (at the initial 0.02 the softmax is nearly
    # uniform and would hide a wrong scale or mask); biases, zero at initialisation, get values.
    keys = iter(jax.random.split(jax.random.key(2), 8))
    for layer in (attn.query, attn.key, attn.value, attn.out):
        for weight, std in ((layer.kernel, 0.3), (layer.bias, 0.1)):
            shape = weight.get_value().shape
            weight.set_value(std * jax.random.normal(next(keys), shape))
    x = jax.random.normal(jax.random.key(1), (3, cfg.seq_len, cfg.d_model))
    got = np.asarray(attn(x), np.float64)
    # float32 matmuls over 32 terms and a softmax over at most 12: relative error ~1e-6.
    np.testing.assert_allclose(got, _causal_attention_float64(x, attn), rtol=1e-5, atol=1e-5)
    # Causal: a later token cannot change an earlier position's output.
    changed = x.at[:, -1].set(0.0)
    np.testing.assert_array_equal(np.asarray(attn(changed))[:, :-1], got[:, :-1])


@pytest.mark.parametrize(
    "choice, platform, dtype, d_model, n_heads, expected",
    [
        ("auto", "cpu", jnp.bfloat16, 768, 12, "xla"),
        ("auto", CUDA, jnp.bfloat16, 768, 12, "cudnn"),  # GPT-2-small: head dim 64
        ("auto", CUDA, jnp.float16, 768, 12, "cudnn"),
        ("auto", CUDA, jnp.float32, 768, 12, "xla"),
        ("auto", CUDA, jnp.bfloat16, 60, 5, "xla"),  # head dim 12: not a multiple of 8
        ("auto", CUDA, jnp.bfloat16, 512, 2, "xla"),  # head dim 256: Hopper only
        ("auto", "rocm 60300", jnp.bfloat16, 768, 12, "xla"),
        ("xla", CUDA, jnp.bfloat16, 768, 12, "xla"),
        ("cudnn", CUDA, jnp.bfloat16, 512, 2, "cudnn"),
    ],
)
def test_the_attention_kernel_each_backend_gets(
    choice, platform, dtype, d_model, n_heads, expected
):
    cfg = ModelConfig(d_model=d_model, n_heads=n_heads, attention=choice)
    assert attention_implementation(cfg, dtype, platform) == expected


@pytest.mark.parametrize(
    "platform, dtype, d_model, n_heads, message",
    [
        ("cpu", jnp.bfloat16, 768, 12, r"an NVIDIA GPU \(the backend is 'cpu'\)"),
        (
            CUDA,
            jnp.float32,
            768,
            12,
            r"bfloat16 or float16 compute \(precision.compute is float32\)",
        ),
        (CUDA, jnp.bfloat16, 60, 5, r"multiple of 8 up to 256 \(it is 12\)"),
    ],
)
def test_a_cudnn_attention_that_cannot_run_names_the_key(
    platform, dtype, d_model, n_heads, message
):
    cfg = ModelConfig(d_model=d_model, n_heads=n_heads, attention="cudnn")
    with pytest.raises(ConfigError, match=r"model\.attention=cudnn needs .*" + message):
        attention_implementation(cfg, dtype, platform)


def test_this_backend_without_cuda_refuses_cudnn_when_the_model_is_built():
    if "cuda" in jax.extend.backend.get_backend().platform_version:
        pytest.skip("a CUDA backend runs cuDNN attention")
    cfg = ModelConfig(
        vocab_size=64, seq_len=8, d_model=32, n_layers=1, n_heads=2, attention="cudnn"
    )
    with pytest.raises(ConfigError, match=r"model\.attention=cudnn needs an NVIDIA GPU"):
        _built(GPT, cfg, jnp.bfloat16)
