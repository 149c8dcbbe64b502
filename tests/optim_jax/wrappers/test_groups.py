"""Parameter groups, the weight-decay mask, layer-wise LR decay and freezing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optim_jax
from optim_jax import transforms
from tests import harness

torch = pytest.importorskip("torch")


# --------------------------------------------------------------------------- fixtures


class TinyModel(nnx.Module):
    """Embedding, two hidden layers with a norm each, final norm and head."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(11, 4, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 4, rngs=rngs)])
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)


def nnx_params():
    return nnx.state(TinyModel(nnx.Rngs(0)), nnx.Param)


def linen_params():
    """The layout Flax Linen produces for a small transformer block (plain nested dicts)."""
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return {
        "Embed_0": {"embedding": normal(11, 4)},
        "wpe": normal(8, 4),  # a bare positional table, GPT-2 style
        "attn": {
            "query": {"kernel": normal(4, 2, 2), "bias": normal(2, 2)},  # DenseGeneral
            "out": {"kernel": normal(2, 2, 4), "bias": normal(4)},
        },
        "LayerNorm_0": {"scale": normal(4), "bias": normal(4)},
        "Dense_0": {"kernel": normal(4, 3), "bias": normal(3)},
        "embed_out": {"kernel": normal(4, 11)},  # GPT-NeoX's untied head: decayed
    }


def flat(tree):
    """{path string: leaf} for a pytree."""
    return dict(
        zip(
            jax.tree.leaves(optim_jax.param_paths(tree)),
            jax.tree.leaves(tree),
            strict=True,
        )
    )


def ndim_labels(params):
    return jax.tree.map(lambda p: "matrix" if p.ndim >= 2 else "other", params)


def state_array_sizes(opt_state) -> int:
    """Number of floating-point entries in the state (buffers; the int32 step counts excluded)."""
    return sum(x.size for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating))


# --------------------------------------------------------------------------- paths and decay mask


def test_param_paths_of_nested_dicts_lists_and_nnx_state():
    tree = {"a": [jnp.zeros(2), {"b": jnp.zeros(3)}], "c": jnp.zeros(())}
    assert jax.tree.leaves(optim_jax.param_paths(tree)) == ["a/0", "a/1/b", "c"]
    paths = set(flat(nnx_params()))
    assert paths == {
        "embed/embedding",
        "layers/0/kernel",
        "layers/0/bias",
        "layers/1/kernel",
        "layers/1/bias",
        "norm/scale",
        "norm/bias",
        "head/kernel",
        "head/bias",
    }


def test_decay_mask_linen_layout():
    mask = flat(optim_jax.decay_mask(linen_params()))
    assert mask == {
        "Embed_0/embedding": False,
        "wpe": False,
        "attn/query/kernel": True,
        "attn/query/bias": False,  # 2-D, excluded by name
        "attn/out/kernel": True,
        "attn/out/bias": False,
        "LayerNorm_0/scale": False,
        "LayerNorm_0/bias": False,
        "Dense_0/kernel": True,
        "Dense_0/bias": False,
        "embed_out/kernel": True,
    }


def test_decay_mask_nnx_state():
    mask = optim_jax.decay_mask(nnx_params())
    assert isinstance(mask, nnx.State)
    decayed = {path for path, value in flat(mask).items() if value}
    assert decayed == {"layers/0/kernel", "layers/1/kernel", "head/kernel"}


def test_decay_mask_options():
    params = linen_params()
    custom = functools.partial(optim_jax.decay_mask, exclude=("query",), min_ndim=1)
    decayed = {path for path, value in flat(custom(params)).items() if value}
    # Names compared case-insensitively, whole components only.
    assert "attn/query/kernel" not in decayed and "attn/query/bias" not in decayed
    assert {"Embed_0/embedding", "LayerNorm_0/scale", "Dense_0/bias"} <= decayed
    upper = optim_jax.decay_mask({"EMBEDDING": jnp.zeros((3, 3)), "Kernel": jnp.zeros((3, 3))})
    assert upper == {"EMBEDDING": False, "Kernel": True}


def test_decay_mask_bad_input():
    with pytest.raises(TypeError, match="exclude"):
        optim_jax.decay_mask(linen_params(), exclude="bias")
    with pytest.raises(ValueError, match="min_ndim"):
        optim_jax.decay_mask(linen_params(), min_ndim=-1)


@pytest.mark.parametrize("make_params", [linen_params, nnx_params], ids=["linen", "nnx"])
def test_adamw_with_decay_mask_decays_only_the_right_leaves(make_params):
    """With zero gradients AdamW's update is exactly -lr * wd * p on decayed leaves, 0 elsewhere."""
    params = make_params()
    lr, wd = 0.1, 0.5
    tx = optim_jax.adamw(lr, weight_decay=wd, mask=optim_jax.decay_mask)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, state, params)
    mask, flat_params = flat(optim_jax.decay_mask(params)), flat(params)
    for path, u in flat(updates).items():
        p = flat_params[path]
        want = -lr * wd * np.asarray(p) if mask[path] else np.zeros_like(p)
        np.testing.assert_allclose(np.asarray(u), want, rtol=1e-6, err_msg=path)


def test_decay_mask_under_nnx_optimizer():
    model = TinyModel(nnx.Rngs(0))
    before = nnx.state(model, nnx.Param)
    before = jax.tree.map(lambda x: np.asarray(x), before)
    optimizer = nnx.Optimizer(
        model, optim_jax.adamw(0.1, weight_decay=0.5, mask=optim_jax.decay_mask), wrt=nnx.Param
    )
    grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    after = flat(nnx.state(model, nnx.Param))
    for path, old in flat(before).items():
        factor = 1 - 0.1 * 0.5 if path.endswith("kernel") else 1.0
        np.testing.assert_allclose(np.asarray(after[path]), old * factor, rtol=1e-6, err_msg=path)


# --------------------------------------------------------------------------- param groups


def test_param_groups_match_separate_optimizers():
    """Each group evolves exactly as its optimizer would on its own leaves."""
    params0, grads = harness.random_params(3), harness.random_grads(3, 6)
    groups = {"matrix": optim_jax.adamw(0.01, weight_decay=0.1), "other": optim_jax.sgd(0.1, 0.9)}
    ours = harness.run_ours(optim_jax.param_groups(groups, ndim_labels), params0, grads)
    labels = ndim_labels(jax.tree.map(np.asarray, params0))
    for label, tx in groups.items():
        keys = [k for k in params0 if labels[k] == label]
        alone = harness.run_ours(
            tx, {k: params0[k] for k in keys}, [{k: g[k] for k in keys} for g in grads]
        )
        harness.assert_trajectories_close(
            [{k: p[k] for k in keys} for p in ours], alone, 1e-14, label
        )


def test_param_group_options_match_torch_param_groups():
    """The torch form: per-group lr and weight decay over shared defaults."""
    params0, grads = harness.random_params(4), harness.random_grads(4, 10)
    labels = {k: "decay" if np.ndim(v) >= 2 else "no_decay" for k, v in params0.items()}
    tx = optim_jax.param_groups(
        {"decay": {}, "no_decay": {"weight_decay": 0.0, "learning_rate": 0.02}},
        labels,
        optimizer=optim_jax.adamw,
        learning_rate=0.01,
        weight_decay=0.1,
        b2=0.99,
    )
    ours = harness.run_ours(tx, params0, grads)

    def make_torch(tensors):
        names = list(params0)
        decay = [t for k, t in zip(names, tensors, strict=True) if labels[k] == "decay"]
        other = [t for k, t in zip(names, tensors, strict=True) if labels[k] == "no_decay"]
        return torch.optim.AdamW(
            [{"params": decay}, {"params": other, "weight_decay": 0.0, "lr": 0.02}],
            lr=0.01,
            weight_decay=0.1,
            betas=(0.9, 0.99),
        )

    harness.assert_trajectories_close(
        ours, harness.run_torch(make_torch, params0, grads), 1e-12, ""
    )


def test_param_groups_state_only_for_own_leaves_and_empty_groups():
    params = harness.random_params(0)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    n_matrix = sum(p.size for p in params.values() if p.ndim >= 2)
    n_other = sum(p.size for p in params.values() if p.ndim < 2)
    tx = optim_jax.param_groups(
        {
            "matrix": optim_jax.adam(0.1),  # two buffers
            "other": optim_jax.sgd(0.1, 0.9),  # one buffer
            "unused": optim_jax.adam(0.1),  # no parameter is labelled "unused": allowed
        },
        ndim_labels,
    )
    state = tx.init(params)
    assert state_array_sizes(state) == 2 * n_matrix + n_other
    assert state_array_sizes(state.inner_states["unused"]) == 0
    updates, _ = jax.jit(tx.update)(params, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_param_groups_label_prefix_and_frozen_group():
    params = {"encoder": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, "head": {"w": jnp.ones((2, 3))}}
    tx = optim_jax.param_groups(
        {"frozen": None, "train": optim_jax.sgd(1.0)}, {"encoder": "frozen", "head": "train"}
    )
    state = tx.init(params)
    updates, _ = tx.update(params, state, params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates["encoder"]))
    np.testing.assert_array_equal(updates["head"]["w"], -np.ones((2, 3)))


def test_param_groups_init_under_eval_shape():
    params = linen_params()
    labels = lambda p: jax.tree.map(  # noqa: E731
        lambda d: "decay" if d else "no_decay", optim_jax.decay_mask(p)
    )
    tx = optim_jax.param_groups(
        {"decay": {}, "no_decay": {"weight_decay": 0.0}},
        labels,
        optimizer=optim_jax.adamw,
        learning_rate=1e-3,
    )
    abstract = jax.eval_shape(tx.init, params)
    concrete = tx.init(params)
    assert jax.tree.structure(abstract) == jax.tree.structure(concrete)


def test_param_groups_unknown_label_names_it():
    params = {"a": jnp.ones(2), "b": jnp.ones((2, 2)), "c": jnp.ones(3)}
    tx = optim_jax.param_groups(
        {"decay": optim_jax.adamw(0.1), "no_decay": optim_jax.adam(0.1)},
        {"a": "no_decay", "b": "decya", "c": "no_decay"},
    )
    with pytest.raises(ValueError, match="labels") as err:
        tx.init(params)
    message = str(err.value)
    assert "'decya'" in message and "'b'" in message and "'decay'" in message


def test_param_groups_bad_input():
    adam = optim_jax.adam(0.1)
    with pytest.raises(ValueError, match="groups"):
        optim_jax.param_groups({}, lambda p: p)
    with pytest.raises(ValueError, match="optimizer"):
        optim_jax.param_groups({"a": {"learning_rate": 0.1}}, lambda p: p)
    with pytest.raises(ValueError, match="optimizer"):
        optim_jax.param_groups({"a": adam}, lambda p: p, learning_rate=0.1)
    with pytest.raises(TypeError, match=r"groups\['a'\]"):
        optim_jax.param_groups({"a": 0.1}, lambda p: p)
    tx = optim_jax.param_groups({"a": adam}, {"x": "a", "y": "a"})
    with pytest.raises(ValueError, match="labels: the label tree"):
        tx.init({"x": jnp.ones(2), "z": jnp.ones(2)})
    # A bad option reaches the optimizer factory, which names it.
    with pytest.raises(ValueError, match="b2"):
        optim_jax.param_groups({"a": {"b2": 1.5}}, "a", optimizer=optim_jax.adam, learning_rate=1)


# --------------------------------------------------------------------------- freezing


def test_freeze_no_state_zero_updates_and_rest_unchanged():
    params0, grads = harness.random_params(5), harness.random_grads(5, 8)
    frozen = {k: k in ("matrix", "tall") for k in params0}
    grads[2]["matrix"] = np.full_like(grads[2]["matrix"], np.nan)  # frozen: ignored entirely
    tx = optim_jax.freeze(optim_jax.adamw(0.05, weight_decay=0.1), frozen)
    ours = harness.run_ours(tx, params0, grads)
    for step in ours:
        for k in ("matrix", "tall"):
            np.testing.assert_array_equal(step[k], params0[k])
    keys = [k for k in params0 if not frozen[k]]
    alone = harness.run_ours(
        optim_jax.adamw(0.05, weight_decay=0.1),
        {k: params0[k] for k in keys},
        [{k: g[k] for k in keys} for g in grads],
    )
    harness.assert_trajectories_close([{k: p[k] for k in keys} for p in ours], alone, 1e-14, "")

    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params0)
    state = tx.init(params)
    moments = optim_jax.base.find_state(state, transforms.AdamState)
    for tree in (moments.mu, moments.nu):
        buffers = jax.tree.leaves(tree)
        assert len(buffers) == len(keys)
        assert sum(b.size for b in buffers) == sum(params[k].size for k in keys)


def test_freeze_nnx_embedding_with_mask_function():
    params = nnx_params()
    frozen_fn = lambda p: jax.tree.map(  # noqa: E731
        lambda s: s.startswith("embed/"), optim_jax.param_paths(p)
    )
    tx = optim_jax.freeze(optim_jax.adam(0.1), frozen_fn)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    updates, state = step(params, state, grads)
    updates, state = step(params, state, grads)
    for path, u in flat(updates).items():
        if path == "embed/embedding":
            assert np.all(np.asarray(u) == 0)
        else:
            assert np.all(np.asarray(u) != 0), path
    n_embed = jax.tree.leaves(params["embed"])[0].size
    n_all = sum(x.size for x in jax.tree.leaves(params))
    assert state_array_sizes(state) == 2 * (n_all - n_embed)


def test_freeze_bad_mask():
    with pytest.raises(TypeError, match="frozen"):
        optim_jax.freeze(optim_jax.adam(0.1), {"a": "yes"})
    tx = optim_jax.freeze(optim_jax.adam(0.1), lambda p: jax.tree.map(lambda x: 1, p))
    with pytest.raises(TypeError, match="frozen"):
        tx.init({"a": jnp.ones(2)})


# --------------------------------------------------------------------------- layer-wise LR decay


def deep_params():
    """12 blocks, so that "blocks/1" must not match "blocks/10" or "blocks/11"."""
    params = {"embed": {"embedding": jnp.ones((5, 2))}, "pos_embed": jnp.ones((3, 2))}
    params["blocks"] = {str(i): {"w": jnp.full((2, 2), i + 1.0)} for i in range(12)}
    params["head"] = {"w": jnp.ones((2, 2))}
    params["norm"] = {"scale": jnp.ones(2)}
    return params


def test_layerwise_scales_follow_beit():
    decay = 0.75
    layers = [["embed", "pos_embed"]] + [f"blocks/{i}" for i in range(12)]
    scales = flat(optim_jax.layerwise_lr_scales(deep_params(), decay, layers))
    # BEiT: embeddings get decay**(depth + 1), block i decay**(depth - i), head and norm 1.
    assert scales["embed/embedding"] == scales["pos_embed"] == decay**13
    for i in range(12):
        assert scales[f"blocks/{i}/w"] == pytest.approx(decay ** (12 - i), rel=1e-15)
    assert scales["head/w"] == scales["norm/scale"] == 1.0


def test_layerwise_most_specific_prefix_wins():
    params = {"enc": {"layer": {"0": jnp.ones(2), "1": jnp.ones(2)}, "emb": jnp.ones(2)}}
    scales = flat(optim_jax.layerwise_lr_scales(params, 0.5, ["enc", "enc/layer/1"]))
    assert scales == {"enc/emb": 0.25, "enc/layer/0": 0.25, "enc/layer/1": 0.5}


def test_layerwise_decay_scales_the_updates_of_an_optimizer():
    params = deep_params()
    layers = ["embed", *(f"blocks/{i}" for i in range(12))]
    inner = optim_jax.adamw(0.1, weight_decay=0.1)
    tx = optax.chain(inner, optim_jax.layerwise_lr_decay(0.8, layers))
    grads = jax.tree.map(lambda p: jnp.sin(p + 1.0), params)
    ours, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    plain, _ = jax.jit(inner.update)(grads, inner.init(params), params)
    scales = optim_jax.layerwise_lr_scales(params, 0.8, layers)
    for path, u in flat(ours).items():
        want = np.asarray(flat(plain)[path], np.float64) * flat(scales)[path]
        np.testing.assert_allclose(np.asarray(u), want, rtol=1e-6, err_msg=path)


def test_layerwise_decay_with_adamw_equals_torch_per_layer_learning_rates():
    """LLRD after AdamW = torch AdamW with lr_i = lr * decay**(n - i), decay term included."""
    params0, grads = harness.random_params(6), harness.random_grads(6, 8)
    layers = ["scalar", "vector", ["matrix", "wide"], "tall"]  # tensor3 is the "head"
    decay, lr, wd = 0.7, 0.01, 0.1
    tx = optax.chain(
        optim_jax.adamw(lr, weight_decay=wd), optim_jax.layerwise_lr_decay(decay, layers)
    )
    ours = harness.run_ours(tx, params0, grads)
    scales = optim_jax.layerwise_lr_scales(params0, decay, layers)

    def make_torch(tensors):
        groups = [
            {"params": [t], "lr": lr * scales[k]} for k, t in zip(params0, tensors, strict=True)
        ]
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd)

    harness.assert_trajectories_close(
        ours, harness.run_torch(make_torch, params0, grads), 1e-12, ""
    )


def test_layerwise_decay_on_nnx_state():
    params = nnx_params()
    scales = flat(optim_jax.layerwise_lr_scales(params, 0.5, ["embed", "layers/0", "layers/1"]))
    assert scales["embed/embedding"] == 0.125
    assert scales["layers/0/kernel"] == scales["layers/0/bias"] == 0.25
    assert scales["layers/1/kernel"] == 0.5
    assert scales["head/kernel"] == scales["norm/scale"] == 1.0
    tx = optim_jax.layerwise_lr_decay(0.5, ["embed", "layers/0", "layers/1"])
    ones = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(ones, tx.init(params), params)
    for path, u in flat(updates).items():
        np.testing.assert_array_equal(np.asarray(u), np.full(u.shape, scales[path]))


@pytest.mark.parametrize("decay", [0.0, -0.5, 1.5, float("nan")])
def test_layerwise_decay_out_of_range(decay):
    with pytest.raises(ValueError, match="decay"):
        optim_jax.layerwise_lr_decay(decay, ["a"])


def test_layerwise_decay_bad_input():
    with pytest.raises(TypeError, match="decay"):
        optim_jax.layerwise_lr_decay(lambda step: 0.5, ["a"])
    with pytest.raises(TypeError, match="layer_prefixes"):
        optim_jax.layerwise_lr_decay(0.5, "blocks")
    with pytest.raises(ValueError, match="layer_prefixes"):
        optim_jax.layerwise_lr_decay(0.5, [])
    with pytest.raises(ValueError, match="layer_prefixes"):
        optim_jax.layerwise_lr_decay(0.5, ["a", "a/"])
    with pytest.raises(ValueError, match="layer_prefixes"):
        optim_jax.layerwise_lr_decay(0.5, ["a", "/"])
    assert optim_jax.layerwise_lr_decay(1.0, ["a"]) is not None  # decay 1 is allowed: no decay
    tx = optim_jax.layerwise_lr_decay(0.5, ["embed", "blocks/12"])
    with pytest.raises(ValueError, match="'blocks/12'"):
        tx.init(deep_params())
