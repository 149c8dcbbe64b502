"""Training diagnostics: gradient flow per layer, and where a non-finite value first appears.

``python -m train.diagnostics --config FILE [key=value ...] --workdir DIR [--batches N]
[--resume]`` builds the run (``train.loop.build``), takes the workdir's newest checkpoint
when there is one (``checkpoint.resume``: auto; ``--resume`` requires one), and writes

* ``DIR/gradient_flow.json``: per parameter path (in forward order), the parameter norm,
  the gradient norm on each of ``N`` training batches and their root mean square, the
  update the optimizer makes on each batch (``train_step`` on a copy of the state, so
  clipping, schedule and frozen groups included) as norm and as ratio to the parameter
  norm, and whether the gradient was exactly zero on every batch (``no_gradient``: a
  parameter cut off from the loss); plus the non-finite diagnosis of the first batch;
* ``DIR/gradient_flow.png``: gradient norm and update/parameter ratio per path, log scale.

Non-finite diagnosis (:func:`diagnose_nonfinite`): one forward and backward pass of the
model with every module's ``__call__`` instrumented. Forward: the first module, in the
order calls *complete*, whose output is not finite -- an inner module completes before
the modules that contain or consume it, so that is where the value appeared. Backward: a
zero "probe" is added to every module's output and the loss differentiated with respect
to the probes, which gives the gradient at each module output; the first non-finite one
in backward order (reverse completion order) is where the gradient went bad, inside the
backward pass of the module called next. ``train.loop.fit`` runs this once per run, on
the batch of the first logged step whose gradients were not finite. The diagnosis runs
without loss scaling and without rematerialisation (same values, one less transform).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import optim_jax
from train import cli, metrics
from train.step import merge

if TYPE_CHECKING:
    from train.loop import Setup
    from train.step import Task, TrainState


def path_name(path: Sequence[Any]) -> str:
    """``("blocks", 0, "mlp", "up")`` -> ``"blocks/0/mlp/up"`` (the optimizer groups' spelling);
    the model itself is ``"<model>"``."""
    return "/".join(str(p) for p in path) or "<model>"


def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flat_params(tree: Any) -> dict[str, jax.Array]:
    """``{"blocks/0/mlp/up/kernel": array}`` of an ``nnx.State`` of parameters (or of
    gradients, which have the same structure), kept per leaf or in the flat layout."""
    leaves = jax.tree_util.tree_flatten_with_path(optim_jax.flat.unflatten(tree))[0]
    flat = {}
    for path, leaf in leaves:
        names = [_key_name(k) for k in path]
        if names and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
            names = names[:-1]  # nnx.Variable's own attribute, not part of the layer's path
        flat["/".join(names)] = leaf
    return flat


# ------------------------------------------------------------------- instrumented modules


def _defining_class(cls: type) -> type | None:
    for klass in cls.__mro__:
        if "__call__" in vars(klass):
            return klass
    return None


@contextlib.contextmanager
def _instrumented(model: nnx.Module, on_output: Callable[[str, Any], Any]) -> Iterator[None]:
    """Every module of ``model`` calls ``on_output(path, output)`` as its ``__call__`` returns,
    and returns what that gives back.

    Python looks ``__call__`` up on the class, so the classes that define it are patched for
    the duration (and restored after); a module calling its base class's ``__call__`` is
    reported once, by its outermost call. Modules outside ``model``'s graph are not reported.
    """
    paths = {id(module): path_name(path) for path, module in nnx.iter_modules(model)}
    classes = {_defining_class(type(module)) for _, module in nnx.iter_modules(model)}
    classes.discard(None)
    active: set[int] = set()
    originals = {cls: vars(cls)["__call__"] for cls in classes}

    def wrap(original: Callable) -> Callable:
        @functools.wraps(original)
        def call(self, *args, **kwargs):
            if id(self) in active or id(self) not in paths:
                return original(self, *args, **kwargs)
            active.add(id(self))
            try:
                out = original(self, *args, **kwargs)
            finally:
                active.discard(id(self))
            return on_output(paths[id(self)], out)

        return call

    try:
        for cls, original in originals.items():
            cls.__call__ = wrap(original)
        yield
    finally:
        for cls, original in originals.items():
            cls.__call__ = original


def _merge_for_diagnosis(graphdef: nnx.GraphDef, params: Any) -> nnx.Module:
    model = merge(graphdef, params)
    # GPT's remat wraps each block in nnx.remat, which rebuilds the block as a new object
    # that the instrumentation cannot name. Rematerialisation changes no value: turn it off.
    cfg = getattr(model, "cfg", None)
    if getattr(cfg, "remat", False):
        model.cfg = dataclasses.replace(cfg, remat=False)
    return model


def _is_float_array(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)


def _finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _is_float_array(x)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def call_order(graphdef: nnx.GraphDef, params: Any, inputs: jax.Array) -> list[str]:
    """Module paths in the order their calls complete on ``inputs`` (traced, not run)."""
    order: list[str] = []

    def forward(params, inputs):
        model = _merge_for_diagnosis(graphdef, params)

        def record(path, out):
            order.append(path)
            return out

        with _instrumented(model, record):
            return model(inputs)

    jax.eval_shape(forward, params, inputs)
    return order


# ------------------------------------------------------------------- non-finite diagnosis


@dataclasses.dataclass
class NonFiniteReport:
    """Where a forward/backward pass on one batch first went non-finite (None: it did not)."""

    loss: float
    forward: str | None  # first module (completion order) whose output is non-finite
    backward: str | None  # first module output (backward order) with a non-finite gradient
    backward_through: str | None  # the module called after ``backward``: whose backward broke
    nonfinite_params: list[str]  # parameters that already hold NaN/Inf
    nonfinite_grads: list[str]  # parameters whose gradient is non-finite

    @property
    def first(self) -> str | None:
        """The module named as where it first appeared: forward first, else backward."""
        if self.forward is not None:
            return self.forward
        if self.backward is not None:
            return self.backward_through or self.backward
        return None

    def message(self) -> str:
        bad_params = ""
        if self.nonfinite_params:
            bad_params = f"; non-finite parameters: {', '.join(self.nonfinite_params[:5])}"
        if self.forward is not None:
            return f"non-finite first in {self.forward} (forward output){bad_params}"
        if self.backward is not None:
            through = f" (backward of {self.backward_through})" if self.backward_through else ""
            return (
                f"non-finite first in {self.first}: gradient at the output of {self.backward}"
                f"{through}, loss {self.loss:.4g}{bad_params}"
            )
        if self.nonfinite_grads:
            return (
                f"non-finite gradients of {', '.join(self.nonfinite_grads[:5])} with every "
                f"module output and its gradient finite{bad_params}"
            )
        return f"no non-finite value in this batch's forward or backward pass{bad_params}"

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "first": self.first, "message": self.message()}


def diagnose_nonfinite(
    graphdef: nnx.GraphDef, params: Any, batch: dict[str, jax.Array], task: Task
) -> NonFiniteReport:
    """Forward and backward of ``cross_entropy(model(batch[inputs]), batch[targets])`` on one
    ``[batch, ...]`` batch, with every module output and its gradient checked (module doc)."""
    from train.step import cross_entropy

    inputs, targets = batch[task.inputs], batch[task.targets]
    order: list[str] = []
    shapes: list[Any] = []

    def trace_shapes(params, inputs):
        model = _merge_for_diagnosis(graphdef, params)

        def record(path, out):
            order.append(path)
            shapes.append(out if _is_float_array(out) else None)
            return out

        with _instrumented(model, record):
            return model(inputs)

    jax.eval_shape(trace_shapes, params, inputs)
    probe_shapes = [None if s is None else jax.ShapeDtypeStruct(s.shape, s.dtype) for s in shapes]

    def loss_and_flags(params, probes, inputs, targets):
        model = _merge_for_diagnosis(graphdef, params)
        flags = []

        def probe(path, out):
            k = len(flags)
            flags.append(_finite(out))
            # Adding zeros changes no value; its gradient is the gradient at this output.
            return out + probes[k] if k < len(probes) and probes[k] is not None else out

        with _instrumented(model, probe):
            loss = cross_entropy(model(inputs), targets)
        return loss, jnp.stack(flags)

    @jax.jit
    def run(params, inputs, targets):
        probes = [None if s is None else jnp.zeros(s.shape, s.dtype) for s in probe_shapes]
        (loss, forward_flags), (param_grads, probe_grads) = jax.value_and_grad(
            loss_and_flags, argnums=(0, 1), has_aux=True
        )(params, probes, inputs, targets)
        backward_flags = jnp.stack([_finite(g) for g in probe_grads])
        params_ok = {k: _finite(v) for k, v in flat_params(params).items()}
        grads_ok = {k: _finite(v) for k, v in flat_params(param_grads).items()}
        return loss, forward_flags, backward_flags, params_ok, grads_ok

    loss, forward_ok, backward_ok, params_ok, grads_ok = jax.device_get(
        run(params, inputs, targets)
    )
    forward = next((order[k] for k in range(len(order)) if not forward_ok[k]), None)
    backward = backward_through = None
    for k in reversed(range(len(order))):
        if probe_shapes[k] is not None and not backward_ok[k]:
            backward = order[k]
            backward_through = order[k + 1] if k + 1 < len(order) else None
            break
    return NonFiniteReport(
        loss=float(loss),
        forward=forward,
        backward=backward,
        backward_through=backward_through,
        nonfinite_params=[k for k, ok in params_ok.items() if not ok],
        nonfinite_grads=[k for k, ok in grads_ok.items() if not ok],
    )


def diagnose_step(setup: Setup, params: Any, batch: dict[str, jax.Array]) -> NonFiniteReport:
    """:func:`diagnose_nonfinite` on a training batch ``[micro, batch, ...]``: the first
    micro-batch in which something is non-finite (or the last one, all finite)."""
    report = None
    for micro in range(next(iter(batch.values())).shape[0]):
        one = {key: value[micro] for key, value in batch.items()}
        report = diagnose_nonfinite(setup.graphdef, params, one, setup.task)
        if report.first is not None or report.nonfinite_grads or not math.isfinite(report.loss):
            break
    assert report is not None
    return report


# ------------------------------------------------------------------- gradient flow


@jax.jit
def _norms(tree: Any) -> dict[str, jax.Array]:
    """Euclidean norm of every parameter path's array (one compiled call for the whole tree)."""
    return {k: jnp.linalg.norm(v.astype(jnp.float32).ravel()) for k, v in flat_params(tree).items()}


@jax.jit
def _update_norms(new: Any, old: Any) -> dict[str, jax.Array]:
    return _norms(jax.tree.map(jnp.subtract, new, old))


def _floats(tree: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def gradient_flow(
    setup: Setup, state: TrainState, batches: Sequence[dict[str, jax.Array]]
) -> dict[str, Any]:
    """Per parameter path: gradient norms, update/parameter norm ratios and parameters
    without gradient, over ``batches`` (training batches ``[micro, batch, ...]``) from
    ``state`` (left as it is). See the module docstring for the fields."""
    from train.step import loss_fn

    if not batches:
        raise ValueError("gradient_flow needs at least one batch")
    graphdef, task = setup.graphdef, setup.task

    @jax.jit
    def grad_stats(params, batch):
        """Norm and largest magnitude of each path's gradient, mean over micro-batches."""
        micro = next(iter(batch.values())).shape[0]
        grads = [
            jax.grad(loss_fn, argnums=1)(
                graphdef, params, {n: v[k] for n, v in batch.items()}, task
            )
            for k in range(micro)
        ]
        mean = jax.tree.map(lambda *g: sum(g) / micro, *grads)
        max_abs = {k: jnp.max(jnp.abs(v)) for k, v in flat_params(mean).items()}
        return _norms(mean), max_abs

    # train_step donates its state argument: it gets copies, in the state's shardings.
    copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=setup.state_shardings)
    copy_params = jax.jit(
        lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=setup.state_shardings.params
    )
    params_now = flat_params(state.params)
    param_norms = _floats(_norms(state.params))
    grad_norms: dict[str, list[float]] = {k: [] for k in params_now}
    max_abs_grad = dict.fromkeys(params_now, 0.0)
    update_norms: dict[str, list[float]] = {k: [] for k in params_now}
    ratios: dict[str, list[float | None]] = {k: [] for k in params_now}
    losses, finite = [], []
    current = copy(state)
    for batch in batches:
        norms, max_abs = jax.device_get(grad_stats(current.params, batch))
        for key in params_now:
            grad_norms[key].append(float(norms[key]))
            max_abs_grad[key] = max(max_abs_grad[key], float(max_abs[key]))
        before = copy_params(current.params)
        before_norms = _floats(_norms(before))
        current, step_metrics = setup.train_step(current, batch)
        losses.append(float(step_metrics["loss"]))
        finite.append(bool(step_metrics["finite"]))
        for key, value in _floats(_update_norms(current.params, before)).items():
            update_norms[key].append(value)
            ratios[key].append(value / before_norms[key] if before_norms[key] > 0 else None)

    order = call_order(
        graphdef, state.params, jax.tree.map(lambda x: x[0], batches[0])[task.inputs]
    )
    position = {path: k for k, path in enumerate(order)}

    def forward_position(path: str) -> tuple[int, str]:
        module = path.rsplit("/", 1)[0] if "/" in path else "<model>"
        return position.get(module, len(order)), path

    layers = []
    for path in sorted(params_now, key=forward_position):
        ratio_values = [r for r in ratios[path] if r is not None]
        per_batch = grad_norms[path]
        layers.append(
            {
                "path": path,
                "shape": list(params_now[path].shape),
                "param_norm": param_norms[path],
                "grad_norm": math.sqrt(sum(g * g for g in per_batch) / len(per_batch)),
                "grad_norm_per_batch": per_batch,
                "update_norm_per_batch": update_norms[path],
                # Mean over batches of |update| / |param| (None where the parameter is zero,
                # e.g. a bias at initialisation: no ratio is defined).
                "update_ratio": float(np.mean(ratio_values)) if ratio_values else None,
                "update_ratio_per_batch": ratios[path],
                "no_gradient": max_abs_grad[path] == 0.0,
            }
        )
    report = diagnose_step(setup, state.params, batches[0])
    return {
        "step": int(state.step),
        "batches": len(batches),
        "losses": losses,
        "finite": finite,
        "layers": layers,
        "no_gradient": [layer["path"] for layer in layers if layer["no_gradient"]],
        "nonfinite": report.to_json(),
    }


def plot_gradient_flow(flow: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path:
    """A PNG of gradient norm and update/parameter ratio per parameter path (log scale);
    parameters without gradient are drawn in red at the axis' floor."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    layers = flow["layers"]
    names = [layer["path"] for layer in layers]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.22 * len(names) + 1.8), sharey=True)
    panels = (
        ("grad_norm", "gradient norm (RMS over batches)"),
        ("update_ratio", "|update| / |param|"),
    )
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [layer[key] for layer in layers]
        positive = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
        floor = min(positive) / 10 if positive else 1e-12
        heights = [v if v is not None and v > 0 and math.isfinite(v) else floor for v in values]
        colors = ["tab:red" if layer["no_gradient"] else "tab:blue" for layer in layers]
        ax.barh(range(len(names)), heights, color=colors)
        ax.set_xscale("log")
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names, fontsize=7)
    axes[0].invert_yaxis()  # forward order from the top
    fig.suptitle(
        f"gradient flow at step {flow['step']} over {flow['batches']} batch(es); red: no gradient"
    )
    return metrics.save_figure(fig, path)


# ------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.recipe_parser(
        "python -m train.diagnostics",
        "Gradient flow per layer and non-finite diagnosis of a run's state.",
        workdir_help="the run's workdir (its newest checkpoint is used if it has one)",
        workdir_required=True,
        resume_help="require the workdir's checkpoint (else: if any)",
    )
    parser.add_argument("--batches", type=int, default=4, help="training batches to look at")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cli.use_simulated_cpu_devices()

    from train import config as config_lib
    from train import loop
    from train.checkpoint import Checkpointer, abstract_state

    with cli.user_errors():
        if args.batches < 1:
            raise config_lib.ConfigError(f"--batches must be >= 1, got {args.batches}")
        cfg = config_lib.load(args.config, cli.overrides(args))
        setup = loop.build(cfg)
        state, offset, source = setup.state, 0, "initialisation"
        checkpoints = args.workdir / "checkpoints"
        if checkpoints.exists() or args.resume:
            checkpointer = Checkpointer(checkpoints, cfg.checkpoint)
            try:
                resumed = checkpointer.resume(abstract_state(setup.state))
            finally:
                checkpointer.close()
            if resumed is not None:
                step, state, meta = resumed
                offset = loop.DataPosition.from_meta(meta).offset
                source = str(checkpointer.step_path(step))
    first = int(state.step) + offset
    batches = [loop.train_batch(setup, first + k) for k in range(args.batches)]
    flow = {"source": source, **gradient_flow(setup, state, batches)}
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "gradient_flow.json").write_text(json.dumps(flow, indent=1) + "\n")
    plot_gradient_flow(flow, args.workdir / "gradient_flow.png")
    print(
        f"gradient flow of {len(flow['layers'])} parameters at step {flow['step']} "
        f"({source}), {args.batches} batch(es): no gradient: "
        f"{', '.join(flow['no_gradient']) or 'none'}; {flow['nonfinite']['message']}; "
        f"outputs in {args.workdir}"
    )
    return flow


if __name__ == "__main__":
    main()
