"""The trainer's step against a minimal hand-written Flax + Optax jitted loop, side by side.

Run ``python -m benchmarks.trainer`` (``--help`` for the options). For each recipe
(``configs/<recipe>.yaml``, with ``--override`` applied) it builds two things on
the same mesh, from the same config and seed:

* **trainer**: :func:`train.loop.build`, driven as :func:`train.loop.fit` drives
  it: each step ``batch = loop.train_batch(setup, step)`` (the host loader, then a
  global array made from this process's rows), ``state, metrics =
  setup.train_step(state, batch)`` and fit's wait for the previous step's outputs
  (:class:`train.loop.StepsInFlight`). Building the batch is part of the trainer's
  cost and is timed; what ``fit`` does only every ``run.log_every`` /
  ``eval_every`` / ``checkpoint.every`` steps (logging, evaluation, checkpoints,
  the progress bar) is left out: its cost is set by those intervals, not by the
  trainer's step. The step itself keeps everything the trainer pays on every
  step: the finite check, the loss-spike watch, the skip-on-non-finite select
  over params and optimizer state, the loss scale and the logged metrics.
* **minimal**: the same :class:`train.models.gpt.GPT` built under the same mesh
  and logical-axis rules, ``optax.chain(clip_by_global_norm, adamw)`` with the
  recipe's hyperparameters, schedule and weight-decay mask (kernels only), and a
  plain ``jax.jit`` step over ``nnx.split`` params: loss (float32 cross-entropy),
  ``jax.value_and_grad``, ``tx.update``, ``optax.apply_updates``, with the
  params' shardings, the optimizer state sharded like the params, and params and
  state donated. It is fed pre-made global batch arrays (the trainer's batches,
  made before timing starts), so it pays nothing on the host. With
  ``--minimal-optimizer optim_jax`` it calls optim_jax's ``clip_by_global_norm``
  and ``adamw`` (the trainer's optimizer) instead of Optax's: then the ratio is
  the trainer's overhead alone, not also the two libraries' difference in speed
  (optim_jax folds the clipping into the AdamW kernels; benchmarks/optimizers.py).

Timing: after a first call (its wall time, compilation included, is reported as
the compile time) and ``--warmup`` untimed steps, each side runs windows of
``--window`` consecutive steps, each window timed to ``jax.block_until_ready``
of the side's state: dispatch is asynchronous in ``fit`` too, which only waits
when it logs. Windows alternate between the two sides (order reversed every
round) so that load from other processes hits both alike. Step time is the
median over windows of (window time / window steps); tokens/s = tokens per step
/ step time; MFU = tokens/s x model FLOPs per token
(:func:`train.metrics.model_flops_per_token`) / the summed peak of the mesh's
devices in the compute dtype (None on CPU: no peak is known). Minor page faults
are counted over the same windows (per step; on CPU they tell the temporaries
XLA maps afresh each step). The last column,
trainer/minimal tokens/s, is the trainer's efficiency (target: >= 0.97); the
JSON and the summary also give the paired ratio, the median over rounds of the
ratio of the two back-to-back windows, which drifting load disturbs less.

Fairness is recorded with the numbers: both sides' loss on the first step (batch
0, the same initial parameters) and on the last (both ran the same steps on the
same batches), and the largest parameter difference at the end. Agreement up to
the compute dtype's rounding shows the two train the same model with the same
update rule on the same data.

On CPU the benchmark uses 8 simulated devices (set before JAX starts) and by
default runs the default recipe only: a GPT-2-small step is about 28 TFLOP
(32 x 1024 tokens), minutes on a CPU
(``--recipes gpt2_small`` with ``--override gpt2_small:model.n_layers=2 ...`` to
shrink it; every override is recorded). Results go to stdout and, as JSON and
Markdown, to ``--out`` (default ``benchmarks/results/``) under
``trainer_<device kind>_<date>_<time>.{json,md}``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optim_jax
from benchmarks import report

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
RECIPES = ("default", "gpt2_small")
SIDES = ("trainer", "minimal")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
CPU_DEVICES = 8
RATIO = "ratio trainer/minimal tok/s"

# --quick: a one-layer GPT that compiles and steps in a second or two on a CPU (the tests).
QUICK_OVERRIDES = (
    "model.n_layers=1",
    "model.d_model=32",
    "model.n_heads=2",
    "model.seq_len=16",
    "model.vocab_size=256",
    "data.batch_size=16",
    "data.max_bytes=200000",
    "optimizer.warmup_steps=1",
    "run.steps=100",
)

# Optimizer settings the minimal loop reproduces; anything else would make it a different
# optimizer than the trainer's, and the comparison meaningless.
SUPPORTED_SCHEDULES = ("warmup_cosine_decay", "constant")
# Whose clip + AdamW functions the minimal loop calls (--minimal-optimizer).
MINIMAL_OPTIMIZERS = ("optax", "optim_jax")


class UnsupportedRecipeError(ValueError):
    """The recipe uses something the minimal loop does not reproduce."""


# ----------------------------------------------------------------------------- minimal loop


def _adamw_hyperparameters(options: dict[str, Any]) -> dict[str, Any]:
    """b1, b2, eps, weight_decay of the trainer's ``optim_jax.adamw``: its defaults, overridden
    by ``optimizer.options`` (the two libraries' defaults differ: weight decay 0.01 vs 1e-4)."""
    import inspect

    import optim_jax

    names = ("b1", "b2", "eps", "weight_decay")
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise UnsupportedRecipeError(
            f"optimizer.options {unknown}: the minimal loop has no such option"
        )
    defaults = inspect.signature(optim_jax.adamw).parameters
    return {name: options.get(name, defaults[name].default) for name in names}


def check_supported(cfg: Any) -> None:
    """Raises :class:`UnsupportedRecipeError` unless the minimal loop can train ``cfg`` exactly as
    the trainer does: a GPT, AdamW (+ optional clipping), one of the supported schedules,
    no accumulation, groups, wrappers or loss scaling."""
    opt = cfg.optimizer
    problems = []
    if cfg.model.kind != "gpt":
        problems.append(f"model.kind={cfg.model.kind!r} (only gpt)")
    if opt.name != "adamw":
        problems.append(f"optimizer.name={opt.name!r} (only adamw)")
    if opt.schedule not in SUPPORTED_SCHEDULES:
        problems.append(f"optimizer.schedule={opt.schedule!r} (only {SUPPORTED_SCHEDULES})")
    if opt.accumulation_steps != 1:
        problems.append(f"optimizer.accumulation_steps={opt.accumulation_steps} (only 1)")
    if opt.groups:
        problems.append("optimizer.groups")
    if opt.sam_rho > 0 or opt.lookahead_steps > 0 or opt.plateau_factor < 1:
        problems.append("SAM / Lookahead / reduce-on-plateau")
    if opt.cycle_momentum:
        problems.append("optimizer.cycle_momentum")
    if cfg.precision.compute == "float16":
        problems.append("precision.compute=float16 (loss scaling)")
    if problems:
        raise UnsupportedRecipeError("the minimal loop does not reproduce: " + "; ".join(problems))
    _adamw_hyperparameters(opt.options)


def minimal_optimizer(cfg: Any, library: str = "optax") -> optax.GradientTransformation:
    """``clip_by_global_norm`` + ``adamw`` with the recipe's hyperparameters and schedule;
    weight decay on the matmul kernels only (what the trainer's default ``decay_mask`` gives on
    the GPT: biases, norm scales and embeddings are not decayed).

    ``library``: ``optax`` (the brief's minimal loop) or ``optim_jax`` (the trainer's own
    optimizer functions, so that the ratio measures the trainer alone and not optim_jax's
    faster clipped AdamW; see benchmarks/optimizers.py).
    """
    if library not in MINIMAL_OPTIMIZERS:
        raise ValueError(f"library must be one of {MINIMAL_OPTIMIZERS}, got {library!r}")
    opt, total = cfg.optimizer, cfg.run.steps
    peak = opt.learning_rate
    hyper = _adamw_hyperparameters(opt.options)
    if library == "optim_jax":
        import optim_jax

        if opt.schedule == "constant":
            lr = optim_jax.constant(peak)
        else:
            lr = optim_jax.warmup_cosine_decay(
                0.0, peak, opt.warmup_steps, total, peak * opt.end_lr_fraction
            )
        mask = optim_jax.decay_mask if opt.decay_mask else None
        tx = optim_jax.adamw(lr, mask=mask, **hyper)
        if opt.clip_norm is None:
            return tx
        return optax.chain(optim_jax.clip_by_global_norm(opt.clip_norm), tx)
    if opt.schedule == "constant":
        schedule = optax.constant_schedule(peak)
    else:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, peak, opt.warmup_steps, total, peak * opt.end_lr_fraction
        )

    def kernels(params: Any) -> Any:
        def is_kernel(path: tuple, _leaf: Any) -> bool:
            return any(getattr(key, "key", None) == "kernel" for key in path)

        return jax.tree_util.tree_map_with_path(is_kernel, params)

    adamw = optax.adamw(schedule, mask=kernels if opt.decay_mask else None, **hyper)
    if opt.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(opt.clip_norm), adamw)


class MinimalLoop:
    """The hand-written loop: GPT params, optimizer state and a plain jitted, donating step."""

    def __init__(self, setup: Any, library: str = "optax"):
        from train import mesh as mesh_lib
        from train import precision
        from train.models.gpt import GPT

        cfg = setup.cfg
        check_supported(cfg)
        mesh = setup.mesh
        rules = mesh_lib.rules_tuple(cfg.mesh.rules)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            model = GPT(cfg.model, precision.compute_dtype(cfg.precision), nnx.Rngs(cfg.run.seed))
        graphdef, params = nnx.split(model, nnx.Param)
        params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        tx = minimal_optimizer(cfg, library)

        replicated = NamedSharding(mesh, P())
        param_shardings = jax.tree.map(lambda x: x.sharding, params)
        # Moments sharded like their parameters (jit(tx.init) alone may replicate them).
        state_shardings = optax.tree_map_params(
            tx,
            lambda _, sharding: sharding,
            jax.eval_shape(tx.init, params),
            param_shardings,
            transform_non_params=lambda _: replicated,
        )
        with jax.set_mesh(mesh):
            opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
        self.batch_sharding = NamedSharding(mesh, P(mesh_lib.BATCH_AXES))

        def loss_fn(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
            logits = nnx.merge(graphdef, params)(batch["inputs"]).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

        def step(params: Any, opt_state: Any, batch: dict[str, jax.Array]):
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self.step_fn = jax.jit(
            step,
            in_shardings=(param_shardings, state_shardings, self.batch_sharding),
            out_shardings=(param_shardings, state_shardings, replicated),
            donate_argnums=(0, 1),
        )
        self.params, self.opt_state = params, opt_state
        self.param_shardings, self.state_shardings = param_shardings, state_shardings

    def device_batch(self, setup: Any, step: int) -> dict[str, jax.Array]:
        """The trainer's batch of ``step`` as ``[batch, seq]`` global arrays (no micro axis)."""
        from train import loop

        local = setup.batches.local_batch(step)
        return loop.global_batch(setup, local, self.batch_sharding, batch_axis=loop.EVAL_BATCH_AXIS)

    def __call__(self, batch: dict[str, jax.Array]) -> jax.Array:
        self.params, self.opt_state, loss = self.step_fn(self.params, self.opt_state, batch)
        return loss


# ----------------------------------------------------------------------------- the two sides


class TrainerSide:
    """``fit``'s per-step work: make the step's batch, run the jitted train step."""

    def __init__(self, setup: Any):
        from train import loop

        self.setup, self.state, self.next_step = setup, setup.state, 0
        self.metrics: dict[str, jax.Array] = {}
        self.in_flight = loop.StepsInFlight()

    def step(self) -> None:
        from train import loop

        batch = loop.train_batch(self.setup, self.next_step)
        self.state, self.metrics = self.setup.train_step(self.state, batch)
        self.in_flight.dispatched(self.metrics)
        self.next_step += 1

    def sync(self) -> None:
        jax.block_until_ready((self.state, self.metrics))

    def loss(self) -> float:
        return float(self.metrics["loss"])


class MinimalSide:
    """The minimal loop over pre-made device batches (the trainer's, step for step)."""

    def __init__(self, loop: MinimalLoop, batches: list[dict[str, jax.Array]]):
        self.loop, self.batches, self.next_step = loop, batches, 0
        self.last_loss: jax.Array | None = None

    def step(self) -> None:
        self.last_loss = self.loop(self.batches[self.next_step % len(self.batches)])
        self.next_step += 1

    def sync(self) -> None:
        jax.block_until_ready((self.loop.params, self.loop.opt_state, self.last_loss))

    def loss(self) -> float:
        return float(self.last_loss)


Side = TrainerSide | MinimalSide


def first_call_s(side: Side) -> float:
    """Wall time of the first step: trace, compile and one execution."""
    start = time.perf_counter()
    side.step()
    side.sync()
    return time.perf_counter() - start


def time_window(side: Side, steps: int) -> tuple[float, float | None]:
    """Seconds and minor page faults per step over ``steps`` consecutive steps, each side
    dispatching as it does (the trainer waiting for the step before, as ``fit``; the minimal
    loop not at all), then one sync (faults None where the OS does not count them)."""
    with report.PageFaults() as faults:
        start = time.perf_counter()
        for _ in range(steps):
            side.step()
        side.sync()
        seconds = time.perf_counter() - start
    return seconds / steps, None if faults.count is None else faults.count / steps


def time_interleaved(
    sides: dict[str, Side], warmup: int, windows: int, steps: int
) -> tuple[dict[str, list[float]], dict[str, list[float | None]]]:
    """Per-step times and page faults of each window of ``steps`` steps; windows alternate
    between sides, order reversed every round."""
    for _ in range(warmup):
        for side in sides.values():
            side.step()
            side.sync()
    samples: dict[str, list[float]] = {name: [] for name in sides}
    faults: dict[str, list[float | None]] = {name: [] for name in sides}
    names = list(sides)
    for i in range(windows):
        for name in names if i % 2 == 0 else names[::-1]:
            seconds, count = time_window(sides[name], steps)
            samples[name].append(seconds)
            faults[name].append(count)
    return samples, faults


# ----------------------------------------------------------------------------- one recipe


def recipe_config(recipe: str, overrides: Sequence[str]) -> Any:
    from train import config

    return config.load(CONFIGS / f"{recipe}.yaml", list(overrides))


def bench_recipe(
    recipe: str,
    overrides: Sequence[str],
    warmup: int,
    windows: int,
    window: int,
    library: str = "optax",
) -> dict[str, Any]:
    """Builds both sides of ``recipe`` and times them; returns the record of one table row."""
    from train import loop, metrics, precision
    from train.models import gpt

    cfg = recipe_config(recipe, overrides)
    check_supported(cfg)
    setup = loop.build(cfg)
    minimal = MinimalLoop(setup, library)
    total_steps = 1 + warmup + windows * window
    batches = [minimal.device_batch(setup, s) for s in range(total_steps)]
    sides: dict[str, Side] = {
        "trainer": TrainerSide(setup),
        "minimal": MinimalSide(minimal, batches),
    }

    compile_s = {name: first_call_s(side) for name, side in sides.items()}
    # Both sides' first step trained on batch 0 from the same initial parameters.
    first_loss = {name: side.loss() for name, side in sides.items()}
    samples, faults = time_interleaved(sides, warmup, windows, window)
    for side in sides.values():
        side.sync()
    # Both ran the same steps on the same batches: their losses and parameters still agree
    # (up to rounding) if they apply the same update rule.
    last_loss = {name: side.loss() for name, side in sides.items()}
    # optimizer.flat_layout: the trainer's params are FlatParams; compare them per leaf.
    trainer_params = optim_jax.flat.unflatten(sides["trainer"].state.params)
    minimal_params = minimal.params
    param_diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(
            jax.tree.leaves(trainer_params), jax.tree.leaves(minimal_params), strict=True
        )
    )

    step_s = {name: statistics.median(ts) for name, ts in samples.items()}
    tokens_per_step = cfg.data.batch_size * cfg.optimizer.accumulation_steps * cfg.model.seq_len
    tokens_per_s = {name: tokens_per_step / s for name, s in step_s.items()}
    devices = list(setup.mesh.devices.flat)
    peak = metrics.total_peak_flops(devices, precision.compute_dtype(cfg.precision))
    mfu = {name: metrics.mfu(t, setup.flops_per_unit, peak) for name, t in tokens_per_s.items()}
    return {
        "recipe": recipe,
        "overrides": list(overrides),
        "minimal_optimizer": library,
        "model": {
            "n_layers": cfg.model.n_layers,
            "d_model": cfg.model.d_model,
            "n_heads": cfg.model.n_heads,
            "seq_len": cfg.model.seq_len,
            "vocab_size": cfg.model.vocab_size,
            "remat": cfg.model.remat,
            "attention": gpt.attention_implementation(
                cfg.model, precision.compute_dtype(cfg.precision)
            ),
        },
        "compute_dtype": cfg.precision.compute,
        "mesh": dict(setup.mesh.shape),
        "batch_size": cfg.data.batch_size,
        "tokens_per_step": tokens_per_step,
        "matmul_params": setup.n_params,
        "flops_per_token": setup.flops_per_unit,
        "peak_flops": peak,
        "compile_s": compile_s,
        "first_loss": first_loss,
        "steps_run": total_steps,
        "last_loss": last_loss,
        "param_max_abs_diff": param_diff,
        "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "ratio": tokens_per_s["trainer"] / tokens_per_s["minimal"],
        # Median over rounds of the two sides' back-to-back windows: steadier than the ratio
        # of medians when the machine's load drifts during the run.
        "ratio_paired": statistics.median(
            m / t for t, m in zip(samples["trainer"], samples["minimal"], strict=True)
        ),
        "samples_s": samples,
        "page_faults_per_step": {name: report.faults_per_step(f) for name, f in faults.items()},
    }


# ----------------------------------------------------------------------------- tables


def _mfu(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _faults(record: dict[str, Any]) -> str:
    counts = record["page_faults_per_step"]
    return " / ".join("-" if counts[s] is None else f"{counts[s]:,.0f}" for s in SIDES)


COLUMNS: list[report.Column] = [
    ("recipe", lambda r: r["recipe"] + (" *" if r["overrides"] else "")),
    ("mesh", lambda r: "x".join(str(n) for n in r["mesh"].values())),
    ("tokens/step", lambda r: str(r["tokens_per_step"])),
    ("trainer ms", lambda r: f"{1e3 * r['step_s']['trainer']:.1f}"),
    ("minimal ms", lambda r: f"{1e3 * r['step_s']['minimal']:.1f}"),
    ("trainer tok/s", lambda r: f"{r['tokens_per_s']['trainer']:,.0f}"),
    ("minimal tok/s", lambda r: f"{r['tokens_per_s']['minimal']:,.0f}"),
    ("trainer compile s", lambda r: f"{r['compile_s']['trainer']:.2f}"),
    ("minimal compile s", lambda r: f"{r['compile_s']['minimal']:.2f}"),
    ("page faults/step trainer / minimal", _faults),
    ("trainer MFU", lambda r: _mfu(r["mfu"]["trainer"])),
    ("minimal MFU", lambda r: _mfu(r["mfu"]["minimal"])),
    (RATIO, lambda r: f"{r['ratio']:.3f}"),
]


def summary_lines(result: dict[str, Any]) -> list[str]:
    meta = result["meta"]
    lines = [
        *report.machine_lines(meta),
        f"timing: first call = compile (+ one step); {meta['warmup']} warm-up steps; median of "
        f"{meta['windows']} windows of {meta['window']} steps per side, interleaved",
        f"minimal loop: jax.jit + {meta['minimal_optimizer']} clip_by_global_norm + adamw",
    ]
    for record in result["records"]:
        if record["overrides"]:
            lines.append(f"* {record['recipe']} with overrides: {' '.join(record['overrides'])}")
        first, last = record["first_loss"], record["last_loss"]
        lines.append(
            f"{record['recipe']}: attention {record['model']['attention']}, remat "
            f"{record['model']['remat']}; loss of step 1 trainer {first['trainer']:.6f} / minimal "
            f"{first['minimal']:.6f}, of step {record['steps_run']} {last['trainer']:.6f} / "
            f"{last['minimal']:.6f}; largest parameter difference after it "
            f"{record['param_max_abs_diff']:.2e} (same batches, same initial parameters); "
            f"paired ratio (median of per-round ratios) {record['ratio_paired']:.3f}"
        )
    return lines


def format_report(result: dict[str, Any], markdown: bool) -> str:
    table = report.render(result["table"], markdown)
    if markdown:
        return "\n".join(
            ["# optim_jax trainer vs a minimal Flax + Optax loop", ""]
            + [f"- {line}" for line in summary_lines(result)]
            + ["", "## Throughput (last column: trainer / minimal tokens/s; 1 = no overhead)"]
            + ["", table, ""]
        )
    return "\n".join(
        summary_lines(result)
        + ["", "Throughput (last column: trainer / minimal tokens/s; 1 = no overhead)", table, ""]
    )


def split_overrides(overrides: Sequence[str], recipes: Sequence[str]) -> dict[str, list[str]]:
    """``--override`` values per recipe: ``recipe:key=value`` for one, ``key=value`` for all."""
    per_recipe: dict[str, list[str]] = {name: [] for name in recipes}
    for text in overrides:
        head, sep, rest = text.partition(":")
        if sep and "=" not in head:
            if head not in RECIPES:
                raise ValueError(f"--override {text!r}: unknown recipe {head!r}")
            if head in per_recipe:
                per_recipe[head].append(rest)
        else:
            for name in per_recipe:
                per_recipe[name].append(text)
    return per_recipe


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.trainer",
        description="The trainer's tokens/s, step time, compile time and MFU against a minimal "
        "hand-written Flax + Optax loop on the same model, batch and mesh.",
    )
    parser.add_argument(
        "--recipes",
        type=report.names_from(RECIPES, "recipe"),
        default=None,
        help=f"comma-separated subset of {','.join(RECIPES)} (default: all on an accelerator, "
        "default only on CPU)",
    )
    parser.add_argument(
        "--steps",
        type=report.positive_int,
        default=40,
        help="timed steps per side (rounded up to windows)",
    )
    parser.add_argument(
        "--window", type=report.positive_int, default=5, help="steps per timed window"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="[RECIPE:]KEY=VALUE",
        help="config override for every recipe, or for one with a RECIPE: prefix (repeatable)",
    )
    parser.add_argument(
        "--minimal-optimizer",
        choices=MINIMAL_OPTIMIZERS,
        default="optax",
        help="whose clip_by_global_norm + adamw the minimal loop calls: optax (default), or "
        "optim_jax (the trainer's, so the ratio is the trainer's overhead alone)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a one-layer 32-wide GPT, 2 windows of 2 steps, 1 warm-up step (for the tests)",
    )
    parser.add_argument(
        "--cpu-devices",
        type=report.positive_int,
        default=CPU_DEVICES,
        help="simulated devices when JAX runs on CPU (ignored if XLA_FLAGS sets a count)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.quick:
        args.override = [*QUICK_OVERRIDES, *args.override]
        args.steps, args.window, args.warmup = 4, 2, 1
    try:
        split_overrides(args.override, RECIPES)
    except ValueError as err:
        parser.error(str(err))
    return args


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Benchmarks every recipe and returns the result (records, table, metadata)."""
    import flax

    recipes = args.recipes
    if recipes is None:
        recipes = ["default"] if jax.devices()[0].platform == "cpu" else list(RECIPES)
    windows = math.ceil(args.steps / args.window)
    meta = report.environment() | {
        "flax": flax.__version__,
        "command": command,
        "load_start": report.load_average(),
        "warmup": args.warmup,
        "windows": windows,
        "window": args.window,
        "minimal_optimizer": args.minimal_optimizer,
    }
    records = []
    for recipe, overrides in split_overrides(args.override, recipes).items():
        _progress(f"benchmarking recipe {recipe} {' '.join(overrides)}".rstrip())
        records.append(
            bench_recipe(
                recipe, overrides, args.warmup, windows, args.window, args.minimal_optimizer
            )
        )
    meta["load_end"] = report.load_average()
    return {"meta": meta, "records": records, "table": report.build_table(COLUMNS, records)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from train import cli

    # Before JAX starts a backend; a no-op when the backend already runs with a count set.
    cli.use_simulated_cpu_devices(args.cpu_devices)
    # Compile times must not come from a persistent compilation cache (JAX settles this at a
    # process's first compile, so it holds when main is the first, as on the command line).
    jax.config.update("jax_enable_compilation_cache", False)
    result = run(args, report.command_line("benchmarks.trainer", argv))
    report.publish(result, args.out, "trainer", format_report)
    return result


if __name__ == "__main__":
    main()
