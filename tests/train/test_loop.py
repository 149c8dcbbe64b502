"""The trainer end to end (``train.loop.fit`` / ``build``) on 8 simulated CPU devices.

What is proved here, with a tiny GPT so that each run takes seconds:

* every mesh layout (data, fsdp, tensor and mixes) follows the single-device loss curve and ends
  at the same parameters, within a stated float32 tolerance;
* a run stopped in the middle and resumed ends bitwise equal to an uninterrupted one (SIGKILL
  at exact moments of a run in a subprocess: test_faults.py);
* a checkpoint restores onto another mesh shape with that mesh's shardings and training goes on;
* every bad input stops the run before training with a message naming the key, number or path,
  and leaves an existing checkpoint byte for byte as it was;
* gradient accumulation is the mean gradient of the micro-batches (effective batch semantics);
* non-finite steps are skipped (state unchanged), counted, and halve the loss scale;
* every optimizer of the config trains, its state sharded like the parameters.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import optim_jax
from optim_jax.transforms import SophiaState
from train import config, data, loop, metrics
from train import step as step_lib
from train.checkpoint import (
    Checkpointer,
    CheckpointError,
    IncompatibleCheckpointError,
    abstract_state,
)
from train.config import ConfigError

# A GPT small enough that a run of 8 steps takes seconds, big enough that every mesh axis splits
# something (4 heads, MLP 256 wide, 256-entry vocabulary, 64-wide embeddings). One block: a second
# adds compile time (about a second per train step) and no code path.
BASE = (
    "model.n_layers=1",
    "model.d_model=64",
    "model.n_heads=4",
    "model.seq_len=32",
    "data.batch_size=16",
    "data.max_bytes=200000",
    "run.steps=8",
    "run.log_every=1",
    "run.eval_every=4",
    "run.eval_batches=1",
    "optimizer.warmup_steps=2",
    "precision.compute=float32",
    "run.plot=false",  # metrics.png is drawn by the README command (test_main.py)
)
STEPS = 8
STOP = 3  # where the interrupted runs stop (off the checkpoint cadence: a forced save)

LAYOUTS = {
    "single": ("mesh.num_devices=1", "mesh.data=1"),
    "data8": ("mesh.data=8",),
    "fsdp8": ("mesh.data=1", "mesh.fsdp=8"),
    "data2_fsdp2_tensor2": ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
    "data4_tensor2": ("mesh.data=4", "mesh.tensor=2"),
    # params and optimizer state in the flat multi-tensor layout (optim_jax.flat)
    "fsdp8_flat": ("mesh.data=1", "mesh.fsdp=8", "optimizer.flat_layout=true"),
}
# Shard shape of the head kernel [d_model=64, vocab=256] (logical axes embed -> fsdp,
# vocab -> tensor): proof that each layout really splits the parameters as it says.
HEAD_SHARD = {
    "single": (64, 256),
    "data8": (64, 256),
    "fsdp8": (8, 256),
    "data2_fsdp2_tensor2": (32, 128),
    "data4_tensor2": (64, 128),
}

# Tolerances of the mesh comparisons. On one device and on 8, XLA sums the same float32 numbers in
# another order (per-shard partial sums, then all-reduce), so results differ in the last bits and
# the differences grow a little through 8 AdamW steps. Measured on this CPU over all four layouts
# (8 steps, float32, built as the suite builds: conftest.py's XLA flags), 2026-12-07: max |loss
# difference| 3.3e-6 (7 float32 ulps at a loss of ~5.5), max |parameter difference| 2.6e-6
# (parameters of size ~0.02-1); at optimisation level 0 alone 3.3e-6 and 3.2e-6, and the
# two-layer model of earlier versions 3.8e-6 and 1.5e-6.
# The bars are about 10x above that, and far below what a real sharding bug gives: a wrong or
# missing reduction or a mis-sliced batch moves the loss in its 2nd-3rd digit and parameters by
# ~lr = 3e-3 per step.
LOSS_ATOL = 3e-5
PARAM_ATOL = 3e-5


def cfg_of(*overrides: str) -> config.Config:
    return config.load(None, [*BASE, *overrides])


def host(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def value(variable) -> jax.Array:
    """The array of one parameter of an ``nnx.State``."""
    (leaf,) = jax.tree.leaves(variable)
    return leaf


def losses_by_step(workdir: pathlib.Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir) if "loss" in r}


def snapshot(directory: pathlib.Path) -> dict[str, str]:
    """Every file and directory under ``directory`` with a hash of its bytes."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), directory)] = "dir"
        for name in files:
            path = pathlib.Path(root, name)
            out[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_bitwise(a, b, what: str) -> None:
    a_leaves, b_leaves = host(a), host(b)
    assert len(a_leaves) == len(b_leaves), what
    for i, (x, y) in enumerate(zip(a_leaves, b_leaves, strict=True)):
        assert x.dtype == y.dtype and x.shape == y.shape, (what, i)
        assert np.array_equal(x, y), f"{what}: leaf {i} differs (max {np.max(np.abs(x - y))})"


class Run:
    """What a finished ``fit`` left: the workdir, the final state and its host copy."""

    def __init__(self, workdir: pathlib.Path, summary: dict):
        self.workdir = workdir
        self.summary = summary
        self.state = summary["state"]
        self.params = host(self.state.params)
        self.losses = losses_by_step(workdir)


class Runs:
    """Fits by layout name, each run once per module and shared by the tests that need it."""

    def __init__(self, factory: pytest.TempPathFactory):
        self.factory = factory
        self.cache: dict[str, Run] = {}

    def get(self, layout: str) -> Run:
        if layout not in self.cache:
            workdir = self.factory.mktemp(layout)
            summary = loop.fit(cfg_of(*LAYOUTS[layout]), workdir, progress=False)
            self.cache[layout] = Run(workdir, summary)
        return self.cache[layout]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Run:
    """The fsdp=8 run stopped after step ``STOP`` (as a job slot running out would)."""
    workdir = tmp_path_factory.mktemp("stopped")
    summary = loop.fit(cfg_of(*LAYOUTS["fsdp8"]), workdir, progress=False, stop_after=STOP)
    return Run(workdir, summary)


def copy_run(run: Run, target: pathlib.Path) -> pathlib.Path:
    shutil.copytree(run.workdir, target)
    return target


# ------------------------------------------------------------------------------ mesh layouts


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k not in ("single", "fsdp8_flat")])
def test_mesh_layout_matches_the_single_device_run(runs, layout):
    single, sharded = runs.get("single"), runs.get(layout)
    assert sorted(single.losses) == sorted(sharded.losses) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [sharded.losses[s] for s in range(1, STEPS + 1)],
        [single.losses[s] for s in range(1, STEPS + 1)],
        rtol=0,
        atol=LOSS_ATOL,
    )
    # The curve goes down: the comparison is between runs that learn, not between constants.
    assert sharded.losses[STEPS] < sharded.losses[1] - 0.3
    for i, (a, b) in enumerate(zip(sharded.params, single.params, strict=True)):
        np.testing.assert_allclose(a, b, rtol=0, atol=PARAM_ATOL, err_msg=f"param leaf {i}")
    # The layout is the one asked for: the parameters really are split over the mesh.
    head = value(sharded.state.params["head"]["kernel"])
    assert head.addressable_shards[0].data.shape == HEAD_SHARD[layout]
    assert len(head.sharding.device_set) == 8


@pytest.mark.parametrize("layout", ["fsdp8", "data2_fsdp2_tensor2"])
def test_optimizer_state_is_sharded_like_the_parameters(runs, layout):
    """AdamW's moments carry their parameter's sharding (not replicated: the JAX_NOTES pitfall)."""
    state = runs.get(layout).state
    assert assert_state_sharded_like_params(state) == 2 * len(jax.tree.leaves(state.params))


def assert_state_sharded_like_params(state, minimum: int | None = None) -> int:
    """Every optimizer buffer shaped like a parameter has that parameter's sharding.

    Buffers are matched to parameters by the end of their key path; ``minimum`` (default: one per
    parameter) is how many must have been compared.
    """
    params = {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
    }
    checked = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
        name = jax.tree_util.keystr(path)
        owners = [p for p in params if name.endswith(p) and params[p].shape == leaf.shape]
        if not owners or leaf.ndim == 0:
            continue
        param = params[max(owners, key=len)]
        assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), (
            f"{name}: {leaf.sharding.spec} but its parameter has {param.sharding.spec}"
        )
        checked += 1
    assert checked >= (len(params) if minimum is None else minimum)
    return checked


# ------------------------------------------------------------------------------ stop and resume


def test_stop_and_resume_is_bitwise_equal_to_an_uninterrupted_run(runs, stopped, tmp_path):
    assert stopped.summary["steps"] == STOP
    assert f"stopped after step {STOP}" in stopped.summary["stopped"]
    workdir = copy_run(stopped, tmp_path / "resumed")
    assert (workdir / "checkpoints" / str(STOP)).is_dir()
    resumed = loop.fit(cfg_of(*LAYOUTS["fsdp8"]), workdir, progress=False)
    whole = runs.get("fsdp8")

    assert resumed["steps"] == whole.summary["steps"] == STEPS
    assert_bitwise(resumed["state"].params, whole.state.params, "params")
    assert_bitwise(resumed["state"].opt_state, whole.state.opt_state, "opt_state")
    assert_bitwise(resumed["state"].loss_scale, whole.state.loss_scale, "loss_scale")
    assert int(resumed["state"].skipped) == int(whole.state.skipped) == 0
    # The metrics file of the two sessions reads as one run: every step's loss, bitwise.
    assert losses_by_step(workdir) == whole.losses
    assert resumed["final_eval_loss"] == whole.summary["final_eval_loss"]


def test_resume_onto_another_mesh(runs, stopped, tmp_path):
    """Saved on fsdp=8, restored onto data=2 x tensor=4: new shardings, training goes on."""
    workdir = copy_run(stopped, tmp_path / "remeshed")
    new_cfg = cfg_of("mesh.data=2", "mesh.tensor=4")
    setup = loop.build(new_cfg)
    with Checkpointer(workdir / "checkpoints", new_cfg.checkpoint) as checkpointer:
        restored, _ = checkpointer.restore(STOP, abstract_state(setup.state))
    # Same numbers as saved, laid out as the new mesh says.
    assert_bitwise(restored, stopped.state, "restored state")
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(setup.state), strict=True):
        assert got.sharding == want.sharding
    head = value(restored.params["head"]["kernel"])
    assert dict(head.sharding.mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert head.sharding.spec == P("fsdp", "tensor")
    assert head.addressable_shards[0].data.shape == (64, 64)

    summary = loop.fit(new_cfg, workdir, progress=False)
    whole = runs.get("fsdp8")
    losses = losses_by_step(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    # Before the stop: the saved run's own lines; after it: the new mesh's, which follow the
    # uninterrupted fsdp=8 curve within the mesh tolerance (reduction order, see LOSS_ATOL).
    assert all(losses[s] == whole.losses[s] for s in range(1, STOP + 1))
    np.testing.assert_allclose(
        [losses[s] for s in range(STOP + 1, STEPS + 1)],
        [whole.losses[s] for s in range(STOP + 1, STEPS + 1)],
        rtol=0,
        atol=LOSS_ATOL,
    )
    for a, b in zip(host(summary["state"].params), whole.params, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=PARAM_ATOL)
    final_head = value(summary["state"].params["head"]["kernel"])
    assert final_head.sharding == head.sharding
    assert_state_sharded_like_params(summary["state"])


# ------------------------------------------------------------------------------ flat layout


def test_flat_layout_follows_the_per_leaf_run(runs):
    """``optimizer.flat_layout`` keeps the params and AdamW's moments in a few buffers, sharded
    by rows over fsdp. The model's gradients arrive flat with the per-leaf values, AdamW and the
    decay mask give the same numbers per element, and the global-norm clip adds the same
    squares in another order: the mesh tolerances (which cover reduction order) apply."""
    per_leaf, flat = runs.get("fsdp8"), runs.get("fsdp8_flat")
    assert isinstance(flat.state.params, optim_jax.FlatParams)
    moments = [
        x
        for x in jax.tree.leaves(flat.state.opt_state, is_leaf=optim_jax.flat.is_flat)
        if isinstance(x, optim_jax.FlatParams)
    ]
    assert len(moments) == 2  # AdamW's mu and nu
    for moment in moments:  # sharded like the params, not replicated (the JAX_NOTES trap)
        for name, buffer in moment.buffers.items():
            param = flat.state.params.buffers[name]
            assert buffer.sharding.is_equivalent_to(param.sharding, buffer.ndim), name
    for buffer in flat.state.params.buffers.values():
        assert len(buffer.sharding.device_set) == 8
        rows = buffer.shape[0]
        assert buffer.addressable_shards[0].data.shape == (rows // min(rows, 8), buffer.shape[1])
    assert sorted(flat.losses) == list(range(1, STEPS + 1))
    assert flat.losses[1] == per_leaf.losses[1]  # the same model, params and batch
    np.testing.assert_allclose(
        [flat.losses[s] for s in range(1, STEPS + 1)],
        [per_leaf.losses[s] for s in range(1, STEPS + 1)],
        rtol=0,
        atol=LOSS_ATOL,
    )
    unpacked = host(optim_jax.flat.unflatten(flat.state.params))
    for i, (a, b) in enumerate(zip(unpacked, per_leaf.params, strict=True)):
        np.testing.assert_allclose(a, b, rtol=0, atol=PARAM_ATOL, err_msg=f"param leaf {i}")


def test_flat_adafactor_follows_the_per_leaf_run(tmp_path):
    """Adafactor on the flat layout (a buffer per tensor shape) on a mesh that shards the
    factored axes over fsdp and tensor: its row and column statistics sum over devices, and
    the run gives the per-leaf run's losses and parameters within the mesh tolerances."""
    overrides = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "optimizer.name=adafactor")
    runs = {}
    for name, extra in (("per_leaf", ()), ("flat", ("optimizer.flat_layout=true",))):
        workdir = tmp_path / name
        runs[name] = Run(workdir, loop.fit(cfg_of(*overrides, *extra), workdir, progress=False))
    per_leaf, flat = runs["per_leaf"], runs["flat"]
    assert isinstance(flat.state.params, optim_jax.FlatParams)
    assert len(flat.state.params.buffers) > 2  # one per kind of tensor
    stacks = jax.tree.leaves(
        flat.state.opt_state, is_leaf=lambda x: isinstance(x, optim_jax.flat.RunStacks)
    )
    assert any(isinstance(x, optim_jax.flat.RunStacks) for x in stacks)
    steps = range(1, STEPS + 1)
    np.testing.assert_allclose(
        [flat.losses[s] for s in steps], [per_leaf.losses[s] for s in steps], rtol=0, atol=LOSS_ATOL
    )
    unpacked = host(optim_jax.flat.unflatten(flat.state.params))
    for i, (a, b) in enumerate(zip(unpacked, per_leaf.params, strict=True)):
        np.testing.assert_allclose(a, b, rtol=0, atol=PARAM_ATOL, err_msg=f"param leaf {i}")


def test_flat_layout_checkpoints_are_per_leaf_and_resume_bitwise(runs, tmp_path):
    """A flat-layout run saves the per-leaf state (a run without the layout restores it) and
    resumes from it bitwise equal to the uninterrupted flat run."""
    workdir = tmp_path / "flat"
    stopped = loop.fit(cfg_of(*LAYOUTS["fsdp8_flat"]), workdir, progress=False, stop_after=STOP)
    per_leaf_setup = loop.build(cfg_of(*LAYOUTS["fsdp8"]))
    with Checkpointer(workdir / "checkpoints", per_leaf_setup.cfg.checkpoint) as checkpointer:
        restored, _ = checkpointer.restore(STOP, abstract_state(per_leaf_setup.state))
    assert_bitwise(restored, optim_jax.flat.unflatten(stopped["state"]), "restored per leaf")

    resumed = loop.fit(cfg_of(*LAYOUTS["fsdp8_flat"]), workdir, progress=False)
    whole = runs.get("fsdp8_flat")
    assert isinstance(resumed["state"].params, optim_jax.FlatParams)
    assert_bitwise(resumed["state"].params, whole.state.params, "params")
    assert_bitwise(resumed["state"].opt_state, whole.state.opt_state, "opt_state")
    assert losses_by_step(workdir) == whole.losses


def test_rerun_of_a_finished_workdir_changes_nothing(runs, tmp_path):
    finished = runs.get("single")
    workdir = copy_run(finished, tmp_path / "again")
    before = snapshot(workdir / "checkpoints")
    summary = loop.fit(cfg_of(*LAYOUTS["single"]), workdir, progress=False)
    assert summary["steps"] == STEPS
    assert_bitwise(summary["state"].params, finished.state.params, "params")
    assert snapshot(workdir / "checkpoints") == before


def test_the_host_runs_at_most_one_step_ahead(monkeypatch, tmp_path):
    """``fit`` waits for step N's outputs before it dispatches step N + 2: the queue of
    dispatched steps is bounded (unbounded, XLA:CPU's all-reduce deadlocked; train/loop.py)."""
    events = []  # ("dispatch", step) and ("wait", step), in the order they happen
    step_of = {}  # id of a step's metrics -> its step
    # The metrics stay referenced here: a freed object's id may be given to a later one.
    kept = []
    real_build, real_wait = loop.build, jax.block_until_ready

    def build(cfg):
        setup = real_build(cfg)
        real_step = setup.train_step

        def train_step(state, batch):
            step = len(kept) + 1
            events.append(("dispatch", step))
            new_state, step_metrics = real_step(state, batch)
            kept.append(step_metrics)
            step_of[id(step_metrics)] = step
            return new_state, step_metrics

        setup.train_step = train_step
        return setup

    def block_until_ready(x):
        if id(x) in step_of:
            events.append(("wait", step_of[id(x)]))
        return real_wait(x)

    monkeypatch.setattr(loop, "build", build)
    monkeypatch.setattr(jax, "block_until_ready", block_until_ready)
    loop.fit(cfg_of(*LAYOUTS["single"], "checkpoint.every=0"), tmp_path, progress=False)
    dispatched = [step for kind, step in events if kind == "dispatch"]
    assert dispatched == list(range(1, STEPS + 1))
    for step in range(3, STEPS + 1):
        before = events[: events.index(("dispatch", step))]
        assert ("wait", step - 2) in before, (step, events)


def test_plot_off_writes_the_metrics_but_no_figure(runs):
    """This module's runs set ``run.plot=false``; the README command draws the figure
    (test_main.py)."""
    workdir = runs.get("single").workdir
    assert (workdir / "metrics.jsonl").is_file()
    assert not (workdir / metrics.PLOT_NAME).exists()


def test_cli_rerun_of_a_finished_workdir_prints_a_summary(runs, tmp_path, capsys):
    from train.__main__ import main

    workdir = copy_run(runs.get("single"), tmp_path / "again")
    main([*BASE, *LAYOUTS["single"], "--workdir", str(workdir)])
    assert str(workdir) in capsys.readouterr().out


# ------------------------------------------------------------------------------ bad input


def _corrupt_newest_checkpoint(workdir: pathlib.Path) -> str:
    """Flips one byte of the largest array file of the checkpoint at ``STOP``; its path."""
    step_dir = workdir / "checkpoints" / str(STOP)
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    return str(step_dir)


BAD_INPUTS = {
    # name: (overrides, exception class, regex the message must match)
    "unknown_key": (["model.d_modle=32"], ConfigError, r"unknown config key model\.d_modle"),
    "wrong_type": (["run.steps=ten"], ConfigError, r"run\.steps: expected int, got str 'ten'"),
    "mesh_product": (["mesh.data=3"], ConfigError, r"has 3 devices but JAX sees 8"),
    "mesh_rest": (
        ["mesh.data=-1", "mesh.tensor=3"],
        ConfigError,
        r"product 3 does not divide the 8 devices",
    ),
    "batch_not_divisible": (
        ["data.batch_size=12"],
        ConfigError,
        r"data\.batch_size=12 is not divisible by the data-parallel size 8",
    ),
    "missing_data_file": (
        ["data.source=text", "data.path=/nonexistent/corpus.txt"],
        FileNotFoundError,
        r"data\.path: file not found: /nonexistent/corpus\.txt",
    ),
    "unknown_optimizer": (
        ["optimizer.name=adamm"],
        ConfigError,
        r"optimizer\.name: unknown optimizer 'adamm'",
    ),
    "unknown_option": (
        ["optimizer.options.momentum=0.9"],
        ConfigError,
        r"optimizer\.options\.momentum: adamw takes no such option",
    ),
    "bad_option_value": (
        ["optimizer.name=sgd", "optimizer.options.momentum=1.5"],
        ConfigError,
        r"optimizer\.options \(sgd\): momentum must be in \[0, 1\), got 1\.5",
    ),
    "unknown_schedule": (
        ["optimizer.schedule=cosine_warmup"],
        ConfigError,
        r"optimizer\.schedule: unknown schedule 'cosine_warmup'",
    ),
    "flat_layout_groups": (
        ["optimizer.groups={blocks: {lr_scale: 2}}", "optimizer.flat_layout=true"],
        ConfigError,
        r"optimizer\.flat_layout=true does not work .*param_groups cannot run on the flat",
    ),
    "incompatible_checkpoint": (["model.d_model=32"], IncompatibleCheckpointError, None),
    "corrupt_checkpoint": ([], CheckpointError, None),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_message_before_training_and_keeps_the_checkpoint(stopped, tmp_path, case):
    """Each bad input, run in a workdir holding a checkpoint: its error, and no file changed."""
    overrides, error, pattern = BAD_INPUTS[case]
    workdir = copy_run(stopped, tmp_path / "workdir")
    if case == "corrupt_checkpoint":
        step_dir = _corrupt_newest_checkpoint(workdir)
        pattern = re.escape(step_dir) + r".*does not match its SHA-256"
    if case == "incompatible_checkpoint":
        step_dir = str(workdir / "checkpoints" / str(STOP))
        pattern = re.escape(step_dir) + r" does not match this run's state: .*float32\[64"
    before = snapshot(workdir)
    with pytest.raises(error, match=pattern):
        loop.fit(cfg_of(*overrides), workdir, progress=False)
    assert snapshot(workdir) == before  # not a byte written, moved or deleted


# Bad values that should each stop the run with a ConfigError naming the key. They are run on a
# copy of a finished workdir (its checkpoint is at run.steps), so that a value that slips through
# costs no training here; the checkpoint must come out unchanged all the same.
BAD_VALUES = [
    pytest.param(
        "optimizer.warmup_steps=9",
        r"optimizer\.warmup_steps",
        id="warmup_longer_than_the_run",
    ),
    pytest.param(
        "run.log_every=0",
        r"run\.log_every",
        id="log_every_zero",
    ),
    pytest.param(
        "run.steps=-3",
        r"run\.steps",
        id="negative_steps",
    ),
    pytest.param(
        "run.patience=-1",
        r"run\.patience",
        id="negative_patience",
    ),
    pytest.param(
        "precision.growth_interval=0",
        r"precision\.growth_interval",
        id="growth_interval_zero",
    ),
    pytest.param(
        "model.n_heads=3",
        r"model\.n_heads",
        id="heads_not_dividing_width",
    ),
    pytest.param(
        "run.spike_factor=1",
        r"run\.spike_factor",
        id="spike_factor_one",
    ),
    pytest.param("run.eval_batches=0", r"run\.eval_batches", id="eval_batches_zero"),
    pytest.param(
        "optimizer.accumulation_steps=0", r"optimizer\.accumulation_steps", id="accumulation_zero"
    ),
    pytest.param("precision.compute=float64", r"precision\.compute", id="compute_dtype"),
    pytest.param("precision.loss_scale=static", r"precision\.loss_scale", id="loss_scale_mode"),
    pytest.param("optimizer.clip_norm=0", r"optimizer\.clip_norm", id="clip_norm_zero"),
    pytest.param("model.vocab_size=100", r"model\.vocab_size=100", id="vocab_too_small"),
    pytest.param("checkpoint.resume=sometimes", r"checkpoint\.resume", id="resume_mode"),
]


@pytest.mark.parametrize("override, pattern", BAD_VALUES)
def test_bad_value_is_a_config_error_naming_its_key(runs, tmp_path, override, pattern):
    workdir = copy_run(runs.get("single"), tmp_path / "workdir")
    before = snapshot(workdir / "checkpoints")
    with pytest.raises(ConfigError, match=pattern):
        loop.fit(cfg_of(*LAYOUTS["single"], override), workdir, progress=False)
    assert snapshot(workdir / "checkpoints") == before


# ------------------------------------------------------------------------------ accumulation


def test_accumulation_is_the_mean_gradient_of_its_micro_batches():
    """accumulation 2 x batch 8 == one step on the 16 rows of both micro-batches == SGD on the
    mean of the two micro-batch gradients; micro-batch 0 is the unaccumulated batch."""
    lr = 0.5
    common = (
        "optimizer.name=sgd",
        "optimizer.schedule=constant",
        f"optimizer.learning_rate={lr}",
        "optimizer.clip_norm=null",
    )
    accumulated = loop.build(cfg_of(*common, "optimizer.accumulation_steps=2", "data.batch_size=8"))
    one_batch = loop.build(cfg_of(*common, "data.batch_size=16"))
    seq_len = accumulated.cfg.model.seq_len

    # The data: [2 micro-batches, 8 rows, seq]; micro-batch 0 is what an unaccumulated run with
    # batch 8 draws at the same step (the batch of a step is a function of (seed, step, micro)).
    local = accumulated.batches.local_batch(0)
    assert local["inputs"].shape == (2, 8, seq_len)
    plain = data.Batches(accumulated.batches.tokens, seq_len, 8, accumulated.cfg.run.seed)
    assert np.array_equal(local["inputs"][0], plain.local_batch(0)["inputs"])
    assert not np.array_equal(local["inputs"][0], local["inputs"][1])

    params0 = host(accumulated.state.params)
    assert_bitwise(accumulated.state.params, one_batch.state.params, "initial params")

    # Independent of the step: the gradient of each micro-batch's mean loss, averaged.
    def loss(params, batch):
        return step_lib.loss_fn(accumulated.graphdef, params, batch)

    grad = jax.jit(jax.grad(loss))
    micro_grads = [
        host(grad(accumulated.state.params, {k: v[m] for k, v in local.items()})) for m in (0, 1)
    ]
    expected = [p - lr * (g0 + g1) / 2 for p, g0, g1 in zip(params0, *micro_grads, strict=True)]

    state, stats = accumulated.train_step(
        accumulated.state, jax.device_put(local, accumulated.batch_sharding)
    )
    for got, want in zip(host(state.params), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert not all(np.array_equal(a, b) for a, b in zip(host(state.params), params0, strict=True))

    # The same 16 rows as one batch: the same update (mean over 16 rows == mean of two means).
    merged = {k: v.reshape(1, 16, seq_len) for k, v in local.items()}
    state16, stats16 = one_batch.train_step(
        one_batch.state, jax.device_put(merged, one_batch.batch_sharding)
    )
    for got, want in zip(host(state.params), host(state16.params), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(stats["loss"]), float(stats16["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(stats["grad_norm"]), float(stats16["grad_norm"]), rtol=1e-5)


# ------------------------------------------------------------------------------ non-finite steps


def test_non_finite_steps_are_skipped_and_counted():
    """A NaN weight makes every gradient NaN: each step is skipped (parameters and optimizer state
    bit for bit unchanged) and counted in ``skipped``; the scale of a run without loss scaling
    stays 1."""
    setup = loop.build(cfg_of("precision.compute=bfloat16"))

    def poison(path, x):
        if "head" not in jax.tree_util.keystr(path):
            return x
        return jax.device_put(x.at[(0,) * x.ndim].set(jnp.nan), x.sharding)

    state = setup.state._replace(
        params=jax.tree_util.tree_map_with_path(poison, setup.state.params)
    )
    params, opt_state = host(state.params), host(state.opt_state)
    for step in range(3):
        state, stats = setup.train_step(state, loop.train_batch(setup, step))
        assert not bool(stats["finite"])
        assert int(state.skipped) == step + 1 and int(state.step) == step + 1
        for a, b in zip(host(state.params), params, strict=True):
            assert np.array_equal(a, b, equal_nan=True)
        assert_bitwise(state.opt_state, opt_state, "optimizer state")
        assert float(state.loss_scale.scale) == 1.0


def test_float16_overflow_is_skipped_and_halves_the_scale_until_finite():
    """float16 with a loss scale of 2^20: the scaled gradients overflow float16; each such step is
    skipped (params and optimizer state unchanged), counted, and halves the scale; once finite,
    training proceeds and the scale doubles after ``growth_interval`` finite steps."""
    growth = 2
    setup = loop.build(
        cfg_of(
            "optimizer.schedule=constant",  # (a warm-up from 0 would make the first update 0)
            "precision.compute=float16",
            "precision.loss_scale=dynamic",
            f"precision.initial_scale={2.0**20}",
            f"precision.growth_interval={growth}",
        )
    )
    state = setup.state
    finite_run, flags = 0, []
    for step in range(8):
        scale = float(state.loss_scale.scale)
        params, opt_state, skipped = host(state.params), host(state.opt_state), int(state.skipped)
        state, stats = setup.train_step(state, loop.train_batch(setup, step))
        finite = bool(stats["finite"])
        flags.append(finite)
        assert float(stats["loss_scale"]) == scale
        if finite:
            finite_run += 1
            assert int(state.skipped) == skipped
            assert not all(
                np.array_equal(a, b) for a, b in zip(host(state.params), params, strict=True)
            )
            want = scale * 2 if finite_run == growth else scale
            finite_run %= growth
        else:
            finite_run = 0
            assert int(state.skipped) == skipped + 1
            assert_bitwise(state.params, params, "params of a skipped step")
            assert_bitwise(state.opt_state, opt_state, "optimizer state of a skipped step")
            want = scale / 2
        assert float(state.loss_scale.scale) == want
    assert not flags[0] and any(flags)  # it did overflow, and it did recover
    assert int(state.skipped) == flags.count(False)


# ------------------------------------------------------------------------------ optimizers


# name -> (optimizer, options, sharded). Each compiles its own train step (a few seconds), so most
# run on one device; the two whose state is not simply one buffer per parameter (Adafactor's
# factored statistics, Sophia's Hessian estimate computed inside the step) run on a 2x2x2 mesh.
OPTIMIZER_CASES = {
    "sgd_nesterov": ("sgd", {"momentum": 0.9, "nesterov": True}, False),
    "adamw": ("adamw", {"weight_decay": 0.1}, False),
    "lion": ("lion", {"b2": 0.98}, False),
    "lamb": ("lamb", {"weight_decay": 0.01}, False),
    "lars": ("lars", {"momentum": 0.9}, False),
    "adagrad": ("adagrad", {}, False),
    "rmsprop": ("rmsprop", {"momentum": 0.9, "centered": True}, False),
    "adafactor": ("adafactor", {"min_dim_size_to_factor": 32}, True),
    "sophia": ("sophia", {"update_interval": 2}, True),
}


@pytest.mark.parametrize("case", sorted(OPTIMIZER_CASES))
def test_each_optimizer_of_the_config_trains(case):
    name, options, sharded = OPTIMIZER_CASES[case]
    mesh = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2") if sharded else LAYOUTS["single"]
    options = (f"optimizer.options.{k}={v}" for k, v in options.items())
    setup = loop.build(cfg_of(*mesh, f"optimizer.name={name}", *options))
    params0 = host(setup.state.params)
    state, losses = setup.state, []
    for step in range(3):
        state, stats = setup.train_step(state, loop.train_batch(setup, step))
        losses.append(float(stats["loss"]))
    assert np.all(np.isfinite(losses)) and int(state.skipped) == 0
    assert all(np.all(np.isfinite(x)) for x in host(state.params))
    moved = sum(not np.array_equal(a, b) for a, b in zip(host(state.params), params0, strict=True))
    assert moved >= len(params0) - 1  # all but (perhaps) the key bias, whose gradient is 0
    # Factored statistics are not parameter-shaped: only the 1-D parameters' buffers compare.
    assert_state_sharded_like_params(state, minimum=1 if name == "adafactor" else None)
    if name == "sophia":
        # The Hessian path ran: the refresh step fed a Gauss-Newton-Bartlett estimate in.
        sophia = optim_jax.base.find_state(state.opt_state, SophiaState)
        assert any(np.any(np.asarray(h) != 0) for h in jax.tree.leaves(sophia.hessian))
