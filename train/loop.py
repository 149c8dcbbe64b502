"""``fit``: set up mesh, model, optimizer and data from a config, then train, evaluate, save.

Everything with devices, files and time lives here or below; the step itself
(:mod:`train.step`) is a pure function jitted once with explicit shardings.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import optim_jax
from train import data, diagnostics, distributed, loss_spikes, metrics, precision
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer, NoCheckpointError, abstract_state
from train.config import Config, ConfigError, to_dict
from train.models import vision
from train.models.gpt import GPT
from train.optimizer import make_momentum_schedule, make_optimizer, make_schedule
from train.step import (
    CLASSIFICATION,
    LANGUAGE_MODELING,
    Task,
    TrainState,
    make_eval_step,
    make_train_step,
)

# Where the batch (row) axis of a batch's arrays is: train batches carry a leading
# [accumulation_steps] axis ([micro, batch, ...]), evaluation batches do not ([batch, ...]).
TRAIN_BATCH_AXIS = 1
EVAL_BATCH_AXIS = 0


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
    eval_step: Any  # jitted (params, batch) -> {"loss", "accuracy"}
    batches: data.Batches | data.ImageBatches
    eval_batches: data.EvalBatches | data.ImageEvalBatches
    n_params: int  # gpt: matmul parameters (embedding lookups excluded); images: all
    task: Task  # which batch entries the model reads and predicts
    units_per_row: int  # throughput units (task.unit) in one batch row: seq_len tokens, 1 image
    flops_per_unit: float  # training model FLOPs per token (gpt) or per image


def _check_model_and_data(cfg: Config) -> None:
    kind, source = cfg.model.kind, cfg.data.source
    if kind == "gpt":
        if source not in data.TOKEN_SOURCES:
            raise ConfigError(
                f"model.kind='gpt' needs a token data.source ({', '.join(data.TOKEN_SOURCES)}), "
                f"got data.source={source!r}; the image classifiers are model.kind=cnn or mlp"
            )
    elif kind in vision.KINDS:
        if source != "shapes":
            raise ConfigError(
                f"model.kind={kind!r} is an image classifier and needs data.source='shapes', "
                f"got data.source={source!r}"
            )
        if not 2 <= cfg.model.num_classes <= len(data.SHAPE_NAMES):
            raise ConfigError(
                f"model.num_classes={cfg.model.num_classes}: the shapes dataset has 2 to "
                f"{len(data.SHAPE_NAMES)} classes"
            )
        if cfg.model.image_size < 8:
            raise ConfigError(f"model.image_size must be >= 8, got {cfg.model.image_size}")
    else:
        raise ConfigError(
            f"model.kind must be one of {', '.join(('gpt', *vision.KINDS))}, got {kind!r}"
        )


def _token_loaders(cfg: Config, rows: tuple[int, int]) -> tuple[data.Batches, data.EvalBatches]:
    tokens = data.load_tokens(cfg.data, cfg.model.seq_len)
    data.check_vocab(tokens, cfg.model.vocab_size)
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
    return batches, eval_batches


def _image_loaders(
    cfg: Config, rows: tuple[int, int]
) -> tuple[data.ImageBatches, data.ImageEvalBatches]:
    images = data.load_images(
        cfg.data, image_size=cfg.model.image_size, num_classes=cfg.model.num_classes
    )
    batches = data.ImageBatches(
        images.train_images,
        images.train_labels,
        cfg.data.batch_size,
        cfg.run.seed,
        micro_batches=cfg.optimizer.accumulation_steps,
        rows=rows,
    )
    eval_batches = data.ImageEvalBatches(
        images.eval_images,
        images.eval_labels,
        cfg.data.batch_size,
        cfg.run.eval_batches,
        rows=rows,
    )
    return batches, eval_batches


def _flat_layout_error(cfg: Config, err: Exception) -> ConfigError:
    return ConfigError(
        f"optimizer.flat_layout=true does not work with this run "
        f"(optimizer.name={cfg.optimizer.name!r}): {err}"
    )


def per_leaf(cfg: Config) -> Config:
    """``cfg`` without ``optimizer.flat_layout``: for tools that read parameters by name and
    checkpoints (which are per-leaf either way), where the layout changes no number."""
    return dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, flat_layout=False))


class StepsInFlight:
    """Keeps at most two training steps in flight: after dispatching a step, the host waits for
    the previous one's outputs while this one runs, so the device stays busy and nothing queues
    without bound (each queued step holds its batch). Unbounded, XLA:CPU's in-process
    all-reduce on 8 simulated devices deadlocked: one device's launch waited on a semaphore
    while the other seven waited for it in the all-reduce (the image recipe, loop emitters)."""

    def __init__(self) -> None:
        self.previous: Any = None

    def dispatched(self, outputs: Any) -> None:
        """``outputs`` of the step just dispatched; returns once the step before it is done."""
        if self.previous is not None:
            jax.block_until_ready(self.previous)
        self.previous = outputs


def build(cfg: Config) -> Setup:
    """Mesh, sharded model and optimizer state, jitted steps and loaders for ``cfg``.

    ``model.kind`` picks the model, the task and the loaders: ``gpt`` a language
    model on a token source, ``cnn`` / ``mlp`` an image classifier on ``shapes``.
    """
    _check_model_and_data(cfg)
    mesh = mesh_lib.build_mesh(cfg.mesh)
    dp = mesh_lib.data_parallel_size(mesh)
    data.check_batch(cfg.data.batch_size, dp)
    eval_sharding = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))
    rows = data.sharding_rows(eval_sharding, cfg.data.batch_size)
    if cfg.model.kind == "gpt":
        task, units_per_row = LANGUAGE_MODELING, cfg.model.seq_len
        batches, eval_batches = _token_loaders(cfg, rows)
    else:
        task, units_per_row = CLASSIFICATION, 1
        batches, eval_batches = _image_loaders(cfg, rows)
    compute = precision.compute_dtype(cfg.precision)
    rules = mesh_lib.rules_tuple(cfg.mesh.rules)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        rngs = nnx.Rngs(cfg.run.seed)
        if cfg.model.kind == "gpt":
            model = GPT(cfg.model, compute, rngs)
        else:
            in_channels = batches.images.shape[-1]
            model = vision.build(cfg.model, in_channels, compute, rngs)
    graphdef, per_leaf_params = nnx.split(model, nnx.Param)
    per_leaf_params = jax.tree.map(lambda x: x.astype(jnp.float32), per_leaf_params)
    params = per_leaf_params
    if cfg.optimizer.flat_layout:
        try:
            # Adafactor reduces over each stack of same-shaped tensors: a buffer per shape.
            by_shape = cfg.optimizer.name == "adafactor"
            params = optim_jax.flat_layout(params, by_shape=by_shape).pack(params)
        except optim_jax.flat.FlatLayoutError as err:
            raise _flat_layout_error(cfg, err) from None

    schedule = make_schedule(cfg.optimizer, cfg.run.steps)
    tx = make_optimizer(
        cfg.optimizer, schedule, make_momentum_schedule(cfg.optimizer, cfg.run.steps)
    )
    with jax.set_mesh(mesh):
        try:
            opt_state = jax.jit(tx.init)(params)
        except optim_jax.flat.FlatLayoutError as err:
            # Optimizers that read each tensor's shape or give tensors rules by name.
            raise _flat_layout_error(cfg, err) from None
    spike_rule = loss_spikes.SpikeRule(
        factor=cfg.run.loss_spike_factor,
        window=cfg.run.spike_window,
        discard=cfg.run.spike_policy in ("skip", "rollback"),
    )
    replicated = mesh_lib.replicated(mesh)
    state = TrainState(
        step=jax.device_put(jnp.zeros([], jnp.int32), replicated),
        params=params,
        opt_state=opt_state,
        loss_scale=jax.device_put(precision.initial_loss_scale(cfg.precision), replicated),
        skipped=jax.device_put(jnp.zeros([], jnp.int32), replicated),
        loss_watch=jax.device_put(loss_spikes.init_loss_watch(spike_rule), replicated),
    )
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    batch_sharding = NamedSharding(mesh, P(None, mesh_lib.BATCH_AXES))

    step_fn = make_train_step(
        graphdef,
        tx,
        cfg.precision,
        cfg.optimizer.accumulation_steps,
        schedule,
        spike_rule,
        hessian_seed=cfg.run.seed if cfg.optimizer.name == "sophia" else None,
        task=task,
    )
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        make_eval_step(graphdef, task),
        in_shardings=(state_shardings.params, eval_sharding),
        out_shardings=replicated,
    )
    n_params = sum(x.size for x in jax.tree.leaves(per_leaf_params))
    if cfg.model.kind == "gpt":
        # Parameters in matrix multiplies (PaLM's model-FLOPs count): not the embedding lookups.
        embeddings = (per_leaf_params["token_embed"], per_leaf_params["position_embed"])
        n_params -= sum(x.size for x in jax.tree.leaves(embeddings))
        flops_per_unit = metrics.model_flops_per_token(
            n_params, cfg.model.n_layers, cfg.model.d_model, cfg.model.seq_len
        )
    else:
        flops_per_unit = model.flops_per_example()
    return Setup(
        cfg=cfg,
        mesh=mesh,
        graphdef=graphdef,
        state=state,
        state_shardings=state_shardings,
        batch_sharding=batch_sharding,
        train_step=train_step,
        eval_step=eval_step,
        batches=batches,
        eval_batches=eval_batches,
        n_params=n_params,
        task=task,
        units_per_row=units_per_row,
        flops_per_unit=flops_per_unit,
    )


def global_batch(
    setup: Setup, local: dict[str, np.ndarray], sharding: NamedSharding, *, batch_axis: int
) -> dict:
    """This process's rows -> global ``jax.Array``s sharded over the batch axes.

    ``batch_axis`` is where the rows are in every array of ``local``
    (:data:`TRAIN_BATCH_AXIS` or :data:`EVAL_BATCH_AXIS`), whatever the arrays'
    rank: ``[micro, batch, seq]`` tokens, ``[micro, batch, H, W, C]`` images,
    ``[micro, batch]`` labels.
    """

    def one(x):
        shape = list(x.shape)
        shape[batch_axis] = setup.cfg.data.batch_size
        return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

    return {k: one(v) for k, v in local.items()}


def train_batch(setup: Setup, step: int) -> dict:
    local = setup.batches.local_batch(step)
    if setup.cfg.optimizer.accumulation_steps == 1:
        local = {k: v[None] for k, v in local.items()}
    return global_batch(setup, local, setup.batch_sharding, batch_axis=TRAIN_BATCH_AXIS)


def eval_metrics(setup: Setup, params: Any) -> dict[str, float]:
    """Mean loss and accuracy over the evaluation batches."""
    sharding = NamedSharding(setup.mesh, P(mesh_lib.BATCH_AXES))
    results = [
        setup.eval_step(params, global_batch(setup, batch, sharding, batch_axis=EVAL_BATCH_AXIS))
        for batch in setup.eval_batches
    ]
    results = jax.device_get(results)
    return {key: float(np.mean([float(r[key]) for r in results])) for key in results[0]}


def evaluate(setup: Setup, params: Any) -> float:
    """The mean evaluation loss."""
    return eval_metrics(setup, params)["loss"]


class _Logger:
    """What the run reports after each step: the logged record (throughput, MFU, spikes,
    evaluation), warnings, the progress bar, and on request sharpness and the first
    non-finite step's diagnosis. Only process 0 writes or prints."""

    def __init__(
        self,
        setup: Setup,
        workdir: pathlib.Path,
        start_step: int,
        is_primary: bool,
        progress: bool,
    ):
        cfg = setup.cfg
        self.setup = setup
        self.writer = metrics.MetricsWriter(workdir, start_step=start_step, enabled=is_primary)
        self.monitor = metrics.GradNormMonitor(factor=cfg.run.spike_factor)
        # Throughput in the task's unit: tokens_per_second (gpt) or examples_per_second (images).
        self.rate_key = f"{setup.task.unit}_per_second"
        self.rate_label = f"{setup.task.unit}/s"  # in the progress bar
        self.units_per_step = (
            cfg.data.batch_size * cfg.optimizer.accumulation_steps * setup.units_per_row
        )
        self.peak = metrics.total_peak_flops(jax.devices(), precision.compute_dtype(cfg.precision))
        self.is_primary = is_primary
        self.first_loss = self.last_loss = None
        self.spikes_logged = 0
        self.nonfinite_first = None  # the diagnosis of the first logged non-finite step
        self.sharpness = None
        if cfg.run.sharpness_every:
            from train.landscape import make_sharpness  # imports this module: no cycle this way

            self.sharpness = make_sharpness(setup)  # its own jitted function, not in the step
        self.bar = tqdm(
            initial=start_step,
            total=cfg.run.steps,
            desc="train",
            unit="step",
            disable=not (progress and is_primary),
            mininterval=0.5,
        )
        self.restart_clock()

    def restart_clock(self) -> None:
        self.window_start, self.window_steps = time.perf_counter(), 0

    def warn(self, message: str) -> None:
        if self.is_primary:
            tqdm.write(message)

    def step_done(
        self, step: int, state: TrainState, step_metrics: dict, batch: dict
    ) -> dict | None:
        """After training step ``step`` (counted from 1): the logged record on a logging step
        (with ``eval_*`` on an evaluation step), None on the others."""
        run = self.setup.cfg.run
        self.window_steps += 1
        last = step == run.steps
        record = None
        if step % run.log_every == 0 or last:
            record = self._log(step, state, step_metrics, step % run.eval_every == 0 or last)
            if not record["finite"] and self.nonfinite_first is None:
                # Once per run: a forward/backward with every module checked. The step was
                # skipped, so state.params are the ones that met this batch.
                report = diagnostics.diagnose_step(self.setup, state.params, batch)
                self.nonfinite_first = report.message()
                self.warn(f"warning: step {step}: {self.nonfinite_first}")
            self.bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                lr=f"{record['learning_rate']:.2e}",
                grad_norm=f"{record['grad_norm']:.2f}",
                **{self.rate_label: f"{record[self.rate_key]:,.0f}"},
            )
        if self.sharpness is not None and step % run.sharpness_every == 0:
            # A record of its own for this step: read_metrics merges it with the step's.
            started = time.perf_counter()
            self.writer.write(step, self.sharpness(state.params, batch, step))
            # Not training time: kept out of the step_time and throughput of the window.
            self.window_start += time.perf_counter() - started
        self.bar.update(1)
        return record

    def rewind(self, step: int) -> None:
        """The run goes on from the state after ``step`` (a rollback)."""
        self.writer.restart(step)
        self.restart_clock()
        self.bar.n = step
        self.bar.refresh()

    def _log(self, step: int, state: TrainState, step_metrics: dict, evaluate_now: bool) -> dict:
        record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        elapsed = time.perf_counter() - self.window_start
        record["step_time"] = elapsed / self.window_steps
        record[self.rate_key] = self.units_per_step * self.window_steps / elapsed
        record["skipped_steps"] = float(state.skipped)
        utilisation = metrics.mfu(record[self.rate_key], self.setup.flops_per_unit, self.peak)
        if utilisation is not None:
            record["mfu"] = utilisation
        record["loss_spikes"] = spikes = int(state.loss_watch.spikes)
        warnings = [self.monitor.check(step, record["grad_norm"])]
        if spikes > self.spikes_logged:
            warnings.append(
                f"warning: {spikes - self.spikes_logged} loss spike(s) up to step {step} "
                f"(loss > {self.setup.cfg.run.loss_spike_factor} x the recent median); "
                f"run.spike_policy={self.setup.cfg.run.spike_policy!r}"
            )
        self.spikes_logged = spikes
        for warning in filter(None, warnings):
            self.warn(warning)
        if evaluate_now:
            for key, value in eval_metrics(self.setup, state.params).items():
                record[f"eval_{key}"] = value
        self.first_loss = record["loss"] if self.first_loss is None else self.first_loss
        self.last_loss = record["loss"]
        self.writer.write(step, record)
        self.restart_clock()
        return record

    def close(self) -> None:
        self.bar.close()
        self.writer.close()


class _StopRule:
    """Why a session ends before ``run.steps``: no eval gain for ``run.patience`` evaluations,
    the ``on_eval`` callback, ``stop_after``, or a preemption. :meth:`check` must run after
    every step, on every process (the preemption service needs each step)."""

    def __init__(
        self,
        cfg: Config,
        initial_eval_loss: float,
        stop_after: int | None,
        on_eval: Callable[[int, dict[str, float]], bool] | None,
    ):
        self.patience = cfg.run.patience
        self.best_eval, self.evals_without_gain = initial_eval_loss, 0
        self.stop_after, self.on_eval = stop_after, on_eval
        self.preemption = distributed.Preemption()
        self.preempted = False
        self.calls = 0

    def check(self, step: int, record: dict | None) -> str | None:
        """After step ``step``: the reason to stop there, or None."""
        stopped = None
        eval_loss = None if record is None else record.get("eval_loss")
        if eval_loss is not None:
            gain = eval_loss < self.best_eval
            self.evals_without_gain = 0 if gain else self.evals_without_gain + 1
            self.best_eval = min(self.best_eval, eval_loss)
            if self.patience and self.evals_without_gain >= self.patience:
                stopped = f"early stop: no eval gain in {self.patience} evaluations"
            if self.on_eval is not None and self.on_eval(step, record):
                stopped = f"stopped after step {step} by the evaluation callback"
        if self.stop_after is not None and step >= self.stop_after:
            stopped = f"stopped after step {step} as asked; the next run resumes here"
        # The preemption service wants a count that only grows, also across a rollback.
        self.calls += 1
        if self.preemption.reached(self.calls):
            self.preempted = True
            stopped = f"preempted (SIGTERM) after step {step}; checkpointed, rerun to resume"
        return stopped

    def close(self) -> None:
        self.preemption.close()


@dataclasses.dataclass
class DataPosition:
    """Which batch a step trains on: batch index = step + ``offset``.

    The offset starts at 0 and grows only by rollbacks, which skip the batches
    trained on since the checkpoint they return to, so no batch is ever used
    twice. Saved in every checkpoint's meta, so a resumed run reads on where
    the saved one would have.
    """

    offset: int = 0
    rollbacks: int = 0

    @classmethod
    def from_meta(cls, meta: dict) -> DataPosition:
        return cls(int(meta.get("data_offset", 0)), int(meta.get("rollbacks", 0)))

    def meta(self) -> dict[str, int]:
        return {"data_offset": self.offset, "rollbacks": self.rollbacks}


def _roll_back(
    cfg: Config, checkpointer: Checkpointer, target: Any, step: int, position: DataPosition
) -> tuple[int, TrainState] | None:
    """After a loss spike in step ``step`` (0-based) of a ``rollback`` run: ``(checkpoint step,
    state)`` to go on from, with ``position`` moved past the batches since that checkpoint;
    None (the step's update was already discarded, as under ``skip``) when the rollbacks are
    used up or there is no checkpoint yet."""
    where = f"loss spike at step {step + 1}"
    if position.rollbacks >= cfg.run.max_rollbacks:
        tqdm.write(
            f"warning: {where}: run.max_rollbacks={cfg.run.max_rollbacks} reached; "
            "skipping its update instead"
        )
        return None
    try:
        restored_step, state, _ = checkpointer.restore_newest(target)
    except NoCheckpointError:
        tqdm.write(f"warning: {where}: no checkpoint to roll back to yet; skipping its update")
        return None
    # The batches of steps restored_step..step are passed over: the step after the checkpoint
    # trains on the batch after the offending one.
    first_skipped, last_skipped = restored_step + position.offset, step + position.offset
    position.offset = last_skipped + 1 - restored_step
    position.rollbacks += 1
    tqdm.write(
        f"warning: {where}: rolled back to {checkpointer.step_path(restored_step)} "
        f"(rollback {position.rollbacks} of at most {cfg.run.max_rollbacks}), skipping "
        f"batches {first_skipped}..{last_skipped}"
    )
    return restored_step, state


def _plateau_observer(setup: Setup) -> Any:
    """With ``optimizer.plateau_factor < 1``: a jitted ``(opt_state, eval_loss) -> opt_state``
    stepping reduce-on-plateau (:func:`optim_jax.observe_plateau`); the optimizer state
    keeps its shardings and is donated (only a few scalars change). None when off."""
    if setup.cfg.optimizer.plateau_factor >= 1:
        return None
    shardings = setup.state_shardings.opt_state
    return jax.jit(optim_jax.observe_plateau, out_shardings=shardings, donate_argnums=0)


def fit(
    cfg: Config,
    workdir: str | pathlib.Path,
    *,
    progress: bool = True,
    stop_after: int | None = None,
    on_eval: Callable[[int, dict[str, float]], bool] | None = None,
) -> dict[str, Any]:
    """Trains ``cfg`` in ``workdir`` (resuming from its newest checkpoint) and returns a summary.

    ``stop_after`` ends the session after that step with a checkpoint, as a
    time-limited job slot would; the next ``fit`` on the workdir carries on to
    ``run.steps`` with the same schedule and data. A SIGTERM (a preemption)
    ends it the same way at the next step boundary, every process at the same
    step, with ``summary["preempted"]`` set.

    ``on_eval(step, record)`` is called after each evaluation with the logged
    record (``eval_loss`` ...); returning True ends the run there, cleanly (a
    final checkpoint, ``summary["stopped"]`` set): how a search prunes a trial.
    """
    workdir = pathlib.Path(workdir)
    setup = build(cfg)
    checkpointer = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    data_spec = setup.batches.spec()
    target = abstract_state(setup.state)
    state, start_step, position = setup.state, 0, DataPosition()
    resumed = checkpointer.resume(target)
    if resumed is not None:
        start_step, state, meta = resumed
        position = DataPosition.from_meta(meta)
        for change in data.spec_changes(meta.get("data", {}), data_spec):
            tqdm.write(f"warning: the data differs from the checkpoint's: {change}")
        tqdm.write(f"resumed from {checkpointer.step_path(start_step)}")

    is_primary = jax.process_index() == 0
    initial = eval_metrics(setup, state.params)
    observe_plateau = _plateau_observer(setup)  # None unless optimizer.plateau_factor < 1
    logger = _Logger(setup, workdir, start_step, is_primary, progress)
    stop_rule = _StopRule(cfg, initial["loss"], stop_after, on_eval)
    stopped = None
    try:
        step = start_step
        in_flight = StepsInFlight()
        while step < cfg.run.steps:
            batch = train_batch(setup, step + position.offset)
            state, step_metrics = setup.train_step(state, batch)
            in_flight.dispatched(step_metrics)
            # A host read each step (a sync), so only for the policy that acts on the host.
            if cfg.run.spike_policy == "rollback" and bool(step_metrics["spike"]):
                rolled_back = _roll_back(cfg, checkpointer, target, step, position)
                if rolled_back is not None:
                    step, state = rolled_back
                    logger.rewind(step)
                    continue
            step += 1
            record = logger.step_done(step, state, step_metrics, batch)
            eval_loss = None if record is None else record.get("eval_loss")
            if eval_loss is not None and observe_plateau is not None:
                state = state._replace(opt_state=observe_plateau(state.opt_state, eval_loss))
            stopped = stop_rule.check(step, record)
            final = step == cfg.run.steps or stopped is not None
            meta = {"data": data_spec, **position.meta()}
            checkpointer.save(step, state, meta, eval_loss=eval_loss, force=final)
            if stopped:
                tqdm.write(stopped)  # on every process: each one's log says why it ended
                break
    finally:
        stop_rule.close()
        logger.close()
    checkpointer.close()
    if is_primary and cfg.run.plot:
        metrics.plot(workdir)
    ending = eval_metrics(setup, state.params)
    return {
        "initial_eval_loss": initial["loss"],
        "final_eval_loss": ending["loss"],
        "initial_eval_accuracy": initial["accuracy"],
        "final_eval_accuracy": ending["accuracy"],  # of the next token, for a language model
        "unit": setup.task.unit,  # what the loss is per: "tokens" or "examples"
        "first_train_loss": logger.first_loss,
        "last_train_loss": logger.last_loss,
        "steps": int(state.step),
        "skipped_steps": int(state.skipped),
        "loss_spikes": int(state.loss_watch.spikes),
        "rollbacks": position.rollbacks,
        "stopped": stopped,
        "preempted": stop_rule.preempted,  # by SIGTERM: the caller should exit to be requeued
        "nonfinite_first": logger.nonfinite_first,  # where the first logged non-finite step broke
        "state": state,
        "config": to_dict(cfg),
    }
