"""Sharpness during training, and the loss landscape around checkpoints (Li et al. 2018).

``python -m train.landscape --config FILE [key=value ...] --workdir DIR --mode line|surface``
reads the checkpoints a ``python -m train`` run left in ``DIR/checkpoints`` (same config) and
writes into ``DIR``:

``--mode line`` (``landscape_line.json`` / ``.png``)
    The loss along the straight line ``theta(a) = (1 - a) theta0 + a theta1`` between
    the workdir's checkpoint ``theta0`` (``--step``, default the newest) and
    ``theta1`` = ``--other-checkpoint``: a step of the same workdir, another workdir,
    checkpoint directory or step directory, or ``init`` (the run's initialisation,
    rebuilt from the config's seed). ``a`` spans ``--range`` (default -0.5 1.5) in
    ``--points`` values, plus exactly 0 and 1 (Goodfellow et al. 2015; Li et al. 2018,
    sec. 3).
``--mode surface`` (``landscape_surface.json`` / ``.png``)
    The loss on the plane ``theta + alpha d1 + beta d2`` around checkpoint ``theta``
    for two random *filter-normalised* directions (Li et al. 2018, sec. 4), on a
    ``--points`` x ``--points`` grid over ``--range`` (default -1 1), plus 0.

Both record the mean loss over the first ``--train-batches`` training batches
(default ``run.eval_batches``; every micro-batch of each) and over the evaluation
batches, as ``fit`` evaluates them.

Filter normalisation (:func:`filter_normalize`): a direction's Gaussian entries are
rescaled filter by filter to the norm of the same filter of ``theta``. A *filter*
is the set of weights that feed one output unit: a column of a dense kernel
``[in, out]``, one output channel of a convolution ``[H, W, in, out]``, one
``(head, feature)`` output of the attention's ``[embed, heads, head_dim]``
projections (a ``LinearGeneral`` kernel's trailing output axes), one embedding
feature of a ``[vocab, embed]`` table (a lookup is a dense layer on one-hot input).
Biases, norm scales and any other parameter with fewer than two dimensions get
direction 0: the paper's choice (it ignores them), so they stay at the checkpoint's
values all over the plane.

The same module gives :func:`make_sharpness`, the jitted measurement behind
``run.sharpness_every``: the top Hessian eigenvalue (Lanczos) and Hessian trace
(Hutchinson) of the loss on a training step's first micro-batch.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optim_jax import hessian

# train.loop imports this module lazily (for run.sharpness_every), so no import cycle.
from train import cli, loop, metrics
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer, CheckpointError, abstract_state
from train.config import Config
from train.step import loss_fn as step_loss_fn

LINE_NAME, SURFACE_NAME = "landscape_line", "landscape_surface"
INIT = "init"  # --other-checkpoint value: the run's initialisation


# ------------------------------------------------------------------------------- sharpness


def make_sharpness(setup: loop.Setup) -> Callable[[Any, dict, int], dict[str, float]]:
    """``(params, batch, step) -> {"sharpness", "hessian_trace", "hessian_trace_stderr"}``.

    ``batch`` is a training batch as the train step takes it (``[micro, batch, ...]``);
    the loss is the first micro-batch's, through the model as configured (its compute
    dtype: bfloat16 products are noisier than float32 ones). ``sharpness`` is the
    largest Ritz value of ``run.sharpness_iters`` Lanczos steps; the trace averages
    ``run.sharpness_iters`` Rademacher probes. The start vector and probes are drawn
    from ``run.seed`` and ``step``. Jitted once, separately from the train step, so
    runs without it pay nothing.
    """
    cfg = setup.cfg
    iters = cfg.run.sharpness_iters
    graphdef, task = setup.graphdef, setup.task

    def loss(params, micro_batch):
        return step_loss_fn(graphdef, params, micro_batch, task)

    def measure(params, batch, step):
        micro_batch = jax.tree.map(lambda x: x[0], batch)
        key = jax.random.fold_in(jax.random.key(cfg.run.seed), step)
        lanczos_key, trace_key = jax.random.split(key)
        top = hessian.top_eigenvalue_lanczos(
            loss, params, lanczos_key, micro_batch, num_iters=iters
        )
        trace = hessian.hutchinson_trace(loss, params, trace_key, micro_batch, num_samples=iters)
        return {
            "sharpness": top,
            "hessian_trace": trace.estimate,
            "hessian_trace_stderr": trace.standard_error,
        }

    replicated = mesh_lib.replicated(setup.mesh)
    jitted = jax.jit(
        measure,
        in_shardings=(setup.state_shardings.params, setup.batch_sharding, replicated),
        out_shardings=replicated,
    )

    def run(params: Any, batch: dict, step: int) -> dict[str, float]:
        values = jitted(params, batch, jax.device_put(jnp.int32(step), replicated))
        return {name: float(value) for name, value in jax.device_get(values).items()}

    return run


# ------------------------------------------------------------------------------ directions


def _names(path: Sequence[Any]) -> tuple[Any, ...]:
    """A key path's dict keys (``("blocks", 0, "attn", "query", "kernel")``); attribute keys
    such as an ``nnx.Variable``'s ``.value`` are dropped."""
    return tuple(entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey))


def output_axis_counts(graphdef: nnx.GraphDef, params: Any) -> Any:
    """How many trailing axes of each parameter index its output units, a pytree like
    ``params``: ``len(out_features)`` for a ``LinearGeneral`` kernel (2 for the attention's
    ``[embed, heads, head_dim]`` projections), 1 for every other parameter."""
    model = nnx.merge(graphdef, params)
    general = {
        tuple(path): len(node.out_features)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.LinearGeneral)
    }

    def count(path, _):
        names = _names(path)
        if names and names[-1] == "kernel" and names[:-1] in general:
            return general[names[:-1]]
        return 1

    return jax.tree_util.tree_map_with_path(count, params)


def filter_normalize(direction: Any, params: Any, output_axes: Any = None) -> Any:
    """``direction`` rescaled filter by filter to the norms of ``params``' filters.

    For a leaf of ``ndim >= 2`` with ``n`` output axes (``output_axes``, a pytree of ints
    like ``params``; None: 1 everywhere), a filter is a slice at a fixed index of the last
    ``n`` axes, norms taken over the leading ``ndim - n`` (input) axes:
    ``d_f <- d_f / ||d_f|| * ||theta_f||``. A filter whose direction is all zero stays
    zero. Leaves with ``ndim < 2`` (biases, norm scales) become zero: Li et al. ignore them.
    """
    if output_axes is None:
        output_axes = jax.tree.map(lambda _: 1, params)

    def normalize(d, theta, n_out):
        if theta.ndim < 2:
            return jnp.zeros_like(d)
        if not 1 <= n_out < theta.ndim:
            raise ValueError(f"{n_out} output axes for a parameter of shape {theta.shape}")
        inputs = tuple(range(theta.ndim - n_out))
        d_norm = jnp.sqrt(jnp.sum(jnp.square(d), axis=inputs, keepdims=True))
        theta_norm = jnp.sqrt(
            jnp.sum(jnp.square(theta.astype(d.dtype)), axis=inputs, keepdims=True)
        )
        scale = jnp.where(d_norm > 0, theta_norm / jnp.where(d_norm > 0, d_norm, 1), 0)
        return d * scale

    return jax.tree.map(normalize, direction, params, output_axes)


def random_direction(key: jax.Array, params: Any, output_axes: Any = None) -> Any:
    """A standard Gaussian direction like ``params`` (float32), filter-normalised to them."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    gaussian = [
        jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves, strict=True)
    ]
    return filter_normalize(jax.tree.unflatten(treedef, gaussian), params, output_axes)


# ----------------------------------------------------------------------------- the losses


class LossProbe:
    """Mean train and eval loss of any parameters placed as the run places its own."""

    def __init__(self, setup: loop.Setup, train_batches: int):
        self.setup = setup
        self.sharding = NamedSharding(setup.mesh, P(mesh_lib.BATCH_AXES))
        self.train = []  # every micro-batch of the first ``train_batches`` training batches
        for index in range(train_batches):
            local = setup.batches.local_batch(index)
            if setup.cfg.optimizer.accumulation_steps == 1:
                local = {k: v[None] for k, v in local.items()}
            for micro in range(setup.cfg.optimizer.accumulation_steps):
                self.train.append(
                    loop.global_batch(
                        setup,
                        {k: v[micro] for k, v in local.items()},
                        self.sharding,
                        batch_axis=loop.EVAL_BATCH_AXIS,
                    )
                )
        param_shardings = setup.state_shardings.params
        # theta0 + a (theta1 - theta0) would not give theta1 exactly at a = 1; this form
        # gives both end points bit for bit (0 * x = 0, 1 * x = x).
        self.interpolate = jax.jit(
            lambda a, p0, p1: jax.tree.map(lambda x, y: (1 - a) * x + a * y, p0, p1),
            out_shardings=param_shardings,
        )
        self.shift = jax.jit(
            lambda alpha, beta, p, d1, d2: jax.tree.map(
                lambda x, u, v: (x + alpha * u + beta * v).astype(x.dtype), p, d1, d2
            ),
            out_shardings=param_shardings,
        )

    def __call__(self, params: Any) -> dict[str, float]:
        train = [self.setup.eval_step(params, batch)["loss"] for batch in self.train]
        return {
            "train_loss": float(np.mean(jax.device_get(train))),
            "eval_loss": loop.evaluate(self.setup, params),
        }


def grid(low: float, high: float, points: int, exact: Sequence[float]) -> list[float]:
    """``points`` evenly spaced values from ``low`` to ``high``, with each value of ``exact``
    included exactly (replacing a grid value within 1e-9 of the span, else added)."""
    # Rounded so that the JSON says 0.4, not 0.39999999999999997 (linspace's rounding).
    values = [round(float(v), 12) for v in np.linspace(low, high, points)]
    tolerance = 1e-9 * max(abs(high - low), 1.0)
    for target in exact:
        values = [v for v in values if abs(v - target) > tolerance] + [float(target)]
    return sorted(values)


def line(
    probe: LossProbe, theta0: Any, theta1: Any, alphas: Sequence[float]
) -> dict[str, list[float]]:
    """Train and eval loss at ``(1 - a) theta0 + a theta1`` for each ``a`` of ``alphas``."""
    results = [probe(probe.interpolate(jnp.float32(a), theta0, theta1)) for a in alphas]
    return {
        "alphas": list(alphas),
        "train_loss": [r["train_loss"] for r in results],
        "eval_loss": [r["eval_loss"] for r in results],
    }


def surface(
    probe: LossProbe,
    theta: Any,
    directions: tuple[Any, Any],
    alphas: Sequence[float],
    betas: Sequence[float],
) -> dict[str, Any]:
    """Train and eval loss at ``theta + alpha d1 + beta d2``; ``[i][j]`` is ``alphas[i]``,
    ``betas[j]``."""
    d1, d2 = directions
    train = [[0.0] * len(betas) for _ in alphas]
    evaluation = [[0.0] * len(betas) for _ in alphas]
    for i, alpha in enumerate(alphas):
        for j, beta in enumerate(betas):
            point = probe.shift(jnp.float32(alpha), jnp.float32(beta), theta, d1, d2)
            losses = probe(point)
            train[i][j], evaluation[i][j] = losses["train_loss"], losses["eval_loss"]
    return {
        "alphas": list(alphas),
        "betas": list(betas),
        "train_loss": train,
        "eval_loss": evaluation,
    }


# --------------------------------------------------------------------------- checkpoints


def _open(directory: pathlib.Path, cfg: Config) -> Checkpointer:
    # Checkpointer's manager would create a missing directory: only reading is wanted here.
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    return Checkpointer(directory, cfg.checkpoint)


def restore_params(directory: pathlib.Path, step: int | None, setup: loop.Setup) -> tuple[Any, str]:
    """``(params, path)`` of checkpoint ``step`` (None: newest) in ``directory``, placed on
    the run's mesh."""
    checkpointer = _open(directory, setup.cfg)
    try:
        target = abstract_state(setup.state)
        if step is None:
            step, state, _ = checkpointer.restore_newest(target)
        else:
            state, _ = checkpointer.restore(step, target)
        return state.params, str(checkpointer.step_path(step))
    finally:
        checkpointer.close()


def resolve_other(spec: str, workdir: pathlib.Path, setup: loop.Setup) -> tuple[Any, str]:
    """``--other-checkpoint``: ``init``, a step of ``workdir``, a workdir (its newest
    checkpoint), a checkpoint directory (its newest) or a step directory ``.../<step>``."""
    if spec == INIT:
        return setup.state.params, f"{INIT} (run.seed={setup.cfg.run.seed})"
    if re.fullmatch(r"\d+", spec):
        return restore_params(workdir / "checkpoints", int(spec), setup)
    path = pathlib.Path(spec)
    if (path / "checkpoints").is_dir():
        return restore_params(path / "checkpoints", None, setup)
    if re.fullmatch(r"\d+", path.name) and path.is_dir():
        return restore_params(path.parent, int(path.name), setup)
    if path.is_dir():
        return restore_params(path, None, setup)
    raise CheckpointError(
        f"--other-checkpoint {spec!r} is not {INIT!r}, a step number, or an existing directory"
    )


# ---------------------------------------------------------------------------------- plots


def _short(where: str) -> str:
    """``.../checkpoints/8`` -> ``checkpoints/8`` for a plot title; ``init ...`` unchanged."""
    return "/".join(pathlib.Path(where).parts[-2:]) if where.startswith("/") else where


def _plot_line(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["alphas"], result["train_loss"], marker=".", label="train")
    ax.plot(result["alphas"], result["eval_loss"], marker=".", label="eval")
    for a in (0.0, 1.0):
        ax.axvline(a, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("a: (1 - a) theta0 + a theta1")
    ax.set_ylabel("loss")
    ax.set_title(f"theta0 = {_short(result['theta0'])}, theta1 = {_short(result['theta1'])}")
    ax.legend()
    metrics.save_figure(fig, path)


def _plot_surface(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    alphas, betas = np.asarray(result["alphas"]), np.asarray(result["betas"])
    for ax, key in zip(axes, ("train_loss", "eval_loss"), strict=True):
        # contour wants Z[y][x]: rows over beta, columns over alpha.
        values = np.asarray(result[key], dtype=float).T
        finite = values[np.isfinite(values)]
        levels = 20
        if finite.size and finite.min() > 0 and finite.max() > 50 * finite.min():
            # Losses spanning decades (a sharp rise away from the minimum): log-spaced levels,
            # or the basin around the centre gets a single contour.
            levels = np.geomspace(finite.min(), finite.max(), 20)
        elif finite.size and finite.max() > finite.min():
            levels = np.linspace(finite.min(), finite.max(), 20)
        contours = ax.contour(alphas, betas, values, levels=levels)
        ax.clabel(contours, inline=True, fontsize=7, fmt="%.2f")
        ax.plot([0], [0], "k+")
        ax.set_xlabel("alpha (direction 1)")
        ax.set_ylabel("beta (direction 2)")
        ax.set_title(key.replace("_", " "))
    fig.suptitle(f"around {result['checkpoint']} (filter-normalised directions)")
    metrics.save_figure(fig, path)


# ----------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train.landscape",
        description="Loss along a line between checkpoints, or on a plane around one.",
    )
    parser.add_argument("--config", type=pathlib.Path, help="the run's YAML recipe")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="as given to training")
    parser.add_argument("--workdir", type=pathlib.Path, required=True, help="the run's workdir")
    parser.add_argument("--mode", choices=("line", "surface"), default="surface")
    parser.add_argument("--step", type=int, help="the workdir's checkpoint (default: newest)")
    parser.add_argument(
        "--other-checkpoint",
        metavar="STEP_OR_DIR",
        help=f"line mode: theta1, a step, a workdir or checkpoint directory, or {INIT!r}",
    )
    parser.add_argument("--points", type=int, help="per axis (default: line 21, surface 11)")
    parser.add_argument(
        "--range", type=float, nargs=2, metavar=("LOW", "HIGH"), help="default -0.5 1.5 / -1 1"
    )
    parser.add_argument("--seed", type=int, help="for the surface's directions (default run.seed)")
    parser.add_argument("--train-batches", type=int, help="default: run.eval_batches")
    args = parser.parse_args(argv)
    if args.mode == "line" and args.other_checkpoint is None:
        parser.error("--mode line needs --other-checkpoint STEP_OR_DIR (or init)")
    if args.points is not None and args.points < 2:
        parser.error(f"--points must be >= 2, got {args.points}")
    if args.train_batches is not None and args.train_batches < 1:
        parser.error(f"--train-batches must be >= 1, got {args.train_batches}")
    if args.range is not None and not args.range[0] < args.range[1]:
        parser.error(f"--range LOW HIGH needs LOW < HIGH, got {args.range}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    from train import config as config_lib

    cfg = config_lib.load(args.config, list(args.overrides))
    # Filter normalisation reads each tensor's shape: the run's checkpoints are per-leaf.
    setup = loop.build(loop.per_leaf(cfg))
    workdir = args.workdir
    probe = LossProbe(setup, args.train_batches or cfg.run.eval_batches)
    theta, theta_path = restore_params(workdir / "checkpoints", args.step, setup)
    if args.mode == "line":
        other, other_path = resolve_other(args.other_checkpoint, workdir, setup)
        low, high = args.range or (-0.5, 1.5)
        alphas = grid(low, high, args.points or 21, exact=(0.0, 1.0))
        result = {"mode": "line", "theta0": theta_path, "theta1": other_path}
        result.update(line(probe, theta, other, alphas))
        name, plot = LINE_NAME, _plot_line
    else:
        low, high = args.range or (-1.0, 1.0)
        values = grid(low, high, args.points or 11, exact=(0.0,) if low < 0 < high else ())
        seed = cfg.run.seed if args.seed is None else args.seed
        keys = jax.random.split(jax.random.key(seed))
        counts = output_axis_counts(setup.graphdef, theta)
        # One compiled function for both (eagerly, every op on sharded leaves compiles).
        draw = jax.jit(
            lambda key, params: random_direction(key, params, counts),
            out_shardings=setup.state_shardings.params,
        )
        directions = tuple(draw(k, theta) for k in keys)
        result = {
            "mode": "surface",
            "checkpoint": theta_path,
            "direction_seed": seed,
            "directions": "Gaussian, filter-normalised (Li et al. 2018); biases and other "
            "parameters with < 2 dimensions: 0",
        }
        result.update(surface(probe, theta, directions, values, values))
        name, plot = SURFACE_NAME, _plot_surface
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot(result, workdir / f"{name}.png")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with cli.user_errors():
        result = run(args)
    name = LINE_NAME if result["mode"] == "line" else SURFACE_NAME
    train = np.asarray(result["train_loss"], dtype=float)
    print(
        f"{result['mode']}: train loss {np.nanmin(train):.4f} .. {np.nanmax(train):.4f} over "
        f"{train.size} points; outputs in {args.workdir / name}.json and .png"
    )
    return result


if __name__ == "__main__":
    cli.use_simulated_cpu_devices()
    main()
