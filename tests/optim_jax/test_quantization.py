"""Low-precision optimizer state (optim_jax/quantization.py).

What is proved here:

* the dynamic code books have the structure Dettmers et al. describe (256 sorted codes, 0 and 1
  exact, 2^(b-1-k) equal bins of [0.1, 1] x 10^-k per decade k), checked against counts worked
  out from that description rather than from the code;
* a quantise / dequantise round trip is within half the widest gap of the code book times the
  block's absolute maximum, every block's largest value comes back exactly, and the codes are
  the nearest ones (a float64 NumPy search over the book);
* blocks run along the last axis (padding the last block), codes keep the tensor's shape and,
  under ``jax.jit`` on a mesh, its sharding;
* bfloat16 moments are rounded stochastically: each value goes to a neighbour with the right odds,
  and a second moment follows its float32 counterpart where rounding to nearest stalls;
* every optimizer with a moment takes ``moment_dtype``: state bytes per parameter (AdamW int8 at
  most 2.1, bfloat16 4), a jitted training run with int8 or bfloat16 moments tracks the float32
  run, and bad values are errors naming the argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optim_jax
from optim_jax import base, quantization, transforms

# ----------------------------------------------------------------------------- the code books


@pytest.mark.parametrize("signed", [True, False])
def test_code_book_structure(signed):
    book = quantization.dynamic_code_book(signed).astype(np.float64)
    assert book.shape == (256,) and np.all(np.diff(book) > 0)
    assert 0.0 in book and book[-1] == 1.0
    # After the sign bit (signed only), k zero bits then the indicator bit leave 6 - k
    # (signed) or 7 - k (unsigned) fraction bits for decade k = 0..6: that many equal bins.
    fraction_bits = 6 if signed else 7
    positive = book[(book > 0) & (book < 1)]
    for k in range(7):
        decade = positive[(positive > 0.1 * 10.0**-k) & (positive < 10.0**-k)]
        assert decade.size == 2 ** (fraction_bits - k), k
        width = 0.9 * 10.0**-k / decade.size
        np.testing.assert_allclose(
            decade, 10.0**-k * 0.1 + width * (np.arange(decade.size) + 0.5), rtol=1e-6
        )
    if signed:
        # Symmetric but for the ends: -1 is a code, so that a block led by a negative value
        # is stored exactly, and the smallest negative magnitude gave up its place for it.
        assert book[0] == -1.0
        np.testing.assert_array_equal(book[book < 0][1:], -positive[::-1][:-1])
    else:
        assert book[0] == 0.0


def widest_half_gap(signed: bool) -> float:
    """Half the largest gap between neighbouring codes: the top decade's bin width over 2,
    0.9 / 2^(fraction bits + 1) (the gaps at decade edges and next to 1 are smaller)."""
    return 0.9 / 2 ** (7 if signed else 8)


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_is_the_search_over_the_midpoints(signed):
    """``nearest_code`` guesses the index from the book's decades and bins and corrects it;
    it must equal NumPy's binary search over the midpoints exactly: on every code, every
    midpoint and the floats on either side of it, the decade edges, zeros, +-1 and four
    million values spread over ten decades."""
    book = quantization.dynamic_code_book(signed)
    midpoints = (book[1:] + book[:-1]) / 2
    edges = np.float32(10.0) ** -np.arange(1, 8, dtype=np.float32)
    rng = np.random.default_rng(0)
    parts = [
        book,
        midpoints,
        np.nextafter(midpoints, np.float32(2)),
        np.nextafter(midpoints, np.float32(-2)),
        edges,
        np.nextafter(edges, np.float32(1)),
        np.nextafter(edges, np.float32(0)),
        [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e-45],
        rng.uniform(-1, 1, 2_000_000),
        np.sign(rng.standard_normal(2_000_000)) * 10.0 ** rng.uniform(-10, 0, 2_000_000),
    ]
    y = np.concatenate([np.asarray(part, np.float32) for part in parts])
    y = np.clip(y if signed else np.abs(y), -1, 1)
    codes = jax.jit(quantization.nearest_code, static_argnums=1)(y, signed)
    np.testing.assert_array_equal(np.asarray(codes), np.searchsorted(midpoints, y, side="left"))


# ------------------------------------------------------------------------------ round trips


# (shape, block, the rows blocks run along): the last axis, or the last axes merged until a
# row holds a block (a 64-wide last axis joins the 5 before it; 8 x 4 x 16 merges entirely).
LAYOUTS = [
    ((4, 1000), 256, (4, 1000)),
    ((3, 5, 64), 256, (3, 320)),
    ((8, 4, 16), 256, (512,)),
    ((4096,), 2048, (4096,)),
]


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(("shape", "block", "rows"), LAYOUTS)
def test_round_trip_error_is_bounded_and_codes_are_nearest(signed, shape, block, rows):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-8, 2, shape))  # many magnitudes
    if not signed:
        x = np.abs(x)
    x[0, ...] = 0.0  # an all-zero block
    q = quantization.quantize(jnp.asarray(x, jnp.float32), block=block, signed=signed)
    assert q.codes.shape == shape and q.codes.dtype == jnp.uint8
    blocks = -(-rows[-1] // block)
    assert q.absmax.shape == (*rows[:-1], blocks)
    back = np.asarray(quantization.dequantize(q), np.float64)

    x32 = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    pad = blocks * block - rows[-1]
    padded = np.pad(np.abs(x32).reshape(rows), [(0, 0)] * (len(rows) - 1) + [(0, pad)])
    absmax = padded.reshape(*rows[:-1], blocks, block).max(-1)
    np.testing.assert_array_equal(np.asarray(q.absmax), absmax.astype(np.float32))
    per_value_max = np.repeat(absmax, block, axis=-1)[..., : rows[-1]].reshape(shape)
    # Bound: half the widest code gap x the block maximum, plus float32 rounding of the
    # division and the product (a few ulps of the maximum).
    bound = (widest_half_gap(signed) + 4e-7) * per_value_max
    assert np.all(np.abs(back - x32) <= bound)
    assert np.all(back[x32 == 0] == 0)
    # The largest magnitude of each block is stored exactly (code 1.0 or -1.0 x absmax).
    is_max = (np.abs(x32) == per_value_max) & (per_value_max > 0)
    assert signed or np.all(x32[is_max] > 0)
    np.testing.assert_array_equal(back[is_max], x32[is_max])
    # Nearest code, searched in float64 over the whole book.
    book = quantization.dynamic_code_book(signed).astype(np.float64)
    normalised = np.where(per_value_max > 0, x32 / np.where(per_value_max > 0, per_value_max, 1), 0)
    distance = np.abs(normalised[..., None] - book)
    best = distance.min(-1)
    chosen = np.take_along_axis(distance, np.asarray(q.codes)[..., None].astype(int), -1)[..., 0]
    assert np.all(chosen <= best + 1e-6)  # ties and float32 rounding of x / absmax aside


def test_scalars_are_refused_and_small_tensors_stay_float32():
    with pytest.raises(ValueError, match="at least one dimension"):
        quantization.quantize(jnp.float32(1.0))
    fmt = quantization.MomentFormat("int8", block=256, min_size=4096)
    assert quantization.init(jnp.zeros((63, 64)), fmt, signed=True).dtype == jnp.float32
    assert isinstance(
        quantization.init(jnp.zeros((64, 64)), fmt, signed=True), quantization.QuantizedArray
    )
    assert quantization.init(jnp.zeros(()), fmt, signed=False).shape == ()


@pytest.mark.parametrize("bad", ["int4", "fp8", 8, quantization.MomentFormat])
def test_bad_moment_dtype_names_the_argument(bad):
    with pytest.raises(ValueError, match="moment_dtype"):
        optim_jax.adamw(1e-3, moment_dtype=bad).init({"w": jnp.zeros((4, 4))})


def test_bad_block_is_an_error():
    with pytest.raises(ValueError, match="block"):
        quantization.MomentFormat("int8", block=1)


# ------------------------------------------------------------------------ in the optimizers


def transformer_like(key) -> dict:
    """A few big matrices and some small vectors, as in a transformer block."""
    k = jax.random.split(key, 4)
    return {
        "embed": jax.random.normal(k[0], (512, 256)) * 0.02,
        "attn": jax.random.normal(k[1], (256, 768)) * 0.02,
        "mlp": jax.random.normal(k[2], (256, 1024)) * 0.02,
        "norm": jnp.ones((256,)),
        "bias": jnp.zeros((1024,)),
    }


def state_bytes_per_param(tx, params) -> float:
    state = jax.eval_shape(tx.init, params)  # shapes and dtypes only: nothing allocated
    n = sum(x.size for x in jax.tree.leaves(params))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / n


def test_adamw_state_bytes_per_parameter():
    params = jax.eval_shape(transformer_like, jax.random.key(0))
    assert state_bytes_per_param(optim_jax.adamw(1e-3), params) == pytest.approx(8, abs=1e-3)
    assert state_bytes_per_param(optim_jax.adamw(1e-3, moment_dtype="bfloat16"), params) == (
        pytest.approx(4, abs=1e-3)
    )
    int8 = state_bytes_per_param(optim_jax.adamw(1e-3, moment_dtype="int8"), params)
    assert int8 <= 2.1, int8  # 2 x (1 + 4/256) for the matrices, 8 for the few small vectors


def sophia_fed_noisy_hessian(md: quantization.MomentDtype) -> optax.GradientTransformation:
    """Sophia whose update gets, on every step, a Hutchinson-like estimate of the diagonal of
    :func:`regression_losses`' Hessian: its expected value 2 E[x^2] / 256 = 1/128 for every
    coordinate, times 1 + N(0, 1) noise (negative about 16% of the time, as a Hutchinson
    estimate can be), drawn from the update count so that every moment_dtype sees the same."""
    tx = optim_jax.sophia(2e-2, gamma=0.05, weight_decay=1e-2, update_interval=2, moment_dtype=md)

    def update(grads, state, params=None):
        count = base.find_state(state, transforms.SophiaState).count
        key = jax.random.fold_in(jax.random.key(7), count)
        leaves, treedef = jax.tree.flatten(grads)
        keys = jax.random.split(key, len(leaves))
        noise = [jax.random.normal(k, g.shape) for k, g in zip(keys, leaves, strict=True)]
        noisy = [(1 + z) / 128 for z in noise]
        return tx.update(grads, state, params, hessian_diag=treedef.unflatten(noisy))

    return optax.GradientTransformation(tx.init, update)


OPTIMIZERS = {
    "adamw": lambda md: optim_jax.adamw(3e-3, weight_decay=1e-2, moment_dtype=md),
    "adam": lambda md: optim_jax.adam(3e-3, moment_dtype=md),
    "adam_amsgrad": lambda md: optim_jax.adam(3e-3, moment_dtype=md, amsgrad=True),
    "lamb": lambda md: optim_jax.lamb(3e-2, moment_dtype=md),
    "lion": lambda md: optim_jax.lion(2e-3, moment_dtype=md),
    "sgd_momentum": lambda md: optim_jax.sgd(0.1, momentum=0.9, nesterov=True, moment_dtype=md),
    "lars": lambda md: optim_jax.lars(5.0, moment_dtype=md),
    "rmsprop": lambda md: optim_jax.rmsprop(1e-3, momentum=0.5, centered=True, moment_dtype=md),
    "adagrad": lambda md: optim_jax.adagrad(0.3, initial_accumulator_value=0.1, moment_dtype=md),
    # The 64 x 256 weight is factored here: int8 reaches its first moment only ...
    "adafactor": lambda md: optim_jax.adafactor(
        3e-2, relative_step=False, scale_parameter=False, b1=0.9, moment_dtype=md
    ),
    # ... and here (Optax's factoring threshold, 128 > 64) its full second moment too.
    "adafactor_unfactored": lambda md: optim_jax.adafactor(
        3e-2,
        relative_step=False,
        scale_parameter=False,
        b1=0.9,
        min_dim_size_to_factor=128,
        moment_dtype=md,
    ),
    "sophia": sophia_fed_noisy_hessian,
}


def regression_losses(tx, steps: int = 60) -> np.ndarray:
    """A linear least-squares fit of 64 x 256 weights (16384 values: quantised) from noisy
    targets, jitted with the state donated; the loss after every step."""
    key_w, key_x, key_n = jax.random.split(jax.random.key(1), 3)
    true_w = jax.random.normal(key_w, (64, 256)) / 8
    x = jax.random.normal(key_x, (128, 64))
    y = x @ true_w + 0.01 * jax.random.normal(key_n, (128, 256))
    params = {"w": jnp.zeros((64, 256)), "b": jnp.zeros((256,))}

    def loss_fn(p):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    state = tx.init(params)
    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return np.asarray(losses)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_low_precision_moments_track_the_float32_run(name):
    """With bfloat16 or int8 moments the loss stays within 5% of the starting loss of the
    float32 run at every step, and halves as that run does. (Measured: at most 2.5%, Lion's
    sign being the most sensitive; Adam 0.2%.) Closer agreement cannot be asked of a run:
    a per-step perturbation of the moments, < 0.7% of a block's maximum for int8, moves the
    trajectory, and the runs drift apart as the loss flattens."""
    make = OPTIMIZERS[name]
    reference = regression_losses(make(None))
    assert reference[-1] < 0.5 * reference[0]
    for moment_dtype in ("bfloat16", "int8"):
        losses = regression_losses(make(moment_dtype))
        assert np.all(np.isfinite(losses)), moment_dtype
        assert np.max(np.abs(losses - reference)) <= 0.05 * reference[0], moment_dtype
        assert losses[-1] < 0.5 * losses[0], moment_dtype


@pytest.mark.parametrize(
    ("shape", "spec"),
    [((256, 512), P("fsdp", "tensor")), ((256, 4, 32), P("fsdp", "tensor", None))],
    ids=["rows", "merged_rows"],  # blocks along the last axis / over heads x head_dim
)
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_int8_moments_are_sharded_like_their_parameters(shape, spec, axis_type):
    """The codes (the bulk of the state) keep the parameter's sharding, also when blocks run
    over merged axes, on meshes with Auto and with Explicit axes (where a gather from the
    code book must be given its sharding); the block maxima keep theirs from init on; the
    update comes out sharded like the parameter and equals the one computed on one device."""
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(axis_type,) * 2)
    sharding = NamedSharding(mesh, spec)
    values = jax.random.normal(jax.random.key(0), shape)
    params = {"w": jax.device_put(values, sharding)}
    grads = {"w": jax.device_put(values * 0.5 + 0.1, sharding)}
    tx = optim_jax.adamw(1e-3, moment_dtype="int8")
    with jax.set_mesh(mesh):
        state = jax.jit(tx.init)(params)
        assert state[0].mu["w"].codes.sharding.is_equivalent_to(sharding, len(shape))
        absmax_sharding = state[0].nu["w"].absmax.sharding
        updates, state = jax.jit(tx.update)(grads, state, params)
    assert state[0].nu["w"].codes.sharding.is_equivalent_to(sharding, len(shape))
    absmax = state[0].nu["w"].absmax
    assert absmax.sharding.is_equivalent_to(absmax_sharding, absmax.ndim), absmax.sharding
    assert updates["w"].sharding.is_equivalent_to(sharding, len(shape))
    local = {"w": values}
    expected, _ = tx.update({"w": values * 0.5 + 0.1}, tx.init(local), local)
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- Adafactor and Sophia in detail


def test_adafactor_stores_first_moment_and_unfactored_second_moment_in_moment_dtype():
    """int8 reaches the first moment and the full second moment of big unfactored leaves (the
    unsigned book: it is a mean of squares); the factored row and column statistics, and
    tensors under the 4096-value threshold, stay float32. bfloat16 reaches every such buffer."""
    params = {"w": jnp.zeros((64, 256)), "long": jnp.zeros((8192,)), "short": jnp.zeros((100,))}
    state = base.find_state(
        optim_jax.adafactor(b1=0.9, moment_dtype="int8").init(params), transforms.AdafactorState
    )
    assert state.v_row["w"].dtype == state.v_col["w"].dtype == jnp.float32
    assert state.v["w"] is None and state.v["short"].dtype == jnp.float32
    assert isinstance(state.v["long"], quantization.QuantizedArray) and not state.v["long"].signed
    for name in ("w", "long"):
        assert isinstance(state.mu[name], quantization.QuantizedArray) and state.mu[name].signed
    assert state.mu["short"].dtype == jnp.float32

    state = base.find_state(
        optim_jax.adafactor(b1=0.9, moment_dtype="bfloat16").init(params),
        transforms.AdafactorState,
    )
    assert state.v_row["w"].dtype == jnp.float32
    assert {state.v["long"].dtype, state.v["short"].dtype} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state.mu)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize(
    "make",
    [
        lambda: optim_jax.adafactor(b1=0.9, moment_dtype="int4"),
        lambda: optim_jax.sophia(1e-3, moment_dtype="fp8"),
    ],
)
def test_adafactor_and_sophia_refuse_a_bad_moment_dtype_when_built(make):
    with pytest.raises(ValueError, match="moment_dtype"):
        make()


def sophia_state_after(tx, params, estimates) -> transforms.SophiaState:
    """Sophia's state after one update per estimate, with a fixed gradient."""
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    state = tx.init(params)
    for estimate in estimates:
        _, state = tx.update(grads, state, params, hessian_diag=estimate)
    return base.find_state(state, transforms.SophiaState)


def test_sophia_int8_hessian_keeps_negative_estimates():
    """A Hutchinson estimate can be negative and Sophia does not clamp h, so h is quantised
    with the signed book: after one refresh, the int8 h is the float32 h to within the
    round-trip bound (half the widest code gap x the block maximum), signs included."""
    params = {"w": jnp.zeros((64, 256))}
    estimate = {"w": jax.random.normal(jax.random.key(3), (64, 256))}
    exact = sophia_state_after(optim_jax.sophia(1e-3), params, [estimate]).hessian["w"]
    q = sophia_state_after(optim_jax.sophia(1e-3, moment_dtype="int8"), params, [estimate])
    assert isinstance(q.hessian["w"], quantization.QuantizedArray) and q.hessian["w"].signed
    stored = np.asarray(quantization.dequantize(q.hessian["w"]))
    exact = np.asarray(exact)
    assert np.mean(exact < 0) > 0.4  # the check below covers both signs
    row_max = np.abs(exact).max(axis=-1, keepdims=True)  # one block of 256 per row
    # The round-trip bound, plus a few float32 ulps of the maximum for x / absmax * absmax.
    bound = (widest_half_gap(signed=True) + 4e-7) * row_max
    assert np.all(np.abs(stored - exact) <= bound)


def test_sophia_int8_hessian_is_kept_bit_for_bit_between_refreshes():
    """Off refresh steps h must not change. Writing the decoded int8 h back would shrink a
    block whose largest magnitude is negative (the signed book has +1 but not -1), on every
    step: the stored codes and block maxima must stay exactly as the refresh left them."""
    params = {"w": jnp.zeros((64, 256))}
    estimate = jax.random.normal(jax.random.key(4), (64, 256))
    estimate = {"w": estimate.at[:, 0].set(-10.0)}  # every block's largest value is negative
    tx = optim_jax.sophia(1e-3, update_interval=4, moment_dtype="int8")
    after_refresh = sophia_state_after(tx, params, [estimate]).hessian["w"]
    three_later = sophia_state_after(tx, params, [estimate] * 4).hessian["w"]  # steps 2-4: off
    np.testing.assert_array_equal(np.asarray(three_later.codes), np.asarray(after_refresh.codes))
    np.testing.assert_array_equal(np.asarray(three_later.absmax), np.asarray(after_refresh.absmax))
    # And the fifth update is a refresh again: h moves.
    refreshed = sophia_state_after(tx, params, [estimate] * 5).hessian["w"]
    assert not np.array_equal(np.asarray(refreshed.absmax), np.asarray(after_refresh.absmax))


# --- bfloat16 moments: stochastic rounding --------------------------------------------------


def _neighbours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bfloat16 values just below and above each float32 magnitude in ``x`` (> 0)."""
    bits = x.astype(np.float32).view(np.uint32)
    low = (bits & np.uint32(0xFFFF0000)).view(np.float32)
    high = ((bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
    return low, high


def test_stochastic_rounding_picks_a_neighbour_with_the_right_odds():
    """Each result is one of the two bfloat16 neighbours of the value, and over 4000 steps
    the upper one comes up with probability (x - low) / (high - low): within 0.03 of it for
    each of 64 values of both signs (4 standard deviations of a 4000-draw frequency are
    0.032 at p = 1/2). Values bfloat16 holds and zero, infinities and NaN stay as they are."""
    rng = np.random.default_rng(0)
    x = np.float32(2.0) ** rng.uniform(-20, 20, 64).astype(np.float32) * (1 + rng.random(64))
    x = x.astype(np.float32)
    low, high = _neighbours(x)
    want = (x.astype(np.float64) - low) / (high.astype(np.float64) - low)
    steps = jnp.arange(4000)
    draw = jax.jit(jax.vmap(quantization.round_stochastically, in_axes=(None, 0)))
    for sign in (1.0, -1.0):
        rounded = np.abs(np.asarray(draw(sign * x, steps), np.float32))
        assert np.all((rounded == low) | (rounded == high))
        np.testing.assert_allclose((rounded == high).mean(axis=0), want, atol=0.03)
    exact = np.asarray([0.0, -0.0, 1.0, -1.5, 2.0**-130, np.inf, -np.inf, np.nan], np.float32)
    kept = np.asarray(quantization.round_stochastically(exact, jnp.int32(5)), np.float32)
    np.testing.assert_array_equal(kept.view(np.uint32), exact.view(np.uint32))


def test_a_bfloat16_second_moment_follows_the_float32_one_on_average():
    """Adam's second moment, b2 = 0.999, gradients whose scale drops 10x after 300 steps:
    rounded to nearest, the stored moment cannot decay (a 0.1% step is below half of
    bfloat16's spacing) and stays where the drop found it, 3x the float32 one 1200 steps
    later; rounded stochastically its mean over 4096 coordinates ends within 2% of the
    float32 mean (measured 0.15%). int8 moments need no such rounding: a block's values are
    stored relative to its float32 maximum, which decays with them (within 5%; measured
    1.6%)."""
    n, steps = 4096, 1500
    scale = jnp.where(jnp.arange(steps) < 300, 1.0, 0.1)
    key = jax.random.key(3)

    def final_nu(moment_dtype):
        tx = transforms.scale_by_adam(moment_dtype=moment_dtype)

        def body(state, t):
            g = scale[t] * jax.random.normal(jax.random.fold_in(key, t), (n,))
            return tx.update(g, state)[1], None

        state, _ = jax.lax.scan(body, tx.init(jnp.zeros(n)), jnp.arange(steps))
        return np.asarray(quantization.read(state.nu), np.float64)

    reference = final_nu(None).mean()
    stochastic = final_nu("bfloat16").mean()
    nearest = final_nu(quantization.MomentFormat("bfloat16", rounding="nearest")).mean()
    assert abs(stochastic / reference - 1) < 0.02, (stochastic, reference)
    assert nearest > 2 * reference, (nearest, reference)
    assert abs(final_nu("int8").mean() / reference - 1) < 0.05


def test_stochastic_rounding_depends_on_the_step_and_the_format_chooses_it():
    """A moment that keeps its value is rounded afresh at each step (the step is mixed into
    the random bits); ``rounding="nearest"`` stores what ``astype(bfloat16)`` stores; a bad
    rounding names the argument."""
    value = jnp.full((1,), 1.0 + 0.5 * 2.0**-7, jnp.float32)  # halfway between neighbours
    draws = {float(quantization.round_stochastically(value, jnp.int32(s))[0]) for s in range(64)}
    assert draws == {1.0, 1.0 + 2.0**-7}
    like = jnp.zeros((1,), jnp.bfloat16)
    nearest = quantization.writer(quantization.MomentFormat("bfloat16", rounding="nearest"), None)
    assert nearest(value, like).dtype == jnp.bfloat16
    np.testing.assert_array_equal(nearest(value, like), value.astype(jnp.bfloat16))
    assert quantization.writer("float32", jnp.int32(0)) is quantization.write
    with pytest.raises(ValueError, match="rounding must be one of"):
        quantization.MomentFormat("bfloat16", rounding="up")
