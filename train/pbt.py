"""``python -m train.pbt --config FILE [key=value ...] --workdir DIR``: population-based training.

Population-based training (Jaderberg et al. 2017, "Population Based Training of Neural
Networks", arXiv:1711.09846): ``pbt.population`` copies of one run train side by side; every
``pbt.interval`` steps each is evaluated, and each member of the worst ``pbt.quantile`` (by
eval loss) copies the parameters *and* optimizer state of a member of the best
``pbt.quantile`` drawn at random (exploit, "truncation selection" in the paper), then
multiplies every searched hyperparameter by a factor drawn from ``pbt.perturb`` (explore,
"perturb": 0.8 or 1.25 in the paper), clipped to the entry's ``min`` / ``max``.

How it is built here:

* **One compiled step for the whole population.** The project's own step
  (:func:`train.step.make_train_step`) is ``jax.vmap``-ed over a leading population axis of the
  whole :class:`~train.step.TrainState` (params, optimizer state, loss scale, spike watch), and
  jitted once.
* **Hyperparameters are state.** The optimizer is the run's own
  (:func:`train.optimizer.make_optimizer`: clipping, decay mask, groups, schedule) wrapped in
  :func:`optim_jax.inject_hyperparams`, so each member's searched values are scalars in
  ``opt_state.hyperparams`` (one entry per member after the vmap) and exploit/explore writes
  them without recompiling. ``optimizer.learning_rate`` is the schedule's peak: a member's
  learning rate at step t is its value times the config's schedule shape at t.
* **Data and initialisation.** Every member trains on the same batch stream (the run's
  ``train.loop`` loaders) from the same initial parameters (``run.seed``): members differ only
  in their hyperparameters and in what exploit copied into them, so a member that is never
  replaced follows exactly the trajectory it would follow alone.
* **Layout.** By default the population axis is replicated and each member is data-parallel
  over the mesh as in ``python -m train``; with ``pbt.shard_population`` the population axis is
  split over the mesh's ``data`` axis (``pbt.population`` a multiple of its size) and every
  device trains its members on the whole (replicated) batch.
* **Randomness.** Initial draws, the choice of source member and the perturbation factors come
  from ``numpy.random.default_rng(pbt.seed)``, in a fixed order.

Writes into the workdir: ``pbt.json`` (per-member eval loss and hyperparameters at every
interval, every exploit event, each member's lineage, the final ranking), ``pbt.png``
(hyperparameters and eval loss against step per member, coloured by final rank) and
``best/<steps>`` (an orbax checkpoint of the best member's final state).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optim_jax
from train import cli, loop, loss_spikes, metrics
from train import mesh as mesh_lib
from train.config import Config, ConfigError, SearchRange, pbt_search_space
from train.optimizer import OPTIMIZERS, make_momentum_schedule, make_optimizer, make_schedule
from train.step import TrainState, make_eval_step, make_train_step

POPULATION_AXIS = "data"  # the mesh axis members are split over with pbt.shard_population


def injected_name(key: str) -> str:
    """``optimizer.learning_rate`` -> ``learning_rate``; ``optimizer.options.b1`` -> ``b1``: the
    name of the searched value in ``opt_state.hyperparams``."""
    return key.rsplit(".", 1)[-1]


def _check_searchable(cfg: Config, space: dict[str, SearchRange]) -> None:
    """Each ``optimizer.options.<name>`` must be a hyperparameter the optimizer takes as a
    schedule: only those can change inside a compiled step."""
    accepted = inspect.signature(OPTIMIZERS[cfg.optimizer.name]).parameters
    for key in space:
        name = injected_name(key)
        if key == "optimizer.learning_rate":
            continue
        if name not in accepted or "Schedule" not in str(accepted[name].annotation):
            searchable = [
                k
                for k, p in accepted.items()
                if "Schedule" in str(p.annotation) and k != "learning_rate"
            ]
            raise ConfigError(
                f"pbt.hyperparams.{key}: {cfg.optimizer.name} has no hyperparameter {name!r} "
                f"that can change during training (it has: {', '.join(searchable) or 'none'})"
            )


def population_optimizer(cfg: Config, space: dict[str, SearchRange], values: dict[str, float]):
    """The run's optimizer with the searched hyperparameters held in its state.

    Returns ``(tx, schedule_shape)``: ``tx`` is :func:`train.optimizer.make_optimizer` of the
    config with ``optimizer.learning_rate`` and the searched ``optimizer.options`` replaced by
    injected values (``values``, keyed by :func:`injected_name`, are the ones it is built
    and checked with); ``schedule_shape`` is the config's learning-rate schedule with peak 1.
    """
    opt = cfg.optimizer
    names = [injected_name(key) for key in space]
    shape = make_schedule(dataclasses.replace(opt, learning_rate=1.0), cfg.run.steps)
    momentum = make_momentum_schedule(opt, cfg.run.steps)

    def factory(**hyperparams: Any):
        peak = hyperparams.get("learning_rate", opt.learning_rate)

        def schedule(count):
            return optim_jax.base.resolve(peak, count) * shape(count)

        options = {**opt.options, **{k: v for k, v in hyperparams.items() if k != "learning_rate"}}
        return make_optimizer(dataclasses.replace(opt, options=options), schedule, momentum)

    # inject_hyperparams injects the arguments annotated as schedules: give the factory a
    # signature naming exactly the searched ones.
    factory.__signature__ = inspect.Signature(
        [
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, annotation=optim_jax.base.ScalarOrSchedule
            )
            for name in names
        ]
    )
    try:
        tx = optim_jax.inject_hyperparams(factory)(**values)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"pbt.hyperparams ({opt.name}): {err}") from None
    return tx, shape


def initial_hyperparams(
    space: dict[str, SearchRange], population: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Each member's first values, float32 (as stored): log-uniform or uniform draws, key by
    key in the order of ``pbt.hyperparams``."""
    values = {}
    for key, spec in space.items():
        if spec.distribution == "log_uniform":
            draw = np.exp(rng.uniform(math.log(spec.low), math.log(spec.high), population))
        else:
            draw = rng.uniform(spec.low, spec.high, population)
        values[key] = np.clip(draw, spec.low, spec.high).astype(np.float32)
    return values


@dataclasses.dataclass
class ExploitPlan:
    """What one exploit/explore round does: ``source[i]`` is the member whose state member
    ``i`` takes (``i`` itself when it keeps its own) and ``hyperparams`` the values every member
    trains on next."""

    source: np.ndarray  # int32 [population]
    hyperparams: dict[str, np.ndarray]  # dotted key -> float32 [population]
    replaced: list[int]  # members of the bottom quantile, ascending


def plan_exploit(
    eval_losses: np.ndarray,
    hyperparams: dict[str, np.ndarray],
    space: dict[str, SearchRange],
    quantile: float,
    perturb: list[float],
    rng: np.random.Generator,
) -> ExploitPlan:
    """Truncation selection and perturbation (the paper's section 3.1 / 4.1 choices).

    Members are ranked by eval loss, a non-finite loss counting as the worst (ties: the lower
    index ranks better); the ``floor(quantile * population)`` worst each copy a member drawn
    uniformly from as many best, then every searched value is the source's times a factor
    drawn uniformly from ``perturb``, clipped to the entry's [min, max].
    """
    population = len(eval_losses)
    count = int(quantile * population)
    losses = np.where(np.isfinite(eval_losses), eval_losses, np.inf)
    order = np.argsort(losses, kind="stable")
    top, bottom = order[:count], sorted(int(i) for i in order[population - count :])
    source = np.arange(population, dtype=np.int32)
    new = {key: value.astype(np.float32).copy() for key, value in hyperparams.items()}
    for member in bottom:
        parent = int(rng.choice(top))
        source[member] = parent
        for key, spec in space.items():
            factor = float(rng.choice(perturb))
            value = float(hyperparams[key][parent]) * factor
            new[key][member] = np.float32(min(max(value, spec.minimum), spec.maximum))
    return ExploitPlan(source, new, bottom)


@dataclasses.dataclass
class Population:
    """The compiled pieces of a population run (see :func:`build_population`)."""

    setup: loop.Setup  # the single-member run it was built from (loaders, mesh, model)
    space: dict[str, SearchRange]
    state: TrainState  # every leaf with a leading [population] axis
    state_shardings: Any
    batch_sharding: NamedSharding
    eval_sharding: NamedSharding
    train_step: Any  # jitted (state, batch) -> (state, metrics [population])
    eval_step: Any  # jitted (params, batch) -> {"loss", "accuracy"} [population]
    exploit: Any  # jitted (state, source, {name: values}) -> state

    def hyperparams(self, state: TrainState | None = None) -> dict[str, np.ndarray]:
        """Each member's searched values as stored on the devices, by dotted key."""
        stored = jax.device_get((self.state if state is None else state).opt_state.hyperparams)
        return {key: np.asarray(stored[injected_name(key)]) for key in self.space}

    def batch(self, step: int) -> dict:
        local = self.setup.batches.local_batch(step)
        if self.setup.cfg.optimizer.accumulation_steps == 1:
            local = {k: v[None] for k, v in local.items()}
        return loop.global_batch(
            self.setup, local, self.batch_sharding, batch_axis=loop.TRAIN_BATCH_AXIS
        )

    def evaluate(self, params: Any) -> dict[str, np.ndarray]:
        """Each member's mean eval loss and accuracy over the evaluation batches."""
        results = [
            self.eval_step(
                params,
                loop.global_batch(
                    self.setup, batch, self.eval_sharding, batch_axis=loop.EVAL_BATCH_AXIS
                ),
            )
            for batch in self.setup.eval_batches
        ]
        results = jax.device_get(results)
        return {key: np.mean([r[key] for r in results], axis=0) for key in results[0]}

    def member(self, index: int, state: TrainState | None = None) -> TrainState:
        """One member's state (no population axis)."""
        return jax.tree.map(lambda x: x[index], self.state if state is None else state)


def _with_population_axis(sharding: Any, mesh: jax.sharding.Mesh, axis: str | None):
    spec = sharding.spec if isinstance(sharding, NamedSharding) else P()
    return NamedSharding(mesh, P(axis, *spec))


def build_population(cfg: Config, rng: np.random.Generator | None = None) -> Population:
    """The population of ``cfg`` with initial hyperparameters drawn from ``rng`` (default:
    ``numpy.random.default_rng(pbt.seed)``)."""
    space = pbt_search_space(cfg.pbt)
    _check_searchable(cfg, space)
    if cfg.run.spike_policy == "rollback":
        raise ConfigError(
            "run.spike_policy=rollback needs checkpoints of a single run; under pbt use warn "
            "or skip"
        )
    if cfg.optimizer.flat_layout:
        raise ConfigError(
            "optimizer.flat_layout=true: pbt stacks the members' per-leaf state along a "
            "population axis and does not support the flat layout; set it to false"
        )
    rng = np.random.default_rng(cfg.pbt.seed) if rng is None else rng
    size = cfg.pbt.population
    first = initial_hyperparams(space, size, rng)
    setup = loop.build(cfg)
    mesh = setup.mesh
    axis = None
    if cfg.pbt.shard_population:
        axis = POPULATION_AXIS
        if size % mesh.shape[axis]:
            raise ConfigError(
                f"pbt.shard_population: pbt.population={size} must be a multiple of the mesh's "
                f"{axis} axis ({mesh.shape[axis]} devices)"
            )

    tx, shape = population_optimizer(
        cfg, space, {injected_name(k): float(v[0]) for k, v in first.items()}
    )
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init)(setup.state.params)
    # The optimizer's buffers start from the params alone (zeros, counts); only the stored
    # hyperparameters differ between members, so one init is broadcast and they are written.
    member = setup.state._replace(opt_state=opt_state)
    shardings = jax.tree.map(lambda x: _with_population_axis(x.sharding, mesh, axis), member)
    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (size, *x.shape)), member)
    stored = dict(stacked.opt_state.hyperparams)
    for key, values in first.items():
        stored[injected_name(key)] = values.astype(stored[injected_name(key)].dtype)
    stacked = stacked._replace(opt_state=stacked.opt_state._replace(hyperparams=stored))
    state = jax.device_put(stacked, shardings)

    replicated = mesh_lib.replicated(mesh)
    if axis is None:
        batch_sharding, eval_sharding = (
            setup.batch_sharding,
            NamedSharding(mesh, P(mesh_lib.BATCH_AXES)),
        )
    else:  # members over the data axis: every device needs the whole batch
        batch_sharding = eval_sharding = replicated
    spike_rule = loss_spikes.SpikeRule(
        factor=cfg.run.loss_spike_factor,
        window=cfg.run.spike_window,
        discard=cfg.run.spike_policy == "skip",
    )
    step_fn = make_train_step(
        setup.graphdef,
        tx,
        cfg.precision,
        cfg.optimizer.accumulation_steps,
        shape,  # the logged "learning_rate" is the schedule's shape; members' peaks are state
        spike_rule,
        hessian_seed=cfg.run.seed if cfg.optimizer.name == "sophia" else None,
        task=setup.task,
    )
    train_step = jax.jit(
        jax.vmap(step_fn, in_axes=(0, None)),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        jax.vmap(make_eval_step(setup.graphdef, setup.task), in_axes=(0, None)),
        in_shardings=(shardings.params, eval_sharding),
        out_shardings=replicated,
    )

    def exploit_fn(state: TrainState, source: jax.Array, values: dict[str, jax.Array]):
        # A gather along the population axis: members with source[i] == i read themselves.
        copied = jax.tree.map(lambda x: x[source], state)
        opt = copied.opt_state
        hyperparams = {**opt.hyperparams, **values}
        return copied._replace(opt_state=opt._replace(hyperparams=hyperparams))

    exploit = jax.jit(
        exploit_fn,
        in_shardings=(shardings, replicated, replicated),
        out_shardings=shardings,
        donate_argnums=0,
    )
    return Population(
        setup=setup,
        space=space,
        state=state,
        state_shardings=shardings,
        batch_sharding=batch_sharding,
        eval_sharding=eval_sharding,
        train_step=train_step,
        eval_step=eval_step,
        exploit=exploit,
    )


def apply_plan(population: Population, state: TrainState, plan: ExploitPlan) -> TrainState:
    """``state`` after the exploit/explore round ``plan`` (the input is donated)."""
    values = {injected_name(k): jnp.asarray(v) for k, v in plan.hyperparams.items()}
    return population.exploit(state, jnp.asarray(plan.source, jnp.int32), values)


def _floats(values: np.ndarray) -> list[float | None]:
    """JSON numbers: a non-finite loss is written as null."""
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, np.float64)]


def run(
    cfg: Config,
    workdir: str | pathlib.Path | None = None,
    *,
    save_best: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Trains the population of ``cfg``; returns the record written to ``pbt.json`` (plus the
    final ``state`` under ``"state"``). With ``workdir``: writes ``pbt.json``, ``pbt.png`` and
    (``save_best``) the best member's checkpoint there."""
    started = time.perf_counter()
    rng = np.random.default_rng(cfg.pbt.seed)
    population = build_population(cfg, rng)
    pbt = cfg.pbt
    state = population.state
    hyperparams = population.hyperparams(state)
    lineage = list(range(pbt.population))  # the member whose initial draw each descends from
    records: list[dict] = []
    events: list[dict] = []

    def record(step: int, evaluated: dict[str, np.ndarray] | None) -> None:
        entry: dict[str, Any] = {"step": step}
        if evaluated is not None:
            entry["eval_loss"] = _floats(evaluated["loss"])
            entry["eval_accuracy"] = _floats(evaluated["accuracy"])
        # The values each member trains on from this step on.
        entry["hyperparams"] = {k: _floats(v) for k, v in hyperparams.items()}
        entry["lineage"] = list(lineage)
        records.append(entry)

    record(0, population.evaluate(state.params))
    steps = cfg.run.steps
    in_flight = loop.StepsInFlight()
    for step in range(steps):
        state, step_metrics = population.train_step(state, population.batch(step))
        in_flight.dispatched(step_metrics)
        done = step + 1
        if done % pbt.interval and done != steps:
            continue
        evaluated = population.evaluate(state.params)
        if pbt.exploit and done % pbt.interval == 0 and done != steps:
            plan = plan_exploit(
                evaluated["loss"], hyperparams, population.space, pbt.quantile, pbt.perturb, rng
            )
            state = apply_plan(population, state, plan)
            for member in plan.replaced:
                parent = int(plan.source[member])
                events.append(
                    {
                        "step": done,
                        "member": member,
                        "copied_from": parent,
                        "eval_loss": _floats(evaluated["loss"][[member, parent]]),
                        "hyperparams": {k: float(v[member]) for k, v in plan.hyperparams.items()},
                    }
                )
                lineage[member] = lineage[parent]
            hyperparams = plan.hyperparams
        record(done, evaluated)
        if progress:
            best = np.nanmin(np.where(np.isfinite(evaluated["loss"]), evaluated["loss"], np.nan))
            print(f"step {done}/{steps}: best eval loss {best:.4f}", file=sys.stderr)

    final = records[-1]
    losses = np.array([np.inf if v is None else v for v in final["eval_loss"]])
    ranking = [int(i) for i in np.argsort(losses, kind="stable")]
    best = ranking[0]
    result: dict[str, Any] = {
        "population": pbt.population,
        "interval": pbt.interval,
        "quantile": pbt.quantile,
        "perturb": list(pbt.perturb),
        "exploit": pbt.exploit,
        "shard_population": pbt.shard_population,
        "seed": pbt.seed,
        "steps": steps,
        "search_space": {  # an unbounded min / max is written as null
            k: {
                f: (x if not isinstance(x, float) or math.isfinite(x) else None)
                for f, x in dataclasses.asdict(v).items()
            }
            for k, v in population.space.items()
        },
        "records": records,
        "events": events,
        "final": {
            "eval_loss": final["eval_loss"],
            "eval_accuracy": final["eval_accuracy"],
            "ranking": ranking,  # members from best to worst final eval loss
            "best_member": best,
            "best_eval_loss": final["eval_loss"][best],
            "best_hyperparams": {k: v[best] for k, v in final["hyperparams"].items()},
            "best_lineage": final["lineage"][best],
        },
        "seconds": time.perf_counter() - started,
    }
    if workdir is not None:
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            (workdir / "pbt.json").write_text(json.dumps(result, indent=1, allow_nan=False))
            plot(result, workdir / "pbt.png")
        if save_best:
            _save_member(cfg, workdir / "best", population.member(best, state), result)
    result["state"] = state
    return result


def _save_member(cfg: Config, directory: pathlib.Path, member: TrainState, result: dict) -> None:
    from train.checkpoint import Checkpointer

    meta = {"pbt_member": result["final"]["best_member"], **result["final"]["best_hyperparams"]}
    checkpoint_cfg = dataclasses.replace(cfg.checkpoint, every=0, keep=1)
    with Checkpointer(directory, checkpoint_cfg) as checkpointer:
        checkpointer.save(
            result["steps"],
            member,
            {"pbt": meta},
            eval_loss=result["final"]["best_eval_loss"],
            force=True,
        )


def plot(result: dict, path: str | pathlib.Path) -> pathlib.Path:
    """``pbt.png``: one panel per searched hyperparameter and one of eval loss, against step,
    a line per member coloured by its final rank (darkest: best); x marks an exploit."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    space = result["search_space"]
    keys = list(space)
    fig, axes = plt.subplots(
        len(keys) + 1, 1, figsize=(9, 3 * (len(keys) + 1)), sharex=True, squeeze=False
    )
    axes = axes[:, 0]
    size = result["population"]
    rank = {member: r for r, member in enumerate(result["final"]["ranking"])}
    colours = plt.get_cmap("viridis")
    steps = [r["step"] for r in result["records"]]
    losses_at = {r["step"]: r["eval_loss"] for r in result["records"] if "eval_loss" in r}

    def colour(member: int):
        return colours(rank[member] / max(size - 1, 1) * 0.9)

    for ax, key in zip(axes, keys, strict=False):
        for member in range(size):
            values = [r["hyperparams"][key][member] for r in result["records"]]
            ax.plot(steps, values, drawstyle="steps-post", color=colour(member), lw=1.2)
        for event in result["events"]:
            ax.plot(event["step"], event["hyperparams"][key], "x", color="black", ms=4)
        if space[key]["distribution"] == "log_uniform":
            ax.set_yscale("log")
        ax.set_ylabel(key.removeprefix("optimizer."))
    loss_ax = axes[-1]
    for member in range(size):
        points = [(s, losses_at[s][member]) for s in losses_at if losses_at[s][member] is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            label = f"member {member} (final rank {rank[member] + 1})" if size <= 8 else None
            loss_ax.plot(xs, ys, "o-", ms=2, color=colour(member), lw=1, label=label)
    loss_ax.set_yscale("log")
    loss_ax.set_ylabel("eval loss")
    loss_ax.set_xlabel("step")
    if size <= 8:
        loss_ax.legend(fontsize=7)
    best = result["final"]
    title = (
        f"PBT: {size} members, exploit every {result['interval']} steps"
        if result["exploit"]
        else f"{size} members, no exploit/explore"
    )
    axes[0].set_title(f"{title}; best final eval loss {best['best_eval_loss']:.4g}")
    return metrics.save_figure(fig, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.recipe_parser(
        "python -m train.pbt",
        "Population-based training of a recipe.",
        workdir_help="default: runs/<recipe name>/pbt",
    )
    parser.add_argument("--no-checkpoint", action="store_true", help="do not save the best member")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cli.use_simulated_cpu_devices()
    from train import config as config_lib

    with cli.user_errors():
        cfg = config_lib.load(args.config, list(args.overrides))
        workdir = args.workdir or cli.default_workdir(args.config, "pbt")
        result = run(cfg, workdir, save_best=not args.no_checkpoint, progress=True)
    final = result["final"]
    first = result["records"][0]["eval_loss"]
    print(
        f"{cfg.pbt.population} members, {cfg.run.steps} steps, {len(result['events'])} exploits: "
        f"best final eval loss {final['best_eval_loss']:.4f} (member {final['best_member']}, "
        f"{final['best_hyperparams']}; initial {min(v for v in first if v is not None):.4f}); "
        f"outputs in {workdir}"
    )
    return result


if __name__ == "__main__":
    main()
