"""The flat multi-tensor layout: what it stores, that optimizers on it match the per-leaf path,
that sharded buffers need no communication, and that per-tensor rules refuse it.
"""

from __future__ import annotations

import functools
import re
import resource

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optim_jax
from optim_jax import flat as flat_module
from optim_jax.flat import FlatParams, flat_layout
from tests import harness

COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "collective-permute", "reduce-scatter")


def _mesh(axis_type: AxisType = AxisType.Auto) -> jax.sharding.Mesh:
    return jax.make_mesh((2, 4), ("a", "b"), axis_types=(axis_type,) * 2)


def _placed(specs: dict, mesh: jax.sharding.Mesh, seed: int) -> dict:
    """Random normal arrays for ``{path: (shape, PartitionSpec[, dtype])}``, placed on ``mesh``."""
    key = jax.random.key(seed)

    def make(i, spec):
        shape, pspec, *dtype = spec
        x = jax.random.normal(jax.random.fold_in(key, i), shape, *dtype)
        return jax.device_put(x, NamedSharding(mesh, pspec))

    leaves, treedef = jax.tree.flatten(specs, is_leaf=lambda x: isinstance(x, tuple))
    return treedef.unflatten([make(i, s) for i, s in enumerate(leaves)])


def _sharded_tree(mesh: jax.sharding.Mesh, seed: int = 0) -> dict:
    """Leaves sharded every way the layout distinguishes, with two dtypes and a scalar."""
    specs = {
        "attn": {"kernel": ((8, 12), P("a", "b")), "bias": ((12,), P("b"))},
        "conv": ((4, 6, 8), P("a", None, "b")),
        "mlp": {"kernel": ((12, 16), P(None, ("a", "b"))), "bias": ((16,), P(("a", "b")))},
        "norm": ((5,), P()),
        "scale": ((), P()),
        "head": ((3, 8), P(None, "b"), jnp.bfloat16),
    }
    return _placed(specs, mesh, seed)


def _packed_sharded_tree() -> tuple[dict, flat_module.FlatLayout, FlatParams]:
    params = _sharded_tree(_mesh())
    layout = flat_layout(params)
    return params, layout, layout.pack(params)


def _assert_trees_equal(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_unsharded_leaves_form_one_buffer_per_dtype():
    params = {
        "w": jnp.arange(12.0).reshape(3, 4),
        "b": jnp.arange(3.0),
        "s": jnp.float32(7.0),
        "h": jnp.ones((2, 2), jnp.bfloat16),
    }
    layout = flat_layout(params)
    flat = layout.pack(params)
    # Each leaf starts at a multiple of CHUNK = 128 columns; the lone bfloat16 leaf, its
    # group's only tensor, needs no chunks and is held unpadded.
    assert {name: x.shape for name, x in flat.buffers.items()} == {
        "float32": (1, 3 * 128),
        "bfloat16": (1, 4),
    }
    # Leaves sit in tree order (sorted dict keys: b, s, w; each of its own shape), each
    # raveled row-major, then zeros.
    expected = np.zeros(3 * 128)
    expected[:3], expected[128], expected[256 : 256 + 12] = np.arange(3.0), 7.0, np.arange(12.0)
    np.testing.assert_array_equal(flat.buffers["float32"][0], expected)
    _assert_trees_equal(layout.unpack(flat), params)
    # Groups in order of first appearance: b (float32) comes before h (bfloat16).
    assert layout.describe().splitlines() == [
        "float32: (1, 384) from 3 leaves",
        "bfloat16: (1, 4) from 1 leaves",
    ]


def test_sharded_groups_and_round_trip():
    mesh = _mesh()
    params = _sharded_tree(mesh)
    layout = flat_layout(params)
    flat = layout.pack(params)
    shapes = {name: (x.shape, x.sharding.spec) for name, x in flat.buffers.items()}
    assert shapes == {
        # attn/kernel (a, b), conv (a, ., b), mlp/bias ((a, b)), mlp/kernel (., (a, b)): 8 rows,
        # each leaf's 12, 24, 2 and 24 values per row padded to one chunk of 128 columns;
        # attn/bias and head, alone in their groups, unpadded (3 and 6 values per row).
        "float32_a_b": ((8, 4 * 128), P(("a", "b"))),
        "float32_b": ((4, 3), P("b")),
        "float32": ((1, 2 * 128), P()),
        "bfloat16_b": ((4, 6), P("b")),
    }
    back = layout.unpack(flat)
    _assert_trees_equal(back, params)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        assert x.sharding.is_equivalent_to(y.sharding, x.ndim)


def test_each_row_holds_one_devices_shards():
    """Checked from the arrays' own shards, independently of the layout's index arithmetic."""
    params, layout, flat = _packed_sharded_tree()
    leaves = jax.tree.leaves(params)
    for g, group in enumerate(layout.groups):
        buffer_shards = {
            s.device: np.asarray(s.data) for s in flat.buffers[group.name].addressable_shards
        }
        for i in layout.members(g):
            slot = layout.slots[i]
            for shard in leaves[i].addressable_shards:
                row = buffer_shards[shard.device]
                assert row.shape[0] == 1  # one row per device (or one row, replicated)
                np.testing.assert_array_equal(
                    row[0, slot.offset : slot.offset + slot.columns],
                    np.asarray(shard.data).reshape(-1),
                )


def _hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_pack_unpack_and_update_need_no_communication():
    mesh = _mesh()
    params = _sharded_tree(mesh)
    layout = flat_layout(params)
    flat = layout.pack(params)
    tx = optim_jax.adamw(1e-3)
    state = tx.init(flat)
    step_hlo = _hlo(lambda p, s, g: tx.update(g, s, p), flat, state, flat)
    for text in (_hlo(layout.pack, params), _hlo(layout.unpack, flat), step_hlo):
        found = [c for c in COLLECTIVES if c in text]
        assert not found, found


ELEMENTWISE = {
    "sgd_momentum": lambda: optim_jax.sgd(0.1, momentum=0.9, nesterov=True),
    "adamw": lambda: optim_jax.adamw(1e-2, weight_decay=0.1),
    "adamw_bf16_moments": lambda: optim_jax.adamw(1e-2, moment_dtype="bfloat16"),
    "adamw_amsgrad": lambda: optim_jax.adamw(1e-2, amsgrad=True),
    "lion": lambda: optim_jax.lion(1e-3, weight_decay=0.1),
    "rmsprop": lambda: optim_jax.rmsprop(1e-2, momentum=0.9, centered=True),
    "sophia": lambda: optim_jax.sophia(1e-2, update_interval=1),
    "clip_by_value_sgd": lambda: optax.chain(optim_jax.clip_by_value(0.5), optim_jax.sgd(0.1)),
}


def _run(tx, params, grads_per_step, **extra_args):
    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params, **extra_args)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for grads in grads_per_step:
        params, state = step(params, state, grads)
    return params


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_elementwise_optimizers_are_bitwise_the_per_leaf_path(name):
    # Sophia takes a Hessian diagonal estimate; a fixed positive tree stands in for one.
    layout, per_leaf, flat = _both_paths(ELEMENTWISE[name], with_hessian=name == "sophia")
    assert isinstance(flat, FlatParams)
    _assert_trees_equal(layout.unpack(flat), per_leaf)
    _assert_padding_is_zero(flat)


def _both_paths(make, grad_scale: float = 1.0, with_hessian: bool = False):
    """``(layout, per-leaf params, flat params)`` after three jitted steps of ``make()``
    from the same sharded params and gradients, per leaf and on the flat layout."""
    mesh = _mesh()
    params = _sharded_tree(mesh, seed=0)
    grads = [jax.tree.map(lambda g: grad_scale * g, _sharded_tree(mesh, seed=s)) for s in (1, 2, 3)]
    layout = flat_layout(params)
    hessian = jax.tree.map(jnp.square, grads[0]) if with_hessian else None
    per_leaf = _run(make(), params, grads, **_hessian_args(hessian))
    flat_hessian = None if hessian is None else layout.pack(hessian)
    flat = _run(
        make(), layout.pack(params), [layout.pack(g) for g in grads], **_hessian_args(flat_hessian)
    )
    return layout, per_leaf, flat


def _hessian_args(hessian) -> dict:
    return {} if hessian is None else {"hessian_diag": hessian}


def _assert_padding_is_zero(flat: FlatParams) -> None:
    """The zeros between leaves stay zeros: unpacking ignores them, norms must not see them."""
    layout = flat.layout
    for g, group in enumerate(layout.groups):
        used = np.zeros(group.columns, bool)
        for i in layout.members(g):
            used[layout.slots[i].offset : layout.slots[i].offset + layout.slots[i].columns] = True
        assert not np.any(np.asarray(flat.buffers[group.name], np.float32)[:, ~used])


@pytest.mark.usefixtures("platform_branch")
def test_tensor_norms_are_each_leafs_norm():
    params, layout, flat = _packed_sharded_tree()
    leaves = jax.tree.leaves(params)
    for g, group in enumerate(layout.groups):
        buffer = flat.buffers[group.name]
        norms = np.asarray(jax.jit(layout.tensor_norms, static_argnums=0)(group.name, buffer))
        assert norms.shape == (1, group.columns)
        for i in layout.members(g):
            slot = layout.slots[i]
            first, last = slot.offset, slot.offset + slot.columns - 1
            want = np.linalg.norm(np.asarray(leaves[i], np.float64))
            # float32 sums of a few hundred squares: relative 1e-6.
            np.testing.assert_allclose(norms[0, first : last + 1], want, rtol=1e-6)


TRUST_RATIO = {
    "lamb": lambda: optim_jax.lamb(1e-2, weight_decay=0.1),
    "lars": lambda: optim_jax.lars(0.1, weight_decay=1e-3, trust_coefficient=0.01),
}


@pytest.mark.usefixtures("platform_branch")
@pytest.mark.parametrize("name", sorted(TRUST_RATIO))
def test_trust_ratio_rules_match_the_per_leaf_path(name):
    layout, per_leaf, flat = _both_paths(TRUST_RATIO[name])
    _assert_padding_is_zero(flat)
    # Each norm adds the same float32 squares in another order (chunks, then a segment sum):
    # a relative 1e-6 in the trust ratio, carried into the step, on parameters of O(1).
    for x, y in zip(jax.tree.leaves(layout.unpack(flat)), jax.tree.leaves(per_leaf), strict=True):
        np.testing.assert_allclose(
            np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-6, atol=1e-7
        )


@pytest.mark.usefixtures("platform_branch")
def test_global_norm_clipping_matches_to_float32_rounding():
    schedule = optim_jax.warmup_cosine_decay(0.0, 1e-2, 2, 10, 1e-4)

    def make():
        return optax.chain(optim_jax.clip_by_global_norm(1.0), optim_jax.adamw(schedule))

    # Gradients 10x larger, so that the clipping acts.
    layout, per_leaf, flat = _both_paths(make, grad_scale=10.0)
    flat = layout.unpack(flat)
    # The squared norm adds the same float32 terms in another order: relative 1e-6 covers the
    # rounding of a sum of ~1000 terms, and the clipped step carries it over unchanged.
    for x, y in zip(jax.tree.leaves(flat), jax.tree.leaves(per_leaf), strict=True):
        np.testing.assert_allclose(
            np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-6, atol=1e-7
        )


# decay_mask on _sharded_tree: the kernels, "conv" and "head" are decayed; biases, "norm" and
# "scale" are not. The explicit tree is a prefix of the parameters' tree ("attn" covers both).
PREFIX_MASK = {"attn": False, "conv": True, "mlp": {"kernel": True, "bias": False}}
PREFIX_MASK |= {"norm": False, "scale": False, "head": True}
MASKED = {
    "adamw_decay_mask": lambda: optim_jax.adamw(1e-2, weight_decay=0.5, mask=optim_jax.decay_mask),
    "adamw_prefix_mask": lambda: optim_jax.adamw(1e-2, weight_decay=0.5, mask=PREFIX_MASK),
    "lars_decay_mask": lambda: optim_jax.lars(0.1, weight_decay=1e-3, mask=optim_jax.decay_mask),
}


@pytest.mark.parametrize("name", sorted(MASKED))
def test_masked_rules_match_the_per_leaf_path(name):
    """Masks choose tensors by name and shape on the per-leaf view; each tensor then gets the
    per-leaf path's update: bit for bit for AdamW's decay; LARS's norms to float32 rounding."""
    layout, per_leaf, flat = _both_paths(MASKED[name])
    _assert_padding_is_zero(flat)
    got, want = jax.tree.leaves(layout.unpack(flat)), jax.tree.leaves(per_leaf)
    for x, y in zip(got, want, strict=True):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        if name.startswith("lars"):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
        else:  # the bits, so that even the sign of a zero must agree
            np.testing.assert_array_equal(x.view(np.uint32), y.view(np.uint32))
    if name == "adamw_decay_mask":  # the mask acted: without it the biases decay too
        unmasked = _both_paths(lambda: optim_jax.adamw(1e-2, weight_decay=0.5))[1]
        assert not np.array_equal(unmasked["attn"]["bias"], per_leaf["attn"]["bias"])


@pytest.mark.parametrize(
    "name, make",
    [
        ("adamw_decay_mask", MASKED["adamw_decay_mask"]),
        ("lamb", TRUST_RATIO["lamb"]),
    ],
)
def test_per_tensor_rules_add_no_memory_traffic_on_the_flat_layout(name, make):
    """Per-tensor values (masks, trust-ratio norms) are spread over the buffers in their own
    ``(shards, columns)`` shape, so XLA updates the donated buffers in place, and masked weight
    decay reads the incoming update once. Before either, on the optimizer benchmark's 51-leaf
    tree at 4M parameters, the flat step moved 77 bytes per parameter for LAMB (a copy of the
    parameters at the end) against 60 per leaf, and AdamW with a decay mask 57 against 40 (a
    copy, and Adam's direction written out because ``where(mask, u + wd p, u)`` reads it
    twice). Here both layouts of a small transformer-like tree; measured with the fixes: AdamW
    1.017 times the per-leaf bytes (the per-chunk index and value arrays), LAMB 1.05 (on CPU
    its chunk sums of squares also write an eighth of each reduced buffer between their
    pairwise steps); before them 1.42 and 1.28."""
    width = 256
    shapes = {"embed": (512, width), "norm": (width,), "head_bias": (width,)}
    shapes |= {f"layer{i}/{w}": (width, width) for i in range(4) for w in ("q", "k", "v", "o")}
    shapes |= {f"layer{i}/bias": (width,) for i in range(4)}
    params = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}
    layout = flat_layout(params)
    flat = jax.eval_shape(layout.pack, params)
    per_leaf_bytes = harness.step_bytes(make(), params)
    flat_bytes = harness.step_bytes(make(), flat)
    assert flat_bytes <= 1.1 * per_leaf_bytes, (name, flat_bytes / per_leaf_bytes)


def test_masked_refuses_state_held_per_parameter():
    params, layout, flat = _packed_sharded_tree()
    with pytest.raises(ValueError, match="parameter-shaped state"):
        flat_module.masked(optim_jax.adam(1e-3), optim_jax.decay_mask).init(flat)


def test_unflatten_and_flatten_like_round_trip_a_state():
    params, layout, flat = _packed_sharded_tree()
    tx = optim_jax.adamw(1e-3, mask=optim_jax.decay_mask)
    state = {"params": flat, "opt": tx.init(flat), "step": jnp.int32(3)}
    per_leaf = flat_module.unflatten(state)
    _assert_trees_equal(per_leaf["params"], params)
    assert jax.tree.structure(per_leaf["opt"]) == jax.tree.structure(tx.init(params))
    _assert_trees_equal(flat_module.flatten_like(state, per_leaf), state)
    # Abstract: the per-leaf view keeps each leaf's shape, dtype and sharding.
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    view = flat_module.unflatten(abstract)["params"]
    for x, y in zip(jax.tree.leaves(view), jax.tree.leaves(params), strict=True):
        assert (x.shape, x.dtype, x.sharding) == (y.shape, y.dtype, y.sharding)


def test_gradient_through_unpack_arrives_flat():
    mesh = _mesh()
    params = _sharded_tree(mesh)
    layout = flat_layout(params)
    weights = _sharded_tree(mesh, seed=5)

    def loss(tree):
        terms = jax.tree.map(
            lambda p, w: jnp.sum(jnp.sin(p.astype(jnp.float32)) * w), tree, weights
        )
        return sum(jax.tree.leaves(terms))

    flat_grads = jax.jit(jax.grad(lambda f: loss(layout.unpack(f))))(layout.pack(params))
    assert isinstance(flat_grads, FlatParams)
    _assert_trees_equal(flat_grads, layout.pack(jax.grad(loss)(params)))
    for group in layout.groups:
        assert flat_grads.buffers[group.name].sharding.is_equivalent_to(group.sharding, 2)


def _fusions(leaves: int, make) -> int:
    params = {f"layer_{i:04d}": jax.ShapeDtypeStruct((16, 8), jnp.float32) for i in range(leaves)}
    layout = flat_layout(params)
    flat = jax.eval_shape(layout.pack, params)
    tx = make()
    state = jax.eval_shape(tx.init, flat)
    text = jax.jit(lambda p, s, g: tx.update(g, s, p)).lower(flat, state, flat).compile().as_text()
    return len(re.findall(r" fusion\(", text))


@pytest.mark.parametrize(
    "make", [ELEMENTWISE["adamw"], TRUST_RATIO["lamb"], lambda: optim_jax.adafactor(b1=0.9)]
)
def test_the_compiled_update_does_not_grow_with_the_leaf_count(make):
    """What keeps compile time flat: the program for 400 leaves has hardly more kernels than
    the one for 10 (XLA fuses small arrays a little differently by size: the flat Adafactor
    has 13 kernels at 10 leaves, 18 or 19 from 50 to 2000), where the per-leaf programs have
    a few kernels per leaf, over a thousand at 400 leaves. Adafactor sees the leaves of one
    shape as one stacked array (one run)."""
    assert 0 < _fusions(400, make) <= _fusions(10, make) + 10


@pytest.mark.parametrize(
    "name, make",
    [
        ("int8 moments", lambda p: optim_jax.adafactor(1e-2, moment_dtype="int8").init(p)),
        ("decay_mask", optim_jax.decay_mask),  # called on FlatParams, not given as a mask
        ("int8 moments", lambda p: optim_jax.adamw(1e-3, moment_dtype="int8").init(p)),
        ("int8 moments", lambda p: optim_jax.adagrad(1e-3, moment_dtype="int8").init(p)),
        ("param_groups", lambda p: optim_jax.param_groups({"x": optim_jax.sgd(0.1)}, "x").init(p)),
        (
            "layerwise_lr_decay",
            lambda p: optim_jax.layerwise_lr_decay(0.5, ["float32"]).init(p),
        ),
        (
            "adaptive_grad_clip",
            lambda p: optim_jax.adaptive_grad_clip(0.1).update(p, optax.EmptyState(), p),
        ),
    ],
)
def test_per_tensor_rules_refuse_flat_params(name, make):
    layout = flat_layout({"w": jnp.ones((4, 4)), "b": jnp.ones(4)})
    with pytest.raises(ValueError, match=re.escape(name) + r" cannot run on the flat"):
        make(layout.pack({"w": jnp.ones((4, 4)), "b": jnp.ones(4)}))


def test_bad_layouts_name_the_parameter():
    mesh = _mesh()
    # JAX itself refuses to place such an array, but an abstract one can carry the sharding.
    uneven = {
        "emb": jax.ShapeDtypeStruct((6, 4), jnp.float32, sharding=NamedSharding(mesh, P("b")))
    }
    with pytest.raises(ValueError, match=r"dimension 0 of parameter 'emb' \(size 6\)"):
        flat_layout(uneven)
    with pytest.raises(ValueError, match=r"parameter 'step' has dtype int32"):
        flat_layout({"step": jnp.zeros((), jnp.int32)})
    with pytest.raises(ValueError, match="no leaves"):
        flat_layout({})
    explicit = _mesh(AxisType.Explicit)
    with pytest.raises(ValueError, match="parameter 'w' lives on a mesh with non-Auto axis"):
        flat_layout({"w": jax.device_put(jnp.ones((8, 4)), NamedSharding(explicit, P("a")))})
    layout = flat_layout({"w": jnp.ones(3)})
    other = flat_layout({"w": jnp.ones(4)}).pack({"w": jnp.ones(4)})
    with pytest.raises(ValueError, match="packed with this layout"):
        layout.unpack(other)


def test_flat_params_checkpoint_round_trip(tmp_path):
    mesh = _mesh()
    params = _sharded_tree(mesh)
    layout = flat_layout(params)
    flat = layout.pack(params)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "flat", flat)
        checkpointer.wait_until_finished()
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), flat
        )
        restored = checkpointer.restore(tmp_path / "flat", target)
    assert isinstance(restored, FlatParams)
    _assert_trees_equal(layout.unpack(restored), params)


def _layered_tree(mesh: jax.sharding.Mesh, seed: int) -> dict:
    """Three "layers" of same-shaped leaves (runs of 3 and of 6 on the layout), a rank-3
    leaf factored over its last two axes with one of them sharded, leaves of one shape but
    two shardings, a scalar and a bfloat16 matrix."""
    specs = {
        f"layer{i}": {"kernel": ((8, 12), P("a", "b")), "bias": ((12,), P("b"))} for i in range(3)
    }
    for i in range(3):
        specs[f"layer{i}"]["norm"] = ((12,), P("b"))
    specs |= {
        "conv": ((4, 6, 8), P("a", None, "b")),
        "embed": ((8, 12), P(None, "b")),
        "scale": ((), P()),
        "head": ((3, 8), P(None, "b"), jnp.bfloat16),
    }
    return _placed(specs, mesh, seed)


@pytest.mark.parametrize("by_shape", [False, True], ids=["by_dtype", "by_shape"])
@pytest.mark.parametrize("make", [_sharded_tree, _layered_tree])
def test_runs_stack_each_kind_of_leaf_and_assemble_the_buffers_again(make, by_shape):
    """Every leaf is in exactly one run of its group, a run's stack holds its leaves in order
    (each as ``unpack`` gives it, with its sharding), and the buffers assembled from the
    stacks are the packed ones, zeros between leaves included."""
    params = make(_mesh(), 0)
    layout = flat_layout(params, by_shape=by_shape)
    flat = layout.pack(params)
    leaves = jax.tree.leaves(params)
    for g, group in enumerate(layout.groups):
        runs = layout.runs(g)
        assert [i for run in runs for i in run] == layout.members(g)
        stacks = []
        for run in runs:
            assert len({(layout.slots[i].shape, layout.slots[i].grid) for i in run}) == 1
            stack = layout.stacked(run, flat.buffers[group.name])
            for j, i in enumerate(run):
                np.testing.assert_array_equal(np.asarray(stack[j]), np.asarray(leaves[i]))
            want = NamedSharding(_mesh(), P(None, *leaves[run[0]].sharding.spec))
            assert stack.sharding.is_equivalent_to(want, stack.ndim)
            stacks.append(stack)
        rebuilt = layout.from_stacked(g, stacks)
        assert rebuilt.dtype == group.dtype
        np.testing.assert_array_equal(np.asarray(rebuilt), np.asarray(flat.buffers[group.name]))


def _decay_biases_not_norms(params):
    """A mask that splits a run (the biases and norms share shape and sharding)."""
    return {
        name: ({k: k != "norm" for k in sub} if isinstance(sub, dict) else jnp.ndim(sub) >= 2)
        for name, sub in params.items()
    }


ADAFACTOR = {
    "relative_step": lambda: optim_jax.adafactor(),
    "lr_momentum_decay": lambda: optim_jax.adafactor(
        1e-2, b1=0.9, weight_decay=0.1, mask=_decay_biases_not_norms
    ),
    "some_unfactored": lambda: optim_jax.adafactor(min_dim_size_to_factor=7, clip_threshold=None),
    "bf16_moments": lambda: optim_jax.adafactor(1e-2, b1=0.9, moment_dtype="bfloat16"),
    "preconditioner_only": lambda: optax.chain(
        optim_jax.transforms.scale_by_factored_rms(),
        optim_jax.transforms.scale_by_learning_rate(1e-2),
    ),
}


@pytest.mark.parametrize("by_shape", [False, True], ids=["by_dtype", "by_shape"])
@pytest.mark.parametrize("name", sorted(ADAFACTOR))
def test_adafactor_on_the_flat_layout_matches_the_per_leaf_path(name, by_shape):
    """Runs of same-shaped leaves are stacked, so the factored statistics (and their
    cross-device sums where a factored axis is sharded), the update-clipping RMS and the
    parameter scale are computed per tensor as the per-leaf path does, reduced in another
    order: float32 rounding of means over at most a few hundred values, relative 1e-5 on
    O(1) parameters after three steps. The state comes back per leaf as the per-leaf path
    keeps it, and packs again. On either layout: one buffer per dtype and sharding, where
    a stack is a slice of its buffer, or one per kind of tensor (``by_shape``). The step's
    only collectives are all-reduces (sums of statistics over the devices that share a row
    or a column)."""
    mesh = _mesh()
    params = _layered_tree(mesh, seed=0)
    grads = [_layered_tree(mesh, seed=s) for s in (1, 2, 3)]
    layout = flat_layout(params, by_shape=by_shape)
    runs = [run for g in range(len(layout.groups)) for run in layout.runs(g)]
    assert sorted(map(len, runs)) == [1, 1, 1, 1, 3, 6]  # the biases and norms: one stack
    assert (len(layout.groups) == len(runs)) == by_shape

    def run(params, grads_per_step):
        tx = ADAFACTOR[name]()

        @jax.jit
        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        state = tx.init(params)
        text = step.lower(params, state, grads_per_step[0]).compile().as_text()
        for grads in grads_per_step:
            params, state = step(params, state, grads)
        return params, state, text

    per_leaf, per_leaf_state, _ = run(params, grads)
    flat, flat_state, text = run(layout.pack(params), [layout.pack(g) for g in grads])
    _assert_padding_is_zero(flat)
    # Stacking moves no data between devices: the statistics' sums are all-reduces.
    assert not [c for c in COLLECTIVES if c != "all-reduce" and c in text]
    got = flat_module.unflatten({"params": flat, "state": flat_state})
    want = {"params": per_leaf, "state": per_leaf_state}
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        rtol = 1e-2 if x.dtype == jnp.bfloat16 else 1e-5  # bf16: an ulp apart, 2**-8
        np.testing.assert_allclose(
            np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=1e-6
        )
    moved = [
        np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max()
        for a, b in zip(jax.tree.leaves(per_leaf), jax.tree.leaves(params), strict=True)
    ]
    assert min(moved) > 0  # every tensor took steps
    _assert_trees_equal(flat_module.flatten_like(flat_state, got["state"]), flat_state)


def test_adafactor_by_shape_moves_the_per_leaf_bytes():
    """With a buffer per kind of tensor, XLA reads each stack in place for its reductions:
    the flat step moves the per-leaf step's bytes (measured: 1.00 on this tree). On the
    shared buffer XLA:CPU copies each stack's slice out for its reduction kernels (2.1 times
    the bytes here; 60 against 28 B/param on the optimizer benchmark's 51-leaf tree)."""
    width = 128
    shapes = {"embed": (512, width), "norm": (width,)}
    shapes |= {f"layer{i}/{w}": (width, width) for i in range(4) for w in ("q", "o")}
    shapes |= {f"layer{i}/bias": (width,) for i in range(4)}
    params = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}
    tx = optim_jax.adafactor(1e-2)
    per_leaf = harness.step_bytes(tx, params)
    by_shape = flat_layout(params, by_shape=True)
    assert harness.step_bytes(tx, jax.eval_shape(by_shape.pack, params)) <= 1.05 * per_leaf
    shared = flat_layout(params)
    assert harness.step_bytes(tx, jax.eval_shape(shared.pack, params)) > 1.5 * per_leaf


def test_the_flat_adafactor_step_updates_the_buffers_in_place():
    """No parameter-sized temporary per step: counted as page faults (a fresh 16 MiB
    buffer maps 4096 pages). Two ways the flat step made one, both invisible in XLA's byte
    count: an RMS reduction reading a stack as a reshaped view of its buffer (XLA:CPU copied
    the buffer out for it: 32,770 faults a step on two 64 MiB stacks), and the weight decay
    read through that view in the kernel that writes the parameters (no longer in place).
    Measured with both fixed: 0 faults a step after the first calls."""
    shapes = {
        f"layer{i}/{w}": s for i in range(4) for w, s in (("in", (512, 2048)), ("out", (2048, 512)))
    }
    params = {k: jnp.full(v, 0.02, jnp.float32) for k, v in shapes.items()}
    layout = flat_layout(params, by_shape=True)
    tx = optim_jax.adafactor(1e-2, b1=0.9, weight_decay=0.1)
    flat, grads = layout.pack(params), layout.pack(jax.tree.map(lambda p: p * 0.5, params))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(flat)
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        flat, state = jax.block_until_ready(step(flat, state, grads))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert max(faults[3:]) < 1000, faults


def test_adafactor_flat_state_checkpoint_round_trip(tmp_path):
    """The stacked statistics (RunStacks) save and restore with orbax like any pytree."""
    params = _layered_tree(_mesh(), seed=0)
    flat = flat_layout(params).pack(params)
    tx = optim_jax.adafactor(1e-2, b1=0.9)
    state = tx.update(flat, tx.init(flat), flat)[1]
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
        checkpointer.wait_until_finished()
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        restored = checkpointer.restore(tmp_path / "state", target)
    _assert_trees_equal(restored, state)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
