"""The trainer's optimizer from config: names, options, schedules, parameter groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optim_jax
from train import config
from train.optimizer import make_optimizer, make_schedule


def build(*overrides, steps=100):
    """The optimizer of the overrides, with a constant schedule unless they set one."""
    cfg = config.load(None, ["optimizer.schedule=constant", *overrides]).optimizer
    return make_optimizer(cfg, make_schedule(cfg, steps))


PARAMS = {
    "blocks": {"0": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}},
    "head": {"kernel": jnp.ones((4, 3))},
    "token_embed": {"embedding": jnp.ones((5, 4))},
}


def first_update(tx):
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    return updates


def test_parameter_groups_scale_the_learning_rate_and_freeze():
    common = ["optimizer.options={weight_decay: 0.0}", "optimizer.clip_norm=null"]
    plain = first_update(build(*common))
    grouped = first_update(
        build(*common, "optimizer.groups={head: {lr_scale: 0.1}, token_embed: null}")
    )
    assert np.all(np.abs(plain["head"]["kernel"]) > 1e-4)
    np.testing.assert_allclose(grouped["head"]["kernel"], 0.1 * plain["head"]["kernel"], 1e-6)
    np.testing.assert_array_equal(grouped["token_embed"]["embedding"], 0.0)
    np.testing.assert_array_equal(grouped["blocks"]["0"]["kernel"], plain["blocks"]["0"]["kernel"])


def test_group_options_override_the_defaults():
    wd = first_update(build("optimizer.options={weight_decay: 0.5}", "optimizer.clip_norm=null"))
    grouped = first_update(
        build(
            "optimizer.options={weight_decay: 0.5}",
            "optimizer.clip_norm=null",
            "optimizer.groups={blocks: {weight_decay: 0.0}}",
        )
    )
    assert not np.allclose(wd["blocks"]["0"]["kernel"], grouped["blocks"]["0"]["kernel"])
    np.testing.assert_array_equal(wd["head"]["kernel"], grouped["head"]["kernel"])


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["optimizer.name=adamx"], "optimizer.name"),
        (["optimizer.options={momentun: 0.9}"], "optimizer.options.momentun"),
        (["optimizer.name=sgd", "optimizer.options={b2: 0.9}"], "optimizer.options.b2"),
        (["optimizer.groups={head: {b3: 1}}"], "optimizer.groups.head.b3"),
        (["optimizer.groups={head: {lr_scale: -1}}"], "optimizer.groups.head.lr_scale"),
        (["optimizer.schedule=cosine"], "optimizer.schedule"),
        (["optimizer.options={b1: 1.5}"], "b1"),
        (["optimizer.clip_norm=-1"], "optimizer.clip_norm"),
    ],
)
def test_bad_optimizer_config_names_the_key(overrides, named):
    with pytest.raises(config.ConfigError, match=named.replace(".", r"\.")):
        build(*overrides)


def test_schedule_shapes_follow_the_config():
    cfg = config.load(None, ["optimizer.learning_rate=1.0", "optimizer.warmup_steps=10"])
    assert cfg.optimizer.schedule == "warmup_cosine_decay"
    schedule = make_schedule(cfg.optimizer, 100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(100)) == pytest.approx(cfg.optimizer.end_lr_fraction)


def test_int8_moments_in_the_trainer_are_sharded_and_checkpoint_bitwise(tmp_path):
    """``optimizer.options.moment_dtype=int8`` on an fsdp mesh: the codes of each quantised
    moment are sharded like its parameter, and a checkpoint of the state (quantised moments are
    pytree nodes) restores bit for bit onto the same shardings."""
    from optim_jax.quantization import QuantizedArray
    from tests.train.test_loop import assert_bitwise
    from tests.train.test_loss_spikes import cfg_of
    from train import loop
    from train.checkpoint import Checkpointer, abstract_state

    cfg = cfg_of("optimizer.options.moment_dtype=int8", "model.hidden=128", "mesh.fsdp=2")
    setup = loop.build(cfg)
    state, _ = setup.train_step(setup.state, loop.train_batch(setup, 0))
    moments = optim_jax.base.find_state(state.opt_state, optim_jax.transforms.TraceState).momentum
    quantised = [
        (path, m)
        for path, m in jax.tree_util.tree_leaves_with_path(
            moments, is_leaf=lambda x: isinstance(x, QuantizedArray)
        )
        if isinstance(m, QuantizedArray)
    ]
    assert quantised  # the 256 x 128 and 128 x 128 kernels
    params = dict(jax.tree_util.tree_leaves_with_path(state.params))
    for path, moment in quantised:
        param = params[path]
        assert moment.codes.sharding.is_equivalent_to(param.sharding, param.ndim), path
    with Checkpointer(tmp_path, cfg.checkpoint) as checkpointer:
        checkpointer.save(1, state, {}, force=True)
        checkpointer.wait()
        restored, _ = checkpointer.restore(1, abstract_state(state))
    assert_bitwise(restored, state, "restored state")


def test_bfloat16_moments_are_stored_after_the_params_in_the_trainer_step():
    """The trainer's step calls ``optim_jax.stored_after``: on an fsdp mesh its compiled
    program copies no bfloat16 array shaped like a parameter's shard (without the call,
    XLA:CPU copies each moment before the step; tests/optim_jax/test_in_place.py)."""
    import re

    from tests.train.test_loss_spikes import cfg_of
    from train import loop

    cfg = cfg_of("optimizer.options.moment_dtype=bfloat16", "model.hidden=128", "mesh.fsdp=2")
    setup = loop.build(cfg)
    batch = loop.train_batch(setup, 0)
    text = setup.train_step.lower(setup.state, batch).compile().as_text()
    shards = {
        ",".join(map(str, p.sharding.shard_shape(p.shape)))
        for p in jax.tree.leaves(setup.state.params)
        if p.ndim
    }
    copied = set(re.findall(r"bf16\[([0-9,]*)\]\{[0-9,]*\} copy\(", text))
    assert shards and not copied & shards, copied & shards
