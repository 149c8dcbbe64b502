"""Checkpointer: round trip, async save, retention, resharding restore, incompatible and corrupt
checkpoints (reported by path, previous one used, nothing deleted)."""

import hashlib
import logging
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from train import checkpoint as ck
from train.config import CheckpointConfig, ConfigError


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


MESH8 = _mesh((8,), ("x",))


def _state(seed=0, width=8):
    """Params (f32 sharded, bf16), AdamW state, int32 step, loss scale, RNG key data."""
    rng = np.random.default_rng(seed)
    row = NamedSharding(MESH8, P("x"))
    rep = NamedSharding(MESH8, P())
    params = {
        "w": jax.device_put(rng.standard_normal((16, width), dtype=np.float32), row),
        "b": jax.device_put(rng.standard_normal((width,)).astype(jnp.bfloat16), rep),
    }
    opt_state = optax.adamw(1e-3).init(params)
    # make the moments non-trivial (and different from the params)
    opt_state = jax.tree.map(lambda x: x + 0.5 if x.ndim else x + 3, opt_state)
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.asarray(7, jnp.int32),
        "loss_scale": jnp.asarray(2.0**15, jnp.float32),
        "rng": ck.rng_to_data(jax.random.key(seed)),
    }


def _cfg(**kw):
    return CheckpointConfig(**{"every": 1, "keep": 3, "keep_best": True, **kw})


def _bits(tree):
    return [(x.dtype, x.shape, np.asarray(x).tobytes()) for x in jax.tree.leaves(tree)]


def _snapshot(directory):
    """Every file and directory with its content hash: to prove nothing changed."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            out[os.path.join(root, d)] = "dir"
        for f in files:
            path = os.path.join(root, f)
            out[path] = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
    return out


def _save(ckpt, step, state, **kw):
    assert ckpt.save(step, state, {"data_position": step * 10}, force=True, **kw)


def test_round_trip_is_bitwise(tmp_path):
    state = _state()
    meta = {"data_position": {"epoch": 1, "index": 123}, "config": {"lr": 1e-3}, "loss": 2.5}
    with ck.Checkpointer(tmp_path, _cfg()) as ckpt:
        assert ckpt.save(7, state, meta, eval_loss=2.0, force=True)
        ckpt.wait()
        assert ckpt.latest_step() == 7
        restored, restored_meta = ckpt.restore(7, ck.abstract_state(state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert _bits(restored) == _bits(state)
    assert restored_meta == meta
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert got.sharding == want.sharding
    # the key data wraps back into a key that draws the same numbers
    key = ck.rng_from_data(restored["rng"])
    np.testing.assert_array_equal(
        jax.random.normal(key, (4,)), jax.random.normal(jax.random.key(0), (4,))
    )
    assert (tmp_path / "7" / ck.CHECKSUMS).is_file()
    # a fresh Checkpointer (a new run in the same directory) sees it too
    ckpt2 = ck.Checkpointer(tmp_path, _cfg())
    assert ckpt2.latest_step() == 7 and ckpt2.eval_loss(7) == 2.0
    assert ckpt2.read_meta(7) == meta
    ckpt2.close()


def test_round_trip_of_flax_nnx_state(tmp_path):
    """An NNX ``State`` (from ``nnx.split``) and its optimizer state come back as they were."""
    from flax import nnx

    model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.LayerNorm(8, rngs=nnx.Rngs(1)))
    _, params = nnx.split(model, nnx.Param)
    state = {"params": params, "opt_state": optax.adam(1e-3).init(params)}
    with ck.Checkpointer(tmp_path, _cfg()) as ckpt:
        _save(ckpt, 1, state)
        restored, _ = ckpt.restore(1, ck.abstract_state(state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert isinstance(restored["params"], nnx.State)
    assert _bits(restored) == _bits(state)


def test_async_save_snapshots_arrays_before_returning(tmp_path):
    """``save`` returns before the write ends, and the caller may then free (donate) the arrays."""
    state = _state()
    expected = _bits(state)
    target = ck.abstract_state(state)
    ckpt = ck.Checkpointer(tmp_path, _cfg())
    live = jax.tree.map(jnp.copy, state)
    assert ckpt.save(1, live, {}, force=True)
    for x in jax.tree.leaves(live):
        x.delete()
    ckpt.wait()
    assert not list(tmp_path.glob(f"*{ck.TMP_MARKER}*"))
    restored, _ = ckpt.restore(1, target)
    assert _bits(restored) == expected
    ckpt.close()


def test_cadence_and_duplicate_steps(tmp_path):
    state = _state()
    ckpt = ck.Checkpointer(tmp_path, _cfg(every=2))
    assert not ckpt.save(0, state, {})  # step 0 is never on the cadence
    assert not ckpt.save(3, state, {})
    assert ckpt.save(4, state, {})
    assert not ckpt.save(4, state, {}, force=True)  # this run already saved step 4
    assert ckpt.save(5, state, {}, force=True)  # e.g. the end of the run
    ckpt.close()
    assert ckpt.all_steps() == [4, 5]
    # a later run never overwrites an existing checkpoint
    before = _snapshot(tmp_path)
    ckpt = ck.Checkpointer(tmp_path, _cfg(every=2))
    assert not ckpt.save(4, _state(seed=1), {})
    ckpt.close()
    assert _snapshot(tmp_path) == before


def test_keep_last_k_and_best_by_eval_loss(tmp_path):
    state = _state()
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: None, 5: 3.0, 6: float("nan")}
    ckpt = ck.Checkpointer(tmp_path, _cfg(keep=2))
    for step, loss in losses.items():
        _save(ckpt, step, state, eval_loss=loss)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.best_step() == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2", "5", "6"]
    ckpt.close()
    # a resumed run keeps tracking the best across runs
    ckpt = ck.Checkpointer(tmp_path, _cfg(keep=2))
    _save(ckpt, 7, state, eval_loss=0.5)
    _save(ckpt, 8, state, eval_loss=0.7)
    ckpt.close()
    assert ckpt.all_steps() == [7, 8]
    # without keep_best only the newest survive
    ckpt = ck.Checkpointer(tmp_path, _cfg(keep=1, keep_best=False))
    _save(ckpt, 9, state, eval_loss=9.0)
    ckpt.close()
    assert ckpt.all_steps() == [9]


@pytest.mark.parametrize("layout", ["mesh_2x4", "single_device"])
def test_restore_onto_another_mesh(tmp_path, layout):
    state = _state()
    with ck.Checkpointer(tmp_path, _cfg()) as ckpt:
        _save(ckpt, 3, state)
    if layout == "mesh_2x4":
        mesh = _mesh((2, 4), ("data", "fsdp"))
        shardings = {
            "w": NamedSharding(mesh, P("data", "fsdp")),
            "vec": NamedSharding(mesh, P("fsdp")),
            "other": NamedSharding(mesh, P()),
        }

        def sharding_for(path, x):
            if x.ndim == 2:
                return shardings["w"]
            return shardings["vec"] if x.ndim == 1 and x.shape[0] % 4 == 0 else shardings["other"]
    else:
        device = SingleDeviceSharding(jax.devices()[3])

        def sharding_for(path, x):
            return device

    target = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_for(path, x)),
        state,
    )
    ckpt = ck.Checkpointer(tmp_path, _cfg())
    restored, meta = ckpt.restore(None, target)
    assert meta == {"data_position": 30}
    assert _bits(restored) == _bits(state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True):
        assert got.sharding == want.sharding
    if layout == "mesh_2x4":
        assert restored["params"]["w"].sharding.spec == P("data", "fsdp")
        assert len(restored["params"]["w"].addressable_shards) == 8


def _lowerings_during(fn):
    """How many programs JAX lowers while ``fn`` runs (persistent-cache hits included)."""
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(events)


def test_one_process_saves_replicated_arrays_without_compiling(tmp_path):
    # A width no other test uses: orbax's replica-parallel save would lower a slice program
    # for each new shape; writing each array whole from its first replica lowers none.
    state = _state(width=40)
    assert any(x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
    with ck.Checkpointer(tmp_path, _cfg()) as ckpt:
        assert _lowerings_during(lambda: (_save(ckpt, 1, state), ckpt.wait())) == 0
        restored, _ = ckpt.restore(1, ck.abstract_state(state))
    assert _bits(restored) == _bits(state)


def test_checkpoints_written_replica_parallel_restore_bitwise(tmp_path, monkeypatch):
    # orbax's own writer (slices per replica; what this trainer wrote before it wrote arrays
    # whole, and what several processes still write) and ours are read the same way.
    def orbax_writer():
        return ck.ocp.PyTreeCheckpointHandler(save_concurrent_gb=96, restore_concurrent_gb=96)

    state = _state(width=24)
    with monkeypatch.context() as patch:
        patch.setattr(ck, "_state_save_handler", orbax_writer)
        with ck.Checkpointer(tmp_path, _cfg()) as ckpt:
            _save(ckpt, 1, state)
    assert (tmp_path / "1" / "state" / "array_metadatas").is_dir()  # orbax's writer wrote it
    with ck.Checkpointer(tmp_path, _cfg()) as ckpt:
        restored, _ = ckpt.restore(1, ck.abstract_state(state))
        _save(ckpt, 2, restored)
        ckpt.wait()
        again, _ = ckpt.restore(2, ck.abstract_state(state))
    assert _bits(restored) == _bits(state) and _bits(again) == _bits(state)


def _incompatible_targets(state):
    abstract = ck.abstract_state(state)
    wider = ck.abstract_state(_state(width=16))
    missing = dict(abstract)
    del missing["loss_scale"]
    extra = dict(abstract, ema=abstract["loss_scale"])
    recast = jax.tree.map(lambda x: x, abstract)
    recast["params"]["w"] = jax.ShapeDtypeStruct(
        (16, 8), jnp.bfloat16, sharding=abstract["params"]["w"].sharding
    )
    return {
        "width": (
            wider,
            "params/w: checkpoint has float32[16, 8], this run expects float32[16, 16]",
        ),
        "run_lacks_leaf": (missing, "loss_scale: in the checkpoint but not in this run"),
        "checkpoint_lacks_leaf": (extra, "ema: missing from the checkpoint"),
        "dtype": (recast, "params/w: checkpoint has float32[16, 8], this run expects bfloat16"),
    }


def test_incompatible_target_names_path_and_touches_nothing(tmp_path):
    state = _state()
    with ck.Checkpointer(tmp_path, _cfg()) as ckpt:
        _save(ckpt, 5, state)
    before = _snapshot(tmp_path)
    for target, expected in _incompatible_targets(state).values():
        ckpt = ck.Checkpointer(tmp_path, _cfg())
        with pytest.raises(ck.IncompatibleCheckpointError) as err:
            ckpt.restore(None, target)
        assert str(tmp_path / "5") in str(err.value)
        assert expected in str(err.value)
        with pytest.raises(ck.IncompatibleCheckpointError):  # explicit step and resume alike
            ckpt.resume(target)
        ckpt.close()
    assert _snapshot(tmp_path) == before


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _largest_data_file(step_dir):
    """The biggest array-data file of the ``state`` item (orbax/tensorstore OCDBT layout)."""
    files = [p for p in (step_dir / "state").glob("ocdbt.process_*/d/*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_corrupt_newest_is_reported_and_previous_used(tmp_path, caplog):
    old, new = _state(seed=1), _state(seed=2)
    with ck.Checkpointer(tmp_path, _cfg()) as ckpt:
        _save(ckpt, 1, old)
        _save(ckpt, 2, new)
    corrupt = _largest_data_file(tmp_path / "2")
    _flip_byte(corrupt)  # orbax alone would restore this silently with wrong values
    before = _snapshot(tmp_path)

    ckpt = ck.Checkpointer(tmp_path, _cfg())
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        assert ckpt.latest_step() == 1
        step, restored, meta = ckpt.resume(ck.abstract_state(old))
    assert step == 1 and meta == {"data_position": 10}
    assert _bits(restored) == _bits(old)
    assert str(tmp_path / "2") in caplog.text and "SHA-256" in caplog.text
    assert any(path == str(tmp_path / "2") for path, _ in ckpt.problems)
    with pytest.raises(ck.CorruptCheckpointError, match=str(tmp_path / "2")):
        ckpt.restore(2, ck.abstract_state(old))
    assert _snapshot(tmp_path) == before  # nothing deleted or changed

    # the resumed run reaches step 2 again: the corrupt one is moved aside, not deleted
    assert ckpt.save(2, new, {"data_position": 20}, force=True)
    assert ckpt.save(3, new, {"data_position": 30}, force=True)
    ckpt.close()
    aside = tmp_path / "2.corrupt"
    assert aside.is_dir() and (aside / corrupt.relative_to(tmp_path / "2")).exists()
    assert ck.Checkpointer(tmp_path, _cfg()).all_steps() == [1, 2, 3]


# orbax's aborted read can leave a tensorstore callback that fails on its closed event loop
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unreadable_without_checksums_falls_back_at_read_time(tmp_path, caplog):
    """A checkpoint killed before its checksums were written is still checked by decoding."""
    # Wide enough that the weights get a data file of their own (OCDBT keeps small arrays
    # inside its index nodes, which the metadata check reads).
    old, new = _state(seed=1, width=4096), _state(seed=2, width=4096)
    with ck.Checkpointer(tmp_path, _cfg()) as ckpt:
        _save(ckpt, 1, old)
        _save(ckpt, 2, new)
    (tmp_path / "2" / ck.CHECKSUMS).unlink()
    # array data is read after the tree metadata: a truncated data file fails only then
    data = _largest_data_file(tmp_path / "2")
    data.write_bytes(data.read_bytes()[:10])
    before = _snapshot(tmp_path)
    ckpt = ck.Checkpointer(tmp_path, _cfg())
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        restored, meta = ckpt.restore(None, ck.abstract_state(old))
    assert meta == {"data_position": 10} and _bits(restored) == _bits(old)
    assert str(tmp_path / "2") in caplog.text and "could not be read" in caplog.text
    assert _snapshot(tmp_path) == before


def test_incomplete_saves_are_ignored_and_reported(tmp_path, caplog):
    state = _state()
    with ck.Checkpointer(tmp_path, _cfg()) as ckpt:
        _save(ckpt, 1, state)
        _save(ckpt, 2, state)
    # a save killed mid-write leaves orbax's tmp directory ...
    shutil.copytree(tmp_path / "2", tmp_path / f"3{ck.TMP_MARKER}")
    (tmp_path / f"3{ck.TMP_MARKER}" / ck.COMMIT_FILE).unlink()
    # ... a directory without orbax's commit marker is not complete either ...
    shutil.copytree(tmp_path / "2", tmp_path / "4")
    (tmp_path / "4" / ck.COMMIT_FILE).unlink()
    # ... nor is one whose meta record is truncated
    shutil.copytree(tmp_path / "2", tmp_path / "5")
    (tmp_path / "5" / ck.CHECKSUMS).unlink()
    (tmp_path / "5" / "meta" / "metadata").write_text('{"format": ')
    before = _snapshot(tmp_path)

    ckpt = ck.Checkpointer(tmp_path, _cfg(keep=1))
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        assert ckpt.latest_step() == 2
    for name in (f"3{ck.TMP_MARKER}", "4", "5"):
        assert str(tmp_path / name) in caplog.text
    assert ckpt.all_steps() == [1, 2]
    assert _snapshot(tmp_path) == before
    # retention (keep=1) deletes only complete checkpoints, never the broken ones
    _save(ckpt, 6, state)
    ckpt.close()
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == sorted(["3" + ck.TMP_MARKER, "4", "5", "6"])


def test_resume_modes(tmp_path):
    state = _state()
    target = ck.abstract_state(state)
    assert ck.Checkpointer(tmp_path / "a", _cfg(resume="auto")).resume(target) is None
    with pytest.raises(ck.NoCheckpointError, match=str(tmp_path / "b")):
        ck.Checkpointer(tmp_path / "b", _cfg(resume="require")).resume(target)
    with pytest.raises(ck.NoCheckpointError, match=str(tmp_path / "b")):
        ck.Checkpointer(tmp_path / "b", _cfg()).restore(None, target)
    with ck.Checkpointer(tmp_path / "c", _cfg()) as ckpt:
        _save(ckpt, 4, state)
    step, restored, meta = ck.Checkpointer(tmp_path / "c", _cfg(resume="require")).resume(target)
    assert step == 4 and meta == {"data_position": 40} and _bits(restored) == _bits(state)
    with pytest.raises(ck.CheckpointError, match="already holds checkpoints"):
        ck.Checkpointer(tmp_path / "c", _cfg(resume="never")).resume(target)
    # every checkpoint broken: a clear error listing them, not a silent fresh start
    (tmp_path / "c" / "4" / ck.COMMIT_FILE).unlink()
    with pytest.raises(ck.NoCheckpointError, match=f"no usable checkpoint.*{tmp_path / 'c' / '4'}"):
        ck.Checkpointer(tmp_path / "c", _cfg()).resume(target)


def test_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint.keep"):
        ck.Checkpointer(tmp_path, _cfg(keep=0))
    with pytest.raises(ConfigError, match="checkpoint.every"):
        ck.Checkpointer(tmp_path, _cfg(every=-1))
    with pytest.raises(ConfigError, match="checkpoint.resume"):
        ck.Checkpointer(tmp_path, _cfg(resume="sometimes"))
    ckpt = ck.Checkpointer(tmp_path, _cfg())
    state = _state()
    with pytest.raises(ValueError, match="rng is a typed random key"):
        ckpt.save(1, dict(state, rng=jax.random.key(0)), {}, force=True)
    with pytest.raises(ValueError, match="not plain JSON"):
        ckpt.save(1, state, {"position": object()}, force=True)
    with pytest.raises(ValueError, match="must be a non-negative integer"):
        ckpt.save(-1, state, {}, force=True)
    _save(ckpt, 1, state)
    no_sharding = dict(ck.abstract_state(state), step=jax.ShapeDtypeStruct((), jnp.int32))
    with pytest.raises(ValueError, match="restore target leaf step has no sharding"):
        ckpt.restore(1, no_sharding)
    with pytest.raises(ck.NoCheckpointError, match=str(tmp_path / "9")):
        ckpt.restore(9, ck.abstract_state(state))
    ckpt.close()
    with pytest.raises(ValueError, match="uint32"):
        ck.rng_to_data(jnp.zeros(2, jnp.float32))
