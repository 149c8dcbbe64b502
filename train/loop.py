"""``fit``: set up mesh, model, optimizer and data from a config, then train, evaluate, save.

Everything with devices, files and time lives here or below; the step itself
(:mod:`train.step`) is a pure function jitted once with explicit shardings.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from train import data, metrics, precision
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer, abstract_state
from train.config import Config, ConfigError, to_dict
from train.models.gpt import GPT
from train.optimizer import make_optimizer, make_schedule
from train.step import TrainState, make_eval_step, make_train_step


@dataclasses.dataclass
class Setup:
    """What a run is built from: handy for tests and for the benchmark."""

    cfg: Config
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    state: TrainState
    state_shardings: Any
    batch_sharding: NamedSharding
    train_step: Any  # jitted (state, batch) -> (state, metrics)
    eval_step: Any  # jitted (params, batch) -> loss
    batches: data.Batches
    eval_batches: data.EvalBatches
    n_params: int  # matmul parameters (embedding lookups excluded), for model FLOPs


def build(cfg: Config) -> Setup:
    """Mesh, sharded model and optimizer state, jitted steps and loaders for ``cfg``."""
    if cfg.model.kind != "gpt":
        raise ConfigError(f"model.kind must be 'gpt', got {cfg.model.kind!r}")
    mesh = mesh_lib.build_mesh(cfg.mesh)
    dp = mesh_lib.data_parallel_size(mesh)
    data.check_batch(cfg.data.batch_size, dp)
    tokens = data.load_tokens(cfg.data, cfg.model.seq_len)
    data.check_vocab(tokens, cfg.model.vocab_size)
    compute = precision.compute_dtype(cfg.precision)
    rules = mesh_lib.rules_tuple(cfg.mesh.rules)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        model = GPT(cfg.model, compute, nnx.Rngs(cfg.run.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)

    schedule = make_schedule(cfg.optimizer, cfg.run.steps)
    tx = make_optimizer(cfg.optimizer, schedule)
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init)(params)
    replicated = mesh_lib.replicated(mesh)
    state = TrainState(
        step=jax.device_put(jnp.zeros([], jnp.int32), replicated),
        params=params,
        opt_state=opt_state,
        loss_scale=jax.device_put(precision.initial_loss_scale(cfg.precision), replicated),
        skipped=jax.device_put(jnp.zeros([], jnp.int32), replicated),
    )
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    batch_sharding = NamedSharding(mesh, P(None, mesh_lib.BATCH_AXES))

    step_fn = make_train_step(
        graphdef,
        tx,
        cfg.precision,
        cfg.optimizer.accumulation_steps,
        schedule,
        hessian_seed=cfg.run.seed if cfg.optimizer.name == "sophia" else None,
    )
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    eval_sharding = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
    eval_step = jax.jit(
        make_eval_step(graphdef),
        in_shardings=(state_shardings.params, eval_sharding),
        out_shardings=replicated,
    )
    rows = data.sharding_rows(eval_sharding, cfg.data.batch_size)
    batches = data.Batches(
        tokens.train,
        cfg.model.seq_len,
        cfg.data.batch_size,
        cfg.run.seed,
        micro_batches=cfg.optimizer.accumulation_steps,
        rows=rows,
    )
    eval_batches = data.EvalBatches(
        tokens.eval, cfg.model.seq_len, cfg.data.batch_size, cfg.run.eval_batches, rows=rows
    )
    # Parameters in matrix multiplies (PaLM's model-FLOPs count): not the embedding lookups.
    embeddings = (params["token_embed"], params["position_embed"])
    n_params = sum(x.size for x in jax.tree.leaves(params)) - sum(
        x.size for x in jax.tree.leaves(embeddings)
    )
    return Setup(
        cfg,
        mesh,
        graphdef,
        state,
        state_shardings,
        batch_sharding,
        train_step,
        eval_step,
        batches,
        eval_batches,
        n_params,
    )


def global_batch(setup: Setup, local: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
    """This process's rows -> global ``jax.Array``s sharded over the batch axes."""

    def one(x):
        shape = list(x.shape)
        axis = len(shape) - 2  # the batch axis: last but one ([micro, batch, seq] or [batch, seq])
        shape[axis] = setup.cfg.data.batch_size
        return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

    return {k: one(v) for k, v in local.items()}


def train_batch(setup: Setup, step: int) -> dict:
    local = setup.batches.local_batch(step)
    if setup.cfg.optimizer.accumulation_steps == 1:
        local = {k: v[None] for k, v in local.items()}
    return global_batch(setup, local, setup.batch_sharding)


def evaluate(setup: Setup, params: Any) -> float:
    sharding = NamedSharding(setup.mesh, P(mesh_lib.BATCH_AXES))
    losses = [
        setup.eval_step(params, global_batch(setup, batch, sharding))
        for batch in setup.eval_batches
    ]
    return float(np.mean([float(x) for x in losses]))


class _Logger:
    """Turns a step's device metrics into a logged record: throughput, MFU, spikes, eval."""

    def __init__(self, setup: Setup, workdir: pathlib.Path, start_step: int, is_primary: bool):
        cfg = setup.cfg
        self.setup = setup
        self.writer = metrics.MetricsWriter(workdir, start_step=start_step, enabled=is_primary)
        self.monitor = metrics.GradNormMonitor(factor=cfg.run.spike_factor)
        self.tokens_per_step = (
            cfg.data.batch_size * cfg.optimizer.accumulation_steps * cfg.model.seq_len
        )
        self.flops_per_token = metrics.model_flops_per_token(
            setup.n_params, cfg.model.n_layers, cfg.model.d_model, cfg.model.seq_len
        )
        self.peak = metrics.total_peak_flops(jax.devices(), precision.compute_dtype(cfg.precision))
        self.is_primary = is_primary
        self.first_loss = self.last_loss = None
        self._restart_clock()

    def _restart_clock(self) -> None:
        self.window_start, self.window_steps = time.perf_counter(), 0

    def log(self, step: int, state: TrainState, step_metrics: dict, evaluate_now: bool) -> dict:
        record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        elapsed = time.perf_counter() - self.window_start
        record["step_time"] = elapsed / self.window_steps
        record["tokens_per_second"] = self.tokens_per_step * self.window_steps / elapsed
        record["skipped_steps"] = float(state.skipped)
        utilisation = metrics.mfu(record["tokens_per_second"], self.flops_per_token, self.peak)
        if utilisation is not None:
            record["mfu"] = utilisation
        warning = self.monitor.check(step, record["grad_norm"])
        if warning and self.is_primary:
            tqdm.write(warning)
        if evaluate_now:
            record["eval_loss"] = evaluate(self.setup, state.params)
        self.first_loss = record["loss"] if self.first_loss is None else self.first_loss
        self.last_loss = record["loss"]
        self.writer.write(step, record)
        self._restart_clock()
        return record


def fit(
    cfg: Config,
    workdir: str | pathlib.Path,
    *,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Trains ``cfg`` in ``workdir`` (resuming from its newest checkpoint) and returns a summary.

    ``stop_after`` ends the session after that step with a checkpoint, as a
    time-limited job slot would; the next ``fit`` on the workdir carries on to
    ``run.steps`` with the same schedule and data.
    """
    workdir = pathlib.Path(workdir)
    setup = build(cfg)
    checkpointer = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    data_spec = setup.batches.spec()
    state, start_step = setup.state, 0
    resumed = checkpointer.resume(abstract_state(state))
    if resumed is not None:
        start_step, state, meta = resumed
        for change in data.spec_changes(meta.get("data", {}), data_spec):
            tqdm.write(f"warning: the data differs from the checkpoint's: {change}")
        tqdm.write(f"resumed from {checkpointer.step_path(start_step)}")

    is_primary = jax.process_index() == 0
    logger = _Logger(setup, workdir, start_step, is_primary)
    initial_eval = evaluate(setup, state.params)
    best_eval, evals_without_gain, stopped = initial_eval, 0, None
    bar = tqdm(
        range(start_step, cfg.run.steps),
        initial=start_step,
        total=cfg.run.steps,
        desc="train",
        unit="step",
        disable=not (progress and is_primary),
        mininterval=0.5,
    )
    for step in bar:
        state, step_metrics = setup.train_step(state, train_batch(setup, step))
        logger.window_steps += 1
        done, last = step + 1, step + 1 == cfg.run.steps
        eval_loss = None
        if done % cfg.run.log_every == 0 or last:
            evaluate_now = done % cfg.run.eval_every == 0 or last
            record = logger.log(done, state, step_metrics, evaluate_now)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                lr=f"{record['learning_rate']:.2e}",
                grad_norm=f"{record['grad_norm']:.2f}",
                tok_s=f"{record['tokens_per_second']:,.0f}",
            )
            eval_loss = record.get("eval_loss")
        if eval_loss is not None:
            evals_without_gain = 0 if eval_loss < best_eval else evals_without_gain + 1
            best_eval = min(best_eval, eval_loss)
            if cfg.run.patience and evals_without_gain >= cfg.run.patience:
                stopped = f"early stop: no eval gain in {cfg.run.patience} evaluations"
        if stop_after is not None and done >= stop_after:
            stopped = f"stopped after step {done} as asked; the next run resumes here"
        final = last or stopped is not None
        checkpointer.save(done, state, {"data": data_spec}, eval_loss=eval_loss, force=final)
        if stopped:
            tqdm.write(stopped)
            break
    bar.close()
    checkpointer.close()
    logger.writer.close()
    if is_primary:
        metrics.plot(workdir)
    return {
        "initial_eval_loss": initial_eval,
        "final_eval_loss": evaluate(setup, state.params),
        "first_train_loss": logger.first_loss,
        "last_train_loss": logger.last_loss,
        "steps": int(state.step),
        "skipped_steps": int(state.skipped),
        "stopped": stopped,
        "state": state,
        "config": to_dict(cfg),
    }
