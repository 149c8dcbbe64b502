"""``python -m train.lr_find --config FILE [key=value ...] --workdir DIR``: the LR range test.

Smith 2017 ("Cyclical Learning Rates for Training Neural Networks", section 3.3), with
fastai's ``lr_find`` conventions: the learning rate rises exponentially from ``--min-lr`` to
``--max-lr`` over ``--steps`` updates, one batch each, with the config's own optimizer (its
schedule replaced by the ramp); the training loss is smoothed by an exponential moving
average with bias correction; the test stops once the smoothed loss exceeds ``--diverge``
times the best so far (or is not finite); the suggestion is the learning rate where the
smoothed loss falls fastest against log(lr) (the most negative d loss / d log lr), skipping
the first tenth of the planned steps and the last 5 recorded ones, as fastai does, and looking
no further than the lowest smoothed loss (a fall past it is the recovery from a spike).

The run's state is not touched: the test trains a throwaway copy of the model built from the
config, writes no checkpoint, and leaves only ``lr_find.json`` (lrs, losses, smoothed,
suggestion) and ``lr_find.png`` (loss against lr, log x, suggestion marked) in the workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from train import cli, metrics

# fastai's defaults (fastai.callback.schedule.lr_find): start_lr 1e-7, end_lr 10, beta 0.98,
# stop at 4x the best smoothed loss; 200 steps instead of 100 give a finer curve.
DEFAULT_MIN_LR = 1e-7
DEFAULT_MAX_LR = 10.0
DEFAULT_STEPS = 200
DEFAULT_SMOOTHING = 0.98
DEFAULT_DIVERGE = 4.0
SKIP_END = 5  # recorded points left out of the suggestion at the end (fastai: [.. : -5])


@dataclasses.dataclass
class RangeTest:
    """What one range test recorded: step i trained on ``lrs[i]`` and saw ``losses[i]``."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float | None  # None when too few points were recorded to tell
    stopped: str  # why the test ended

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def check_settings(
    min_lr: float, max_lr: float, steps: int, smoothing: float, diverge: float
) -> None:
    """ValueError naming the setting when a range test could not be run as asked."""
    if not (0 < min_lr < max_lr < math.inf):
        raise ValueError(f"--min-lr and --max-lr need 0 < min-lr < max-lr, got {min_lr}, {max_lr}")
    if steps < 2:
        raise ValueError(f"--steps must be >= 2, got {steps}")
    if not 0 <= smoothing < 1:
        raise ValueError(f"--smoothing must be in [0, 1), got {smoothing}")
    if not diverge > 1:
        raise ValueError(f"--diverge must be > 1, got {diverge}")


def ramp_lrs(min_lr: float, max_lr: float, steps: int) -> np.ndarray:
    """``steps`` learning rates rising geometrically from ``min_lr`` to ``max_lr`` (both ends)."""
    return min_lr * (max_lr / min_lr) ** (np.arange(steps) / (steps - 1))


def ramp_schedule(min_lr: float, max_lr: float, steps: int) -> Callable:
    """The ramp as an optimizer schedule: update ``count`` gets ``ramp_lrs(...)[count]``."""
    import jax.numpy as jnp

    log_ratio = math.log(max_lr / min_lr)

    def schedule(count):
        return min_lr * jnp.exp(log_ratio * jnp.asarray(count, jnp.float32) / (steps - 1))

    return schedule


def smooth(losses: Sequence[float], smoothing: float) -> np.ndarray:
    """Exponential moving average with bias correction (Adam's): ``avg_i / (1 - beta^(i+1))``.

    Without the correction the average starts at 0 and the first points would read as a
    loss far below the real one.
    """
    average, out = 0.0, []
    for i, loss in enumerate(losses):
        average = smoothing * average + (1 - smoothing) * loss
        out.append(average / (1 - smoothing ** (i + 1)))
    return np.asarray(out)


def suggest(lrs: Sequence[float], smoothed: Sequence[float], planned_steps: int) -> float | None:
    """The lr of steepest descent: argmin of the smoothed loss's slope against log(lr).

    Forward differences over the recorded points from ``planned_steps // 10`` to the 5th
    last (fastai: the start is dominated by the average warming up, the end by divergence),
    and no further than the lowest smoothed loss.
    """
    lrs, smoothed = np.asarray(lrs, float), np.asarray(smoothed, float)
    lrs, smoothed = (
        lrs[planned_steps // 10 : len(lrs) - SKIP_END],
        smoothed[planned_steps // 10 : len(smoothed) - SKIP_END],
    )
    if len(lrs) < 2:
        return None
    # Only up to the lowest smoothed loss: past it the loss is on its way up, and a fall
    # there is the recovery from a spike, not progress (measured on the image recipe: a
    # spike at lr 0.8 and its recovery made lr 1.4 the steepest point).
    end = int(np.argmin(smoothed)) + 1
    lrs, smoothed = lrs[: max(end, 2)], smoothed[: max(end, 2)]
    slopes = np.diff(smoothed) / np.diff(np.log(lrs))
    return float(lrs[int(np.argmin(slopes))])


def range_test(
    step: Callable[[int], float],
    lrs: Sequence[float],
    *,
    smoothing: float = DEFAULT_SMOOTHING,
    diverge: float = DEFAULT_DIVERGE,
) -> RangeTest:
    """Calls ``step(i)`` for i = 0, 1, ... (one update at ``lrs[i]``, returning that batch's
    loss) until the smoothed loss exceeds ``diverge`` x its best or is not finite.

    The core of the test, independent of the trainer: ``step`` may be any training loop.
    The losses must be positive for "``diverge`` x the best" to mean a rise (cross-entropy,
    a squared error).
    """
    recorded_lrs: list[float] = []
    losses: list[float] = []
    best, stopped = math.inf, f"reached max lr {lrs[-1]:.3g} after {len(lrs)} steps"
    average = 0.0
    smoothed: list[float] = []
    for i, lr in enumerate(lrs):
        loss = float(step(i))
        if not math.isfinite(loss):
            stopped = f"non-finite loss at step {i + 1} (lr {lr:.3g})"
            break
        average = smoothing * average + (1 - smoothing) * loss
        value = average / (1 - smoothing ** (i + 1))
        recorded_lrs.append(float(lr))
        losses.append(loss)
        smoothed.append(value)
        best = min(best, value)
        if value > diverge * best:
            stopped = f"diverged at step {i + 1} (lr {lr:.3g}): smoothed loss > {diverge} x best"
            break
    return RangeTest(
        lrs=recorded_lrs,
        losses=losses,
        smoothed=smoothed,
        suggestion=suggest(recorded_lrs, smoothed, len(lrs)),
        stopped=stopped,
    )


def lr_find(
    cfg,
    *,
    min_lr: float = DEFAULT_MIN_LR,
    max_lr: float = DEFAULT_MAX_LR,
    steps: int = DEFAULT_STEPS,
    smoothing: float = DEFAULT_SMOOTHING,
    diverge: float = DEFAULT_DIVERGE,
) -> RangeTest:
    """The range test of ``cfg``'s model, data and optimizer on a fresh, throwaway state.

    The optimizer is the config's (clipping, groups with their ``lr_scale``, options) with
    the ramp for schedule. With ``optimizer.cycle_momentum`` the momentum is held at
    ``base_momentum``, its value at the one cycle's peak learning rate, which is what the
    test is looking for. Loss-spike handling is set to only watch (a spike policy that
    discards updates would hide the very divergence the test measures).
    """
    import jax

    from train import loop, loss_spikes
    from train.optimizer import make_optimizer
    from train.step import make_train_step

    check_settings(min_lr, max_lr, steps, smoothing, diverge)
    setup = loop.build(loop.per_leaf(cfg))  # the layout changes no loss of the range test
    schedule = ramp_schedule(min_lr, max_lr, steps)
    opt = cfg.optimizer
    momentum = (lambda count: opt.base_momentum) if opt.cycle_momentum else None
    tx = make_optimizer(opt, schedule, momentum)
    with jax.set_mesh(setup.mesh):
        opt_state = jax.jit(tx.init)(setup.state.params)
    state = setup.state._replace(opt_state=opt_state)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    watch_only = loss_spikes.SpikeRule(
        factor=cfg.run.loss_spike_factor, window=cfg.run.spike_window, discard=False
    )
    step_fn = make_train_step(
        setup.graphdef,
        tx,
        cfg.precision,
        opt.accumulation_steps,
        schedule,
        watch_only,
        hessian_seed=cfg.run.seed if opt.name == "sophia" else None,
        task=setup.task,
    )
    replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
    train_step = jax.jit(
        step_fn,
        in_shardings=(shardings, setup.batch_sharding),
        out_shardings=(shardings, replicated),
        donate_argnums=0,  # the state is this test's own copy
    )
    current = [state]

    def one_step(i: int) -> float:
        current[0], metrics = train_step(current[0], loop.train_batch(setup, i))
        return float(metrics["loss"])

    return range_test(
        one_step, ramp_lrs(min_lr, max_lr, steps), smoothing=smoothing, diverge=diverge
    )


def plot(result: RangeTest, path: pathlib.Path) -> None:
    """Loss and smoothed loss against lr (log x), the suggestion marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(result.lrs, result.losses, alpha=0.35, label="loss")
    ax.plot(result.lrs, result.smoothed, label="smoothed loss")
    if result.suggestion is not None:
        ax.axvline(result.suggestion, color="red", linestyle="--")
        index = result.lrs.index(result.suggestion)
        ax.plot([result.suggestion], [result.smoothed[index]], "ro")
        ax.set_title(f"LR range test: suggestion {result.suggestion:.3g} (steepest descent)")
    else:
        ax.set_title("LR range test: too few points for a suggestion")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    if result.smoothed:  # the divergent tail would squash the useful part of the curve
        low, high = min(result.smoothed), result.smoothed[0]
        ax.set_ylim(low - 0.1 * abs(high - low), max(high, low) + 0.6 * abs(high - low) + 1e-9)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    metrics.save_figure(fig, path)


def write(result: RangeTest, workdir: pathlib.Path, settings: dict) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "lr_find.json").write_text(
        json.dumps({**result.to_json(), "settings": settings}, indent=1) + "\n"
    )
    plot(result, workdir / "lr_find.png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.recipe_parser(
        "python -m train.lr_find",
        __doc__.split("\n\n")[1],
        workdir_help="default: runs/<recipe name>/lr_find",
    )
    parser.add_argument("--min-lr", type=float, default=DEFAULT_MIN_LR)
    parser.add_argument("--max-lr", type=float, default=DEFAULT_MAX_LR)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING, help="EMA beta")
    parser.add_argument(
        "--diverge", type=float, default=DEFAULT_DIVERGE, help="stop at this x the best loss"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> RangeTest:
    args = parse_args(argv)
    cli.use_simulated_cpu_devices()
    from train import config as config_lib
    from train import distributed

    settings = {
        "min_lr": args.min_lr,
        "max_lr": args.max_lr,
        "steps": args.steps,
        "smoothing": args.smoothing,
        "diverge": args.diverge,
    }
    with cli.user_errors():
        try:
            check_settings(**settings)
        except ValueError as err:
            raise config_lib.ConfigError(str(err)) from None
        cfg = config_lib.load(args.config, args.overrides)
        distributed.maybe_initialize(cfg.run.distributed)
        workdir = args.workdir or cli.default_workdir(args.config, "lr_find")
        result = lr_find(cfg, **settings)
    write(result, workdir, {**settings, "config": str(args.config), "overrides": args.overrides})
    suggestion = "none" if result.suggestion is None else f"{result.suggestion:.3g}"
    print(
        f"lr range test: {len(result.lrs)} steps, {result.stopped}; suggested lr {suggestion} "
        f"(steepest descent of the smoothed loss); outputs in {workdir}"
    )
    return result


if __name__ == "__main__":
    main()
