"""Weight initialisers (train/models/initializers.py) and the models' use of them.

What is proved here:

* each initialiser's sample mean and variance match its formula (Glorot & Bengio 2010;
  He et al. 2015; GPT-2's 0.02 / sqrt(2 n_layers)), written out here from the papers with
  the fans counted by hand, for a dense [in, out] and a conv [kh, kw, in, out] kernel, and
  uniform draws stay inside their bound and reach it;
* the sample variances match torch.nn.init's (xavier_uniform_, xavier_normal_,
  kaiming_uniform_, kaiming_normal_ with fan_in and fan_out) on the same kernel in torch's
  [out, in, kh, kw] layout: the fan conventions agree;
* the relu gain is torch's calculate_gain("relu"); the gelu gain is 1 / sqrt(E[gelu(z)^2])
  by an independent float64 quadrature (torch has no gelu gain: calculate_gain rejects it);
* the models use them: the GPT's default residual projections have std 0.02/sqrt(2 n),
  its other kernels 0.02; model.init=xavier_uniform / kaiming_normal (fan_out) change the
  GPT's and the image MLP's kernels to those formulas; bad values are ConfigErrors naming
  the key.

Tolerance: a sample variance s^2 of n independent draws has standard error
sqrt((mu4 - sigma^4) / n) (mu4 the fourth central moment): sigma^2 sqrt(2 / n) for a normal,
sigma^2 sqrt(4 / (5 n)) for a uniform (mu4 = a^4 / 5, sigma^2 = a^2 / 3). Checks allow 5
standard errors (a false failure about once in 1.7 million), the mean 5 sigma / sqrt(n).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from scipy import integrate, special

from train import config
from train import mesh as mesh_lib
from train.config import ConfigError
from train.models import initializers as inits
from train.models import vision
from train.models.gpt import GPT

DENSE = (256, 128)  # [in, out]: fan_in 256, fan_out 128
CONV = (3, 3, 32, 64)  # [kh, kw, in, out]: fan_in 9 * 32 = 288, fan_out 9 * 64 = 576
FANS = {DENSE: (256, 128), CONV: (288, 576)}  # counted by hand
SQRT2 = math.sqrt(2.0)
SIGMAS = 5.0


def sample(init, shape, seed: int = 0) -> np.ndarray:
    return np.asarray(init(jax.random.key(seed), shape, jnp.float32), dtype=np.float64).ravel()


def variance_standard_error(variance: float, n: int, uniform: bool) -> float:
    return variance * math.sqrt((4.0 / 5.0 if uniform else 2.0) / n)


def check_moments(x: np.ndarray, variance: float, uniform: bool) -> None:
    n = x.size
    assert abs(x.mean()) < SIGMAS * math.sqrt(variance / n)
    error = SIGMAS * variance_standard_error(variance, n, uniform)
    assert abs(x.var() - variance) < error, (x.var(), variance, error)
    if uniform:
        bound = math.sqrt(3.0 * variance)
        assert np.abs(x).max() <= bound * (1 + 1e-6)  # float32 rounding of the bound
        # P(all n draws inside 0.99 bound) = 0.99^n < 1e-80 for n >= 18432.
        assert np.abs(x).max() > 0.99 * bound


@pytest.mark.parametrize("shape", [DENSE, CONV], ids=["dense", "conv"])
@pytest.mark.parametrize(
    "name, gain",
    [("xavier_uniform", 1.0), ("xavier_normal", 1.0), ("xavier_uniform", SQRT2)],
)
def test_xavier_variance_and_bounds(shape, name, gain):
    fan_in, fan_out = FANS[shape]
    assert inits.fans(shape) == (fan_in, fan_out)
    variance = gain**2 * 2.0 / (fan_in + fan_out)  # Glorot & Bengio 2010, eq. 16
    init = getattr(inits, name)(gain)
    check_moments(sample(init, shape), variance, uniform=name.endswith("uniform"))


@pytest.mark.parametrize("shape", [DENSE, CONV], ids=["dense", "conv"])
@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
@pytest.mark.parametrize("name", ["kaiming_uniform", "kaiming_normal"])
def test_kaiming_variance_and_bounds(shape, mode, name):
    fan = FANS[shape][0 if mode == "fan_in" else 1]
    variance = 2.0 / fan  # He et al. 2015: Var[w] = 2 / n_l for ReLU
    init = getattr(inits, name)(mode, SQRT2)
    check_moments(sample(init, shape), variance, uniform=name.endswith("uniform"))


def test_scaled_residual_normal():
    n_layers = 6
    variance = (0.02 / math.sqrt(2 * n_layers)) ** 2
    check_moments(sample(inits.scaled_residual_normal(n_layers), DENSE), variance, uniform=False)


def torch_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Flax [*window, in, out] -> torch [out, in, *window]."""
    return (shape[-1], shape[-2], *shape[:-2])


TORCH_CASES = [
    ("xavier_uniform", lambda: inits.xavier_uniform(), lambda w: torch.nn.init.xavier_uniform_(w)),
    ("xavier_normal", lambda: inits.xavier_normal(), lambda w: torch.nn.init.xavier_normal_(w)),
    *[
        (
            f"{name}_{mode}",
            lambda name=name, mode=mode: getattr(inits, name)(mode, SQRT2),
            lambda w, name=name, mode=mode: getattr(torch.nn.init, f"{name}_")(
                w, mode=mode, nonlinearity="relu"
            ),
        )
        for name in ("kaiming_uniform", "kaiming_normal")
        for mode in ("fan_in", "fan_out")
    ],
]


@pytest.mark.parametrize("shape", [DENSE, CONV], ids=["dense", "conv"])
@pytest.mark.parametrize("case", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_matches_torch_nn_init(shape, case):
    name, ours, theirs = case
    uniform = "uniform" in name
    torch.manual_seed(0)
    ref = theirs(torch.empty(torch_layout(shape), dtype=torch.float64)).numpy().ravel()
    x = sample(ours(), shape)
    # Two independent sample variances of the same variance: their difference has standard
    # error sqrt(2) x one's; the reference's own variance stands in for the true one.
    error = SIGMAS * math.sqrt(2.0) * variance_standard_error(ref.var(), x.size, uniform)
    assert abs(x.var() - ref.var()) < error, (x.var(), ref.var())
    if uniform:  # the same bound: torch's largest draw is inside ours and ours reaches near it
        assert np.abs(ref).max() <= np.abs(x).max() / 0.99


def test_gains():
    assert inits.GAINS["relu"] == pytest.approx(torch.nn.init.calculate_gain("relu"), rel=1e-12)
    assert inits.GAINS["linear"] == torch.nn.init.calculate_gain("linear")
    with pytest.raises(ValueError):
        torch.nn.init.calculate_gain("gelu")  # why the gelu gain is ours to derive

    def gain(activation) -> float:
        # 1 / sqrt(E[f(z)^2]) for z ~ N(0, 1): the He et al. argument for any activation.
        second_moment, _ = integrate.quad(
            lambda z: activation(z) ** 2 * math.exp(-z * z / 2) / math.sqrt(2 * math.pi),
            -np.inf,
            np.inf,
            epsabs=1e-13,
        )
        return 1.0 / math.sqrt(second_moment)

    assert gain(lambda z: max(z, 0.0)) == pytest.approx(SQRT2, rel=1e-9)  # the argument is right
    exact_gelu = lambda z: z * 0.5 * (1.0 + special.erf(z / math.sqrt(2.0)))  # noqa: E731
    # GELU_GAIN is stored to 8 significant digits.
    assert inits.GAINS["gelu"] == pytest.approx(gain(exact_gelu), rel=1e-7)


def test_fans_need_a_kernel():
    with pytest.raises(ValueError, match="rank >= 2"):
        inits.fans((7,))


# ------------------------------------------------------------------- the models


def build(model_cfg, make):
    cfg = config.load(None, ["mesh.num_devices=1", "mesh.data=1"])
    mesh = mesh_lib.build_mesh(cfg.mesh)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_lib.rules_tuple(cfg.mesh.rules)):
        return make(model_cfg)


def kernel(module) -> np.ndarray:
    return np.asarray(module.kernel.get_value(), dtype=np.float64).ravel()


GPT_SIZE = ["model.n_layers=3", "model.d_model=128", "model.n_heads=2", "model.seq_len=8"]


def test_gpt_default_is_gpt2_scaled_residual():
    cfg = config.load(None, GPT_SIZE).model
    model = build(cfg, lambda c: GPT(c, jnp.float32, nnx.Rngs(0)))
    residual = (0.02 / math.sqrt(2 * 3)) ** 2
    for block in model.blocks:
        check_moments(kernel(block.mlp.down), residual, uniform=False)
        check_moments(kernel(block.attn.out), residual, uniform=False)
        check_moments(kernel(block.mlp.up), 0.02**2, uniform=False)
    check_moments(kernel(model.head), 0.02**2, uniform=False)


def test_gpt_xavier_uniform():
    cfg = config.load(None, [*GPT_SIZE, "model.init=xavier_uniform"]).model
    model = build(cfg, lambda c: GPT(c, jnp.float32, nnx.Rngs(0)))
    d = 128
    mlp = model.blocks[1].mlp
    check_moments(kernel(mlp.up), 2.0 / (d + 4 * d), uniform=True)
    check_moments(kernel(mlp.down), 2.0 / (4 * d + d), uniform=True)  # no residual scaling
    # The attention kernel [d, heads, head_dim] is a d x d matrix to its initialiser.
    check_moments(kernel(model.blocks[0].attn.query), 2.0 / (d + d), uniform=True)
    # Embeddings are lookups and keep normal 0.02.
    embedding = np.asarray(model.token_embed.embedding.get_value(), np.float64).ravel()
    check_moments(embedding, 0.02**2, uniform=False)


def test_image_mlp_kaiming_normal_fan_out_with_gelu_gain():
    overrides = ["model.kind=mlp", "model.hidden=256", "model.n_layers=2", "model.image_size=16"]
    cfg = config.load(
        None,
        [
            *overrides,
            "model.init=kaiming_normal",
            "model.init_mode=fan_out",
            "model.init_gain=gelu",
        ],
    ).model
    model = build(cfg, lambda c: vision.build(c, 1, jnp.float32, nnx.Rngs(0)))
    gelu_gain_squared = 1.0 / 0.4252214826  # E[gelu(z)^2] by quadrature (test_gains)
    check_moments(kernel(model.layers[0]), gelu_gain_squared / 256, uniform=False)
    check_moments(kernel(model.layers[1]), gelu_gain_squared / 256, uniform=False)


@pytest.mark.parametrize("key", ["init", "init_mode", "init_gain"])
def test_bad_init_values_name_the_key(key):
    with pytest.raises(ConfigError, match=f"model.{key} must be one of"):
        config.load(None, [f"model.{key}=bogus"])
