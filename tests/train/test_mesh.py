"""train.mesh: the (data, fsdp, tensor) mesh from the config and the logical sharding rules."""

from __future__ import annotations

import jax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from train import config
from train import mesh as mesh_lib
from train.config import DEFAULT_RULES, ConfigError, MeshConfig, ModelConfig
from train.models.gpt import GPT


@pytest.mark.parametrize(
    "sizes, devices, shape",
    [
        ((-1, 1, 1), 8, (8, 1, 1)),
        ((1, -1, 1), 8, (1, 8, 1)),
        ((2, -1, 2), 8, (2, 2, 2)),
        ((4, 1, 2), 8, (4, 1, 2)),
        ((-1, 1, 1), 1, (1, 1, 1)),
    ],
)
def test_mesh_shape_resolves_the_rest(sizes, devices, shape):
    cfg = MeshConfig(*sizes)
    assert mesh_lib.mesh_shape(cfg, devices) == shape


@pytest.mark.parametrize(
    "sizes, message",
    [
        ((3, 1, 1), r"mesh \{'data': 3, 'fsdp': 1, 'tensor': 1\} has 3 devices but JAX sees 8"),
        ((2, 2, 4), r"has 16 devices but JAX sees 8"),
        ((-1, 3, 1), r"the fixed axes' product 3 does not divide the 8 devices"),
        ((-1, -1, 2), r"at most one mesh axis may be -1"),
        ((1, 0, 8), r"mesh\.fsdp must be a positive integer or -1, got 0"),
        ((8, 1, -2), r"mesh\.tensor must be a positive integer or -1, got -2"),
    ],
)
def test_bad_mesh_names_the_numbers(sizes, message):
    with pytest.raises(ConfigError, match=message):
        mesh_lib.mesh_shape(MeshConfig(*sizes), 8)


def test_build_mesh_uses_auto_axes_over_the_devices():
    mesh = mesh_lib.build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert set(mesh.axis_types) == {AxisType.Auto}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    assert mesh_lib.data_parallel_size(mesh) == 4


def test_num_devices_takes_the_first_ones():
    mesh = mesh_lib.build_mesh(MeshConfig(data=-1, num_devices=4))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 1}
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()[:4]]
    for bad in (0, 9):
        with pytest.raises(ConfigError, match=rf"mesh\.num_devices={bad}: JAX sees 8 devices"):
            mesh_lib.build_mesh(MeshConfig(num_devices=bad))


def test_batch_and_replicated_shardings():
    mesh = mesh_lib.build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert mesh_lib.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert mesh_lib.replicated(mesh).spec == P()
    # A [16, 8] batch: 4 row blocks of 4 rows, each held by the 2 devices of a tensor group.
    batch = jax.device_put(jax.numpy.zeros((16, 8)), mesh_lib.batch_sharding(mesh))
    assert {s.data.shape for s in batch.addressable_shards} == {(4, 8)}


def test_unknown_mesh_axis_in_the_rules():
    with pytest.raises(ConfigError, match=r"mesh\.rules\.mlp: unknown mesh axis 'model'"):
        mesh_lib.rules_tuple({**DEFAULT_RULES, "mlp": "model"})


def _gpt_params(mesh, rules):
    """A small GPT created as the trainer creates it: under the mesh and the rules."""
    cfg = ModelConfig(vocab_size=256, seq_len=16, d_model=32, n_layers=1, n_heads=2)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_lib.rules_tuple(rules)):
        model = GPT(cfg, jax.numpy.float32, nnx.Rngs(0))
    return nnx.split(model, nnx.Param)[1]


def _specs(params):
    return {
        jax.tree_util.keystr(path): leaf.sharding.spec
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }


def test_default_rules_split_embed_over_fsdp_and_heads_mlp_vocab_over_tensor():
    mesh = mesh_lib.build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    params = _gpt_params(mesh, DEFAULT_RULES)
    specs = {k.replace(".value", ""): v for k, v in _specs(params).items()}
    assert specs["['head']['kernel']"] == P("fsdp", "tensor")  # (embed, vocab)
    assert specs["['token_embed']['embedding']"] == P("tensor", "fsdp")  # (vocab, embed)
    assert specs["['position_embed']['embedding']"] == P(None, "fsdp")
    block = "['blocks'][0]"
    assert specs[f"{block}['attn']['query']['kernel']"] == P("fsdp", "tensor", None)
    assert specs[f"{block}['attn']['out']['kernel']"] == P("tensor", None, "fsdp")
    assert specs[f"{block}['mlp']['up']['kernel']"] == P("fsdp", "tensor")
    assert specs[f"{block}['mlp']['down']['kernel']"] == P("tensor", "fsdp")
    assert specs[f"{block}['attn_norm']['scale']"] == P("fsdp")
    # The shards are what the specs say: the 32 x 256 head kernel in 16 x 128 pieces.
    (head,) = jax.tree.leaves(params["head"])
    assert {s.data.shape for s in head.addressable_shards} == {(16, 128)}


def test_param_shardings_agree_with_the_created_parameters():
    mesh = mesh_lib.build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    params = _gpt_params(mesh, DEFAULT_RULES)
    shardings = mesh_lib.param_shardings(params, mesh, DEFAULT_RULES)
    for param, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True):
        assert param.sharding.is_equivalent_to(sharding, param.ndim)


def test_rules_from_the_config_change_the_layout():
    """Replicating ``embed`` (no FSDP) and splitting only the MLP over ``tensor``."""
    mesh = mesh_lib.build_mesh(MeshConfig(data=4, fsdp=1, tensor=2))
    rules = {"embed": None, "vocab": None, "heads": None, "mlp": "tensor", "kv": None}
    params = _gpt_params(mesh, rules)
    specs = {k.replace(".value", ""): v for k, v in _specs(params).items()}
    assert specs["['head']['kernel']"] == P(None, None)
    assert specs["['blocks'][0]['mlp']['up']['kernel']"] == P(None, "tensor")
    assert specs["['blocks'][0]['attn']['query']['kernel']"] == P(None, None, None)
    shardings = mesh_lib.param_shardings(params, mesh, rules)
    for param, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True):
        assert param.sharding.is_equivalent_to(sharding, param.ndim)


def test_partial_rules_change_only_the_axes_they_name():
    """``mesh.rules.embed=null`` keeps the default rule of every other logical axis."""
    cfg = config.load(None, ["mesh.rules.embed=null"])
    assert dict(mesh_lib.rules_tuple(cfg.mesh.rules)) == {**DEFAULT_RULES, "embed": None}
