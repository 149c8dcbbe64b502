"""optim_jax.stored_after (optim_jax/in_place.py): lower-precision moments kept in place on
XLA:CPU, without changing a bit of the step's results."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optim_jax
from optim_jax import flat_layout

SHAPES = {"kernel": (256, 512), "embed": (1000, 64), "bias": (512,), "scale": ()}

OPTIMIZERS = {
    "adamw": lambda dtype: optim_jax.adamw(1e-2, weight_decay=0.1, moment_dtype=dtype),
    "sgd": lambda dtype: optim_jax.sgd(0.1, momentum=0.9, nesterov=True, moment_dtype=dtype),
    "rmsprop": lambda dtype: optim_jax.rmsprop(
        1e-2, momentum=0.9, centered=True, moment_dtype=dtype
    ),
    "lion": lambda dtype: optim_jax.lion(1e-3, moment_dtype=dtype),
    "adafactor": lambda dtype: optim_jax.adafactor(1e-2, b1=0.9, moment_dtype=dtype),
    # Each group's moments hold optax.MaskedNode where the other group's parameters are.
    "groups": lambda dtype: optim_jax.param_groups(
        {"decay": {}, "no_decay": {"weight_decay": 0.0}},
        lambda params: {name: "decay" if p.ndim == 2 else "no_decay" for name, p in params.items()},
        optimizer=optim_jax.adamw,
        learning_rate=1e-2,
        moment_dtype=dtype,
    ),
    "clip_adamw": lambda dtype: optax.chain(
        optim_jax.clip_by_global_norm(1.0),
        optim_jax.adamw(optim_jax.warmup_cosine_decay(0.0, 1e-2, 2, 10), moment_dtype=dtype),
    ),
}


def _tree(seed: int, shapes: dict = SHAPES, dtype=jnp.float32) -> dict:
    key = jax.random.key(seed)
    return {
        name: jax.random.normal(jax.random.fold_in(key, i), shape, dtype)
        for i, (name, shape) in enumerate(shapes.items())
    }


def _step(tx, ordered: bool):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        if ordered:
            state = optim_jax.stored_after(state, params)
        return params, state

    return jax.jit(step, donate_argnums=(0, 1))


def _bits(tree) -> list[np.ndarray]:
    leaves = jax.tree.leaves(tree)
    return [np.asarray(x).view(f"u{np.dtype(x.dtype).itemsize}") for x in leaves]


def _assert_same_bits(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(_bits(a), _bits(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _random_grads(params: dict):
    """Step ``i``'s gradients: a fresh random tree in the parameters' shapes and dtype."""
    shapes = {k: v.shape for k, v in params.items()}
    dtype = jax.tree.leaves(params)[0].dtype
    return lambda i: _tree(100 + i, shapes, dtype)


def _run(tx, ordered: bool, params, grads_at=None, steps: int = 3):
    """``steps`` jitted steps from ``params``; ``grads_at(i)`` gives step i's gradients."""
    grads_at = grads_at or _random_grads(params)
    step = _step(tx, ordered)
    params = jax.tree.map(jnp.copy, params)
    state = tx.init(params)
    for i in range(steps):
        params, state = step(params, state, grads_at(i))
    return params, state


def _moment_copies(compiled_text: str, shapes) -> int:
    """Copies of parameter-shaped bfloat16 arrays in a compiled program."""
    dims = "|".join(",".join(map(str, s)) for s in shapes if s)
    return len(re.findall(rf"bf16\[({dims})\]\{{[0-9,]*\}} copy\(", compiled_text))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_ordered_step_computes_the_same_bits(name):
    """Three steps with and without stored_after: parameters and state bit for bit equal."""
    tx = OPTIMIZERS[name]("bfloat16")
    params = _tree(0)
    _assert_same_bits(_run(tx, True, params), _run(tx, False, params))


@pytest.mark.parametrize("name", ["adamw", "sgd", "rmsprop", "lion", "groups", "clip_adamw"])
def test_the_ordered_step_copies_no_moment(name):
    """XLA:CPU copies each bfloat16 moment that the parameter kernel recomputes from (the
    motivation: checked here so that an XLA that stops doing it shows up); ordered, none."""
    tx = OPTIMIZERS[name]("bfloat16")
    params = _tree(0)
    state = tx.init(params)
    shapes = [p.shape for p in params.values()]
    texts = {
        ordered: _step(tx, ordered).lower(params, state, params).compile().as_text()
        for ordered in (False, True)
    }
    assert _moment_copies(texts[False], shapes) > 0
    assert _moment_copies(texts[True], shapes) == 0


def test_stored_after_keeps_every_bit_of_the_moments():
    """-0.0, infinities and NaN in the moments survive, whatever the parameters hold."""
    specials = jnp.array([-0.0, 0.0, jnp.inf, -jnp.inf, jnp.nan, 1e-40, -3.5, 65504.0])
    moments = {"kernel": specials.astype(jnp.bfloat16), "bias": specials.astype(jnp.float16)}
    params = {"kernel": specials[::-1], "bias": -specials}
    ordered = jax.jit(optim_jax.stored_after)((moments, jnp.int32(3)), params)
    _assert_same_bits(ordered, (moments, jnp.int32(3)))


def test_float64_params_order_their_bfloat16_moments_and_leave_float32_ones():
    """With x64 on: bfloat16 moments of float64 parameters are ordered (64-bit parameter
    bits) and the steps keep every bit; float32 moments are left alone, since with float32
    gradients the update reads them as stored (ordering them made XLA recompute them, and
    the parameters differed by float32 rounding after three steps: checked)."""
    with jax.enable_x64(True):
        params = _tree(0, dtype=jnp.float64)
        for dtype, ordered in (("bfloat16", 2 * len(SHAPES)), ("float32", 0)):
            tx = optim_jax.adamw(1e-2, moment_dtype=dtype)
            jaxpr = str(jax.make_jaxpr(optim_jax.stored_after)(tx.init(params), params))
            assert jaxpr.count(" or ") == ordered, dtype
        tx = optim_jax.adamw(1e-2, moment_dtype="bfloat16")
        _assert_same_bits(_run(tx, True, params), _run(tx, False, params))


def test_elsewhere_stored_after_returns_the_state_as_it_is(platform_branch):
    """On GPU and TPU (``platform_branch`` elsewhere) the state comes back as it went in, no
    dependency traced; on CPU each bfloat16 moment gets one. Also checks that the fixture
    reaches the branch our modules take."""
    params = _tree(0)
    state = optim_jax.adamw(1e-2, moment_dtype="bfloat16").init(params)
    jaxpr = str(jax.make_jaxpr(optim_jax.stored_after)(state, params))
    assert jaxpr.count(" or ") == (2 * len(SHAPES) if platform_branch == "cpu" else 0)
    if platform_branch == "elsewhere":
        assert optim_jax.stored_after(state, params) is state


def test_stored_after_differentiates_as_the_identity():
    """Through stored_after a moment's derivative is 1 and the parameters' 0, as for the
    moment itself (forward and reverse mode, under jit): a program that differentiates
    through optimizer steps sees no difference."""
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
    moments = {"w": jnp.linspace(0.5, 2.0, 12, dtype=jnp.bfloat16).reshape(3, 4)}

    def loss(moments, params):
        ordered = optim_jax.stored_after(moments, params)["w"].astype(jnp.float32)
        return jnp.sum(ordered**2 * params["w"])

    def plain(moments, params):
        return jnp.sum(moments["w"].astype(jnp.float32) ** 2 * params["w"])

    for argnums in (0, 1):
        got = jax.jit(jax.grad(loss, argnums))(moments, params)
        want = jax.grad(plain, argnums)(moments, params)
        _assert_same_bits(got, want)
    tangent = {"w": jnp.ones((3, 4), jnp.bfloat16)}
    _, got = jax.jvp(lambda m: loss(m, params), (moments,), (tangent,))
    _, want = jax.jvp(lambda m: plain(m, params), (moments,), (tangent,))
    assert got == want


def test_stored_after_leaves_other_state_alone():
    """float32 moments (XLA:CPU already reads the stored new moment), int8 codes (their
    copies come from the quantiser, measured no faster ordered) and leaves that are not
    shaped like their parameter are passed through: no dependency is traced for them."""
    params = _tree(0)
    for dtype in (None, "int8"):
        tx = optim_jax.adamw(1e-2, moment_dtype=dtype)
        state = tx.init(params)
        jaxpr = jax.make_jaxpr(optim_jax.stored_after)(state, params)
        assert "bitcast_convert_type" not in str(jaxpr), dtype
    # bfloat16: one dependency per moment of a parameter (two moments x four leaves).
    state = optim_jax.adamw(1e-2, moment_dtype="bfloat16").init(params)
    jaxpr = str(jax.make_jaxpr(optim_jax.stored_after)(state, params))
    assert jaxpr.count(" or ") == 2 * len(SHAPES)


def test_stored_after_finds_the_moments_of_a_single_array_and_of_flat_params():
    """The moments are the subtrees shaped like ``params``: a lone array's, and the flat
    layout's buffers."""
    param = _tree(0)["kernel"]
    tx = optim_jax.adamw(1e-2, moment_dtype="bfloat16")
    jaxpr = str(jax.make_jaxpr(optim_jax.stored_after)(tx.init(param), param))
    assert jaxpr.count(" or ") == 2

    params = _tree(0)
    flat = flat_layout(params).pack(params)
    state = tx.init(flat)
    text = _step(tx, True).lower(flat, state, flat).compile().as_text()
    assert _moment_copies(text, [b.shape for b in jax.tree.leaves(flat)]) == 0
    grads = jax.tree.map(lambda b: b * 0.5 + 0.1, flat)
    _assert_same_bits(_run(tx, True, flat, lambda i: grads), _run(tx, False, flat, lambda i: grads))


def test_the_ordered_sharded_step_adds_no_collective():
    """On a 2 x 4 mesh the dependency is elementwise between arrays sharded alike: no
    communication is added, and no moment is copied."""
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    specs = {"kernel": P("data", "model"), "embed": P(None, "model"), "bias": P("model")}
    params = {
        name: jax.device_put(x, NamedSharding(mesh, specs.get(name, P())))
        for name, x in _tree(0).items()
    }
    tx = OPTIMIZERS["clip_adamw"]("bfloat16")
    state = tx.init(params)
    texts = {
        ordered: _step(tx, ordered).lower(params, state, params).compile().as_text()
        for ordered in (False, True)
    }
    collectives = ("all-reduce", "all-gather", "collective-permute", "all-to-all")
    for op in collectives:
        assert texts[True].count(f" {op}(") == texts[False].count(f" {op}("), op
    local_shapes = [x.sharding.shard_shape(x.shape) for x in params.values()]
    assert _moment_copies(texts[True], local_shapes) == 0
    _assert_same_bits(_run(tx, True, params), _run(tx, False, params))
