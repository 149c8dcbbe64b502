"""optim_jax optimizers side by side with their Optax counterparts, in one process and one run.

Run ``python -m benchmarks.optimizers`` (``--help`` for the options). For each
optimizer with an Optax counterpart (:data:`ENTRIES`) it measures:

* **Step time**: the median wall time of one jitted step
  ``updates, state = tx.update(grads, state, params); params = params + updates``
  with ``params`` and ``state`` donated (updated in place), timed to
  ``jax.block_until_ready``, in three variants (:data:`VARIANTS`): ``ours``
  and ``optax`` on the per-leaf pytree, and ``flat``, optim_jax's same
  transformation on the stored flat multi-tensor layout (:mod:`optim_jax.flat`):
  parameters, optimizer state and gradients are packed once, before timing, into
  one buffer per dtype, as a program that keeps its parameters flat holds them
  (its gradients arrive flat, as the transpose of the model's ``layout.unpack``).
  Every optimizer has the flat variant: elementwise rules, the global norm, LAMB's
  per-tensor norms (summed by chunks on the layout) and Adafactor's factored
  statistics (on stacks of same-shaped tensors, with the layout's ``by_shape``
  option: :attr:`Entry.flat_by_shape`).
  Warm-up calls are excluded; the variants' steps are interleaved (ours, flat,
  Optax, Optax, flat, ours, ...) so that load from other processes hits all alike.
  Two float32 pytrees of about ``--size`` parameters: ``transformer``, a 4-layer
  transformer-like tree of a few big matrices (embedding, attention and MLP
  kernels, norms and biases: 51 leaves), and
  ``split``, the same kind of tree with about the same size spread over
  ``--leaves`` leaves (narrower, more layers).
* **Bandwidth**: :data:`BYTE_MODELS` states, per optimizer, the bytes per
  parameter that one step must move at the least; ``bytes x parameters / step
  time`` is the achieved bandwidth, shown as a percentage of a copy ceiling
  measured in the same run (the better of an in-place scale ``x <- c x``, 8 bytes
  per element, and an in-place triad ``x <- x + c y``, 12 bytes per element, over
  arrays as large as the pytree; measured before and after the step timings, the
  larger is kept).
* **Compile time** of the same step (trace, lowering and XLA compilation, on
  abstract arguments: nothing is allocated) against the number of leaves
  (``--compile-leaves``; the step-time pytrees add two more points); the flat
  variant's on the stored layout, as timed. Beside it, ``pack s``: compiling the
  ``layout.pack`` of per-leaf gradients, which a program adds when its gradients
  come from per-leaf code (one that stores its parameters flat compiles instead
  the transpose of ``layout.unpack``, one concatenation per buffer, in its
  model's backward pass).
* **Pack time**, per pytree: the median wall time of the jitted ``layout.pack``
  of the per-leaf gradients (not donated), the copy a flat step makes when its
  gradients come from per-leaf code: add it to the flat step time in that case.
* **State bytes per parameter**: every leaf of the optimizer state, counters
  included, over the number of parameters.
* **Page faults per step**: the median over the timed calls of the minor page
  faults the process took during one step. A program that reuses its donated
  buffers takes none; one that allocates a large buffer in each step (on CPU,
  the allocator maps it afresh each time) takes one per 4 KiB page it writes,
  and pays for it in time.

The last column of both tables, ``best ours/optax``, is the ratio optim_jax / Optax
with optim_jax's faster variant: ``min(ours, flat) / optax`` (``ours / optax`` where
there is no flat variant); below 1, optim_jax is faster. The columns before it
give each variant's ratio. Results go to stdout and, as JSON and Markdown,
to ``--out`` (default ``benchmarks/results/``) under
``optimizers_<device kind>_<date>_<time>.{json,md}``. The numbers are only
comparable within one run: on a shared machine, read the ratios, and the load
averages recorded with them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optim_jax
from benchmarks import report
from optim_jax import FlatLayout, FlatParams

F32 = 4  # bytes per float32 element
LIBS = ("ours", "optax")  # the two libraries, on the per-leaf pytree
# What is timed: optim_jax and Optax on the per-leaf pytree, and optim_jax's same
# transformation on the stored flat layout ("flat").
VARIANTS = ("ours", "flat", "optax")
DEFAULT_SIZE = 2**26  # 67,108,864 parameters ("64M")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"

# Bytes one step must move per float32 parameter, at the least: every parameter-sized
# buffer read or written counts 4 bytes per pass over memory (p: parameters, g: gradients,
# b, m, v: momentum / first / second moment). Small buffers (counters, norms, Adafactor's
# row and column statistics) are left out.
BYTE_MODELS: dict[str, tuple[int, str]] = {
    "sgd_momentum": (5 * F32, "read p, g, b; write p, b"),
    "adam": (7 * F32, "read p, g, m, v; write p, m, v"),
    "adamw": (7 * F32, "read p, g, m, v; write p, m, v"),
    "adamw_decay_mask": (7 * F32, "read p, g, m, v; write p, m, v"),
    # The trust ratio needs ||p|| and ||update|| over the whole leaf before p can be
    # written, so two passes: the first reads p, g, m, v and writes m, v (and the norms),
    # the second reads p, m, v again and writes p.
    "lamb": (10 * F32, "pass 1: read p, g, m, v; write m, v. pass 2: read p, m, v; write p"),
    "lion": (5 * F32, "read p, g, m; write p, m"),
    # Factored second moment, no first moment: the row/column means of g^2 and RMS(p)
    # need one pass, RMS(update) for the update clipping a second over g, the step a third.
    "adafactor": (6 * F32, "pass 1: read g, p. pass 2: read g. pass 3: read p, g; write p"),
    # The global norm needs a pass over g before AdamW's single pass can scale it.
    "clip_adamw_cosine": (8 * F32, "pass 1: read g. pass 2: read p, g, m, v; write p, m, v"),
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One optimizer: optim_jax's and Optax's constructors for the same update rule.

    ``flat_by_shape``: the flat variant's layout gives each kind of tensor (dtype,
    sharding, shape) a buffer of its own (``optim_jax.flat_layout(..., by_shape=True)``),
    as rules that reduce over tensor axes (Adafactor) want; otherwise one per dtype.
    """

    name: str
    make_ours: Callable[[], optax.GradientTransformation]
    make_optax: Callable[[], optax.GradientTransformation]
    flat_by_shape: bool = False

    @property
    def bytes_per_param(self) -> int:
        return BYTE_MODELS[self.name][0]

    def make(self, variant: str) -> optax.GradientTransformation:
        """The transformation of a variant: "flat" is optim_jax's, given flat parameters."""
        if variant not in VARIANTS:
            raise ValueError(f"{self.name} has no variant {variant!r}; it has {VARIANTS}")
        return self.make_optax() if variant == "optax" else self.make_ours()

    def flat_layout(self, params: Any) -> FlatLayout:
        """The flat variant's layout of ``params`` (per-leaf, abstract or concrete)."""
        return optim_jax.flat_layout(abstract(params), by_shape=self.flat_by_shape)


# Learning-rate schedule of the chain: warm-up from 0 to 1e-3 over 100 updates, cosine
# decay to 1e-5 at 10,000 (warm-up included); the two libraries' schedules agree.
CHAIN_SCHEDULE = (0.0, 1e-3, 100, 10_000, 1e-5)

# Hyperparameters chosen so that each pair computes the same update (checked by
# tests/benchmarks/test_optimizers_benchmark.py): where the two libraries' defaults differ
# (AdamW's and Lion's weight decay, Adafactor's factoring threshold) both are given.
ENTRIES: tuple[Entry, ...] = (
    Entry(
        "sgd_momentum",
        lambda: optim_jax.sgd(0.1, momentum=0.9),
        lambda: optax.sgd(0.1, momentum=0.9),
    ),
    Entry("adam", lambda: optim_jax.adam(1e-3), lambda: optax.adam(1e-3)),
    Entry(
        "adamw",
        lambda: optim_jax.adamw(1e-3, weight_decay=0.01),
        lambda: optax.adamw(1e-3, weight_decay=0.01),
    ),
    # The trainer's optimizer: no decay on biases, norm scales and the embedding.
    Entry(
        "adamw_decay_mask",
        lambda: optim_jax.adamw(1e-3, weight_decay=0.01, mask=optim_jax.decay_mask),
        lambda: optax.adamw(1e-3, weight_decay=0.01, mask=optim_jax.decay_mask),
    ),
    Entry(
        "lamb",
        lambda: optim_jax.lamb(1e-3, weight_decay=0.01),
        lambda: optax.lamb(1e-3, weight_decay=0.01),
    ),
    Entry(
        "lion",
        lambda: optim_jax.lion(1e-4, weight_decay=0.01),
        lambda: optax.lion(1e-4, weight_decay=0.01),
    ),
    Entry(
        "adafactor",
        lambda: optim_jax.adafactor(1e-2, min_dim_size_to_factor=128),
        lambda: optax.adafactor(1e-2, min_dim_size_to_factor=128),
        flat_by_shape=True,  # its statistics reduce over each stack of same-shaped tensors
    ),
    Entry(
        "clip_adamw_cosine",
        lambda: optax.chain(
            optim_jax.clip_by_global_norm(1.0),
            optim_jax.adamw(optim_jax.warmup_cosine_decay(*CHAIN_SCHEDULE), weight_decay=0.1),
        ),
        lambda: optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(optax.warmup_cosine_decay_schedule(*CHAIN_SCHEDULE), weight_decay=0.1),
        ),
    ),
)
ENTRY_NAMES = tuple(entry.name for entry in ENTRIES)
assert set(ENTRY_NAMES) == set(BYTE_MODELS)

# ----------------------------------------------------------------------------- pytrees

# Leaves of one pre-norm transformer layer: (path, shape in units of the model width d).
LAYER_PATTERN: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("attn_norm/scale", (1,)),
    ("attn_norm/bias", (1,)),
    ("attn/qkv/kernel", (1, 3)),
    ("attn/qkv/bias", (3,)),
    ("attn/out/kernel", (1, 1)),
    ("attn/out/bias", (1,)),
    ("mlp_norm/scale", (1,)),
    ("mlp_norm/bias", (1,)),
    ("mlp/in/kernel", (1, 4)),
    ("mlp/in/bias", (4,)),
    ("mlp/out/kernel", (4, 1)),
    ("mlp/out/bias", (1,)),
)
HEAD_PATTERN: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("final_norm/scale", (1,)),
    ("final_norm/bias", (1,)),
)
TRANSFORMER_LAYERS = 4
TRANSFORMER_LEAVES = 1 + len(HEAD_PATTERN) + TRANSFORMER_LAYERS * len(LAYER_PATTERN)  # 51
EMBEDDING_SHARE = 0.2  # about this fraction of the parameters sits in the embedding
MAX_WIDTH = 8192


def _next_width(d: int) -> int:
    return d + (8 if d < 256 else 64)


def tree_shapes(size: int, n_leaves: int) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of a transformer-like pytree: ``n_leaves`` leaves, about ``size`` params.

    The leaves are an embedding ``(vocab, d)``, the final norm, then the leaves of
    :data:`LAYER_PATTERN` layer after layer (the last layer may be partial). The
    width ``d`` is the largest (a multiple of 8, of 64 from 256 on) that leaves about
    a fifth of ``size`` to the embedding, and ``vocab`` fills the rest. With very
    many leaves for ``size``, ``d`` stays at 8 and the tree is larger than ``size``.
    """
    if n_leaves < 1 or size < 1:
        raise ValueError(f"need n_leaves >= 1 and size >= 1, got {n_leaves} and {size}")
    body = list(HEAD_PATTERN)
    for k in range(n_leaves - 1 - len(HEAD_PATTERN)):
        path, mult = LAYER_PATTERN[k % len(LAYER_PATTERN)]
        body.append((f"layer_{k // len(LAYER_PATTERN):03d}/{path}", mult))
    body = body[: n_leaves - 1]

    def body_params(d: int) -> int:
        return sum(math.prod(mult) * d ** len(mult) for _, mult in body)

    budget = (1 - EMBEDDING_SHARE) * size
    d = 8
    while _next_width(d) <= MAX_WIDTH and body_params(_next_width(d)) <= budget:
        d = _next_width(d)
    vocab = max(1, (size - body_params(d)) // d)
    shapes = {"embed/embedding": (vocab, d)}
    shapes.update({path: tuple(m * d for m in mult) for path, mult in body})
    return shapes


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def abstract_tree(shapes: dict[str, tuple[int, ...]]) -> Any:
    return nest({path: jax.ShapeDtypeStruct(shape, jnp.float32) for path, shape in shapes.items()})


def random_tree(shapes: dict[str, tuple[int, ...]], seed: int, scale: float) -> Any:
    """Fresh device buffers of normal noise (the same values for the same seed)."""
    key = jax.random.key(seed)
    return nest(
        {
            path: scale * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
            for i, (path, shape) in enumerate(shapes.items())
        }
    )


def num_params(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shape) for shape in shapes.values())


def tree_bytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- timing


def make_step(tx: optax.GradientTransformation, stored_after: bool = False) -> Callable:
    """The step: update, apply; with ``stored_after``, the state's lower-precision moments
    stored after the new parameters (``optim_jax.stored_after``)."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        if stored_after:
            state = optim_jax.stored_after(state, params)
        return params, state

    return step


def abstract(tree: Any) -> Any:
    """``tree`` as ``jax.ShapeDtypeStruct`` leaves (shape and dtype only)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def compile_step(
    tx: optax.GradientTransformation, params: Any, stored_after: bool = False
) -> tuple[Any, float, Any]:
    """``(compiled step, seconds to trace + lower + compile, abstract state)``.

    ``params`` may be abstract (``jax.ShapeDtypeStruct``) or concrete; a new
    ``jax.jit`` object each time, so nothing comes from JAX's in-memory caches.
    """
    params = abstract(params)
    state = jax.eval_shape(tx.init, params)
    start = time.perf_counter()
    jitted = jax.jit(make_step(tx, stored_after), donate_argnums=(0, 1))
    compiled = jitted.lower(params, state, params).compile()
    return compiled, time.perf_counter() - start, state


def abstract_flat(params: Any, by_shape: bool = False) -> tuple[FlatLayout, FlatParams]:
    """``(layout, abstract flat params)`` of a per-leaf pytree (abstract or concrete)."""
    params = abstract(params)
    layout = optim_jax.flat_layout(params, by_shape=by_shape)
    return layout, jax.eval_shape(layout.pack, params)


def compile_pack(params: Any) -> float:
    """Seconds to trace, lower and compile ``layout.pack`` of per-leaf gradients shaped like
    ``params`` (abstract or concrete): what a program that packs its gradients inside its
    step adds to the flat step's compile time. A program that stores its parameters flat
    pays instead for the transpose of ``layout.unpack`` (one concatenation per buffer) in its
    model's backward pass.
    """
    layout, _ = abstract_flat(params)
    # The pack is jitted with the layout static: a warm trace cache would hide its trace.
    jax.clear_caches()
    start = time.perf_counter()
    jax.jit(layout.pack).lower(abstract(params)).compile()
    return time.perf_counter() - start


class Loop:
    """Calls ``carry = fn(*carry, *consts)`` and times each call to completion; ``faults``
    collects each call's minor page faults (None where they are not counted)."""

    def __init__(self, fn: Callable, carry: tuple, *consts: Any):
        self.fn, self.carry, self.consts = fn, carry, consts
        self.faults: list[int | None] = []

    def __call__(self) -> float:
        with report.PageFaults() as faults:
            start = time.perf_counter()
            self.carry = self.fn(*self.carry, *self.consts)
            jax.block_until_ready(self.carry)
            seconds = time.perf_counter() - start
        self.faults.append(faults.count)
        return seconds


def time_interleaved(loops: dict[str, Loop], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Per-call times of each loop; calls alternate between loops, order reversed every round."""
    for _ in range(warmup):
        for loop in loops.values():
            loop()
    samples: dict[str, list[float]] = {name: [] for name in loops}
    names = list(loops)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            samples[name].append(loops[name]())
    return samples


def measure_ceiling(n: int, warmup: int, repeats: int) -> dict[str, float]:
    """Bandwidth (bytes/s) of in-place scale and triad kernels over ``n`` float32 elements."""
    scale = jax.jit(lambda x, c: (x * c,), donate_argnums=0)
    triad = jax.jit(lambda x, y, c: (x + c * y,), donate_argnums=0)
    c = jnp.float32(1.0)  # an argument, so XLA cannot fold the multiplication away
    y = jnp.full((n,), 1.0, jnp.float32)
    loops = {
        "scale": Loop(scale, (jnp.full((n,), 1.0, jnp.float32),), c),
        "triad": Loop(triad, (jnp.full((n,), 1.0, jnp.float32),), y, c),
    }
    samples = time_interleaved(loops, warmup, repeats)
    moved = {"scale": 2 * F32 * n, "triad": 3 * F32 * n}
    return {name: moved[name] / statistics.median(ts) for name, ts in samples.items()}


def xla_bytes_accessed(compiled: Any) -> float:
    """The bytes XLA's cost analysis counts for one call of a compiled step: what the
    fused kernels it chose read and write, to set beside the byte model's floor."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per device program
        analysis = analysis[0]
    return float(analysis["bytes accessed"])


def time_pack(grads: Any, warmup: int, repeats: int) -> list[float]:
    """Per-call times of the compiled ``layout.pack`` of the per-leaf ``grads`` (not donated)."""
    layout = optim_jax.flat_layout(grads)
    pack = jax.jit(layout.pack).lower(grads).compile()
    # The carry is the last result, which each call drops: every call packs ``grads`` afresh.
    loop = Loop(lambda _last, tree: (pack(tree),), (None,), grads)
    return time_interleaved({"pack": loop}, warmup, repeats)["pack"]


def bench_steps(
    entry: Entry, shapes: dict[str, tuple[int, ...]], grads: Any, warmup: int, repeats: int
) -> dict[str, Any]:
    """Step times, compile times and state sizes of every variant of ``entry`` on one pytree.

    The flat variant's step time and compile time are those of the stored layout (flat
    gradients, packed before timing and compiling).
    """
    loops, compile_s, state_bytes, xla_bytes = {}, {}, {}, {}
    for variant in VARIANTS:
        tx = entry.make(variant)
        params = random_tree(shapes, seed=0, scale=0.02)
        variant_grads = grads
        if variant == "flat":
            layout = entry.flat_layout(params)
            params, variant_grads = layout.pack(params), layout.pack(grads)
        compiled, compile_s[variant], abstract_state = compile_step(tx, params)
        state_bytes[variant] = tree_bytes(abstract_state)
        xla_bytes[variant] = xla_bytes_accessed(compiled)
        loops[variant] = Loop(compiled, (params, tx.init(params)), variant_grads)
        del params, variant_grads  # the loop holds them: donated at its first call
    samples = time_interleaved(loops, warmup, repeats)
    n = num_params(shapes)
    faults = {v: loops[v].faults[-repeats:] for v in VARIANTS}
    return {
        "optimizer": entry.name,
        "leaves": len(shapes),
        "params": n,
        "flat_by_shape": entry.flat_by_shape,
        "bytes_per_param": entry.bytes_per_param,
        "state_bytes_per_param": {v: state_bytes[v] / n for v in VARIANTS},
        "xla_bytes_per_param": {v: xla_bytes[v] / n for v in VARIANTS},
        "compile_s": compile_s,
        "step_s": {v: statistics.median(samples[v]) for v in VARIANTS},
        "samples_s": samples,
        "page_faults_per_step": {v: report.faults_per_step(faults[v]) for v in VARIANTS},
    }


def bench_compile(entry: Entry, n_leaves: int, size: int) -> dict[str, float]:
    """Compile seconds of every variant of ``entry`` at ``n_leaves`` leaves (abstract); the
    flat variant's on the stored layout, as timed in the step table."""
    per_leaf = abstract_tree(tree_shapes(size, n_leaves))
    flat = abstract_flat(per_leaf, by_shape=entry.flat_by_shape)[1]
    return {
        variant: compile_step(entry.make(variant), flat if variant == "flat" else per_leaf)[1]
        for variant in VARIANTS
    }


def ratios(seconds: dict[str, float]) -> dict[str, float | None]:
    """Time ratios against Optax: ours, flat (None without that variant), and the better one."""
    flat = seconds.get("flat")
    return {
        "ratio": seconds["ours"] / seconds["optax"],
        "ratio_flat": None if flat is None else flat / seconds["optax"],
        "best_ratio": min(seconds["ours"], seconds.get("flat", math.inf)) / seconds["optax"],
    }


# ----------------------------------------------------------------------------- tables


def _cell(value: float | None, scale: float, digits: int) -> str:
    """``value x scale`` with ``digits`` decimals; "-" where the variant does not exist."""
    return "-" if value is None else f"{scale * value:.{digits}f}"


# The last columns of both tables: each variant against Optax, then the faster one.
RATIO_COLUMNS: list[report.Column] = [
    ("ratio ours/optax", lambda r: _cell(r["ratio"], 1, 2)),
    ("ratio flat/optax", lambda r: _cell(r["ratio_flat"], 1, 2)),
    ("best ours/optax", lambda r: _cell(r["best_ratio"], 1, 2)),
]

STEP_COLUMNS: list[report.Column] = [
    ("optimizer", lambda r: r["optimizer"]),
    ("pytree", lambda r: f"{r['pytree']} ({r['leaves']} leaves)"),
    ("model B/param", lambda r: str(r["bytes_per_param"])),
    ("state B/param ours", lambda r: f"{r['state_bytes_per_param']['ours']:.2f}"),
    ("state B/param optax", lambda r: f"{r['state_bytes_per_param']['optax']:.2f}"),
    (
        "XLA B/param ours/flat/optax",
        lambda r: "/".join(_cell(r["xla_bytes_per_param"].get(v), 1, 0) for v in VARIANTS),
    ),
    (
        "page faults/step ours/flat/optax",
        lambda r: "/".join(_cell(r["page_faults_per_step"].get(v), 1, 0) for v in VARIANTS),
    ),
    ("ours ms", lambda r: _cell(r["step_s"]["ours"], 1e3, 2)),
    ("flat ms", lambda r: _cell(r["step_s"].get("flat"), 1e3, 2)),
    ("optax ms", lambda r: _cell(r["step_s"]["optax"], 1e3, 2)),
    ("ours % ceiling", lambda r: _cell(r["fraction_of_ceiling"]["ours"], 100, 0)),
    ("flat % ceiling", lambda r: _cell(r["fraction_of_ceiling"].get("flat"), 100, 0)),
    ("optax % ceiling", lambda r: _cell(r["fraction_of_ceiling"]["optax"], 100, 0)),
    *RATIO_COLUMNS,
]

COMPILE_COLUMNS: list[report.Column] = [
    ("optimizer", lambda r: r["optimizer"]),
    ("leaves", lambda r: str(r["leaves"])),
    ("ours s", lambda r: _cell(r["compile_s"]["ours"], 1, 2)),
    ("flat s", lambda r: _cell(r["compile_s"].get("flat"), 1, 2)),
    ("pack s", lambda r: _cell(r["pack_compile_s"], 1, 2)),
    ("optax s", lambda r: _cell(r["compile_s"]["optax"], 1, 2)),
    *RATIO_COLUMNS,
]


# ----------------------------------------------------------------------------- report


def summary_lines(result: dict[str, Any]) -> list[str]:
    meta, ceiling = result["meta"], result["ceiling"]
    gbs = lambda x: f"{x / 1e9:.1f} GB/s"  # noqa: E731
    pytrees = ", ".join(f"{name} {n:,} params" for name, n in meta["pytree_params"].items())
    lines = [
        *report.machine_lines(meta),
        f"pytrees: {pytrees}; float32; {meta['warmup']} warm-up calls, median of "
        f"{meta['repeats']} timed calls",
        f"copy ceiling: {gbs(ceiling['bytes_per_s'])} (scale {gbs(ceiling['start']['scale'])} / "
        f"{gbs(ceiling['end']['scale'])}, triad {gbs(ceiling['start']['triad'])} / "
        f"{gbs(ceiling['end']['triad'])}, before / after the step timings)",
    ]
    if result["pack"]:
        packs = ", ".join(f"{name} {1e3 * p['pack_s']:.2f}" for name, p in result["pack"].items())
        lines.append(
            f"pack ms (per-leaf gradients into the flat layout, not in flat ms: add it when "
            f"gradients come from per-leaf code): {packs}"
        )
    return lines


def format_report(result: dict[str, Any], markdown: bool) -> str:
    steps = report.render(result["tables"]["steps"], markdown)
    compiles = report.render(result["tables"]["compile"], markdown)
    if markdown:
        byte_models = [f"| {n} | {b} | {d} |" for n, (b, d) in result["byte_models"].items()]
        return "\n".join(
            ["# optim_jax vs Optax: optimizer steps", ""]
            + [f"- {line}" for line in summary_lines(result)]
            + ["", "## Step time (ratio < 1: optim_jax faster)", "", steps]
            + ["", "## Compile time (trace + lower + compile)", "", compiles]
            + ["", "## Byte models", "", "| optimizer | B/param | accesses |", "|---|---:|---|"]
            + byte_models
            + [""]
        )
    return "\n".join(
        summary_lines(result)
        + ["", "Step time (ratio < 1: optim_jax faster)", steps]
        + ["", "Compile time, seconds (trace + lower + compile)", compiles, ""]
    )


# ----------------------------------------------------------------------------- driver


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"leaf counts must be >= 1, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.optimizers",
        description="optim_jax vs Optax: step time, bandwidth, compile time, state size.",
    )
    parser.add_argument("--size", type=report.positive_int, default=DEFAULT_SIZE, help="parameters")
    parser.add_argument(
        "--leaves", type=report.positive_int, default=1000, help="leaves of the split pytree"
    )
    parser.add_argument(
        "--repeats", type=report.positive_int, default=10, help="timed calls per step"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument(
        "--optimizers",
        type=report.names_from(ENTRY_NAMES, "optimizer"),
        default=list(ENTRY_NAMES),
        help=f"comma-separated subset of {','.join(ENTRY_NAMES)}",
    )
    parser.add_argument(
        "--compile-leaves",
        type=_int_list,
        default=[10, 100, 1000, 3000],
        help="leaf counts of the compile-time sweep (comma-separated; empty for none)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="leave out compile-sweep counts above 1000 (Optax takes minutes there on CPU)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.quick:
        args.compile_leaves = [n for n in args.compile_leaves if n <= 1000]
    return args


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Runs every measurement and returns the result (records, tables, metadata)."""
    entries = [entry for entry in ENTRIES if entry.name in args.optimizers]
    meta = report.environment() | {
        "command": command,
        "load_start": report.load_average(),
        "size": args.size,
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    pytrees = {
        "transformer": tree_shapes(args.size, TRANSFORMER_LEAVES),
        "split": tree_shapes(args.size, args.leaves),
    }
    meta["pytree_params"] = {name: num_params(shapes) for name, shapes in pytrees.items()}
    n_ceiling = max(meta["pytree_params"].values())

    _progress("measuring the copy ceiling")
    ceiling = {"start": measure_ceiling(n_ceiling, args.warmup, args.repeats)}

    steps, compile_s, pack = [], {}, {}
    pack_compile_s: dict[int, float] = {}  # leaves -> seconds to compile the pack
    for tree_name, shapes in pytrees.items():
        grads = random_tree(shapes, seed=1, scale=1e-3)
        _progress(f"pack time: {tree_name} ({len(shapes)} leaves)")
        samples = time_pack(grads, args.warmup, args.repeats)
        pack[tree_name] = {"pack_s": statistics.median(samples), "samples_s": samples}
        pack_compile_s[len(shapes)] = compile_pack(grads)
        for entry in entries:
            _progress(f"step time: {entry.name} on {tree_name} ({len(shapes)} leaves)")
            record = {"pytree": tree_name} | bench_steps(
                entry, shapes, grads, args.warmup, args.repeats
            )
            steps.append(record)
            compile_s[entry.name, len(shapes)] = record["compile_s"]
        del grads

    ceiling["end"] = measure_ceiling(n_ceiling, args.warmup, args.repeats)
    ceiling["bytes_per_s"] = max(max(ceiling["start"].values()), max(ceiling["end"].values()))
    for record in steps:
        rates = {
            variant: record["bytes_per_param"] * record["params"] / seconds
            for variant, seconds in record["step_s"].items()
        }
        record["bandwidth_bytes_per_s"] = rates
        record["fraction_of_ceiling"] = {
            variant: rate / ceiling["bytes_per_s"] for variant, rate in rates.items()
        }
        record.update(ratios(record["step_s"]))

    for entry in entries:
        for n in args.compile_leaves:
            if n not in pack_compile_s:
                _progress(f"compile time: pack at {n} leaves")
                pack_compile_s[n] = compile_pack(abstract_tree(tree_shapes(args.size, n)))
            if (entry.name, n) not in compile_s:
                _progress(f"compile time: {entry.name} at {n} leaves")
                compile_s[entry.name, n] = bench_compile(entry, n, args.size)
    compiles = [
        {
            "optimizer": name,
            "leaves": n,
            "compile_s": s,
            "pack_compile_s": pack_compile_s[n],
        }
        | ratios(s)
        for (name, n), s in sorted(
            compile_s.items(), key=lambda kv: (ENTRY_NAMES.index(kv[0][0]), kv[0][1])
        )
    ]
    meta["load_end"] = report.load_average()
    return {
        "meta": meta,
        "byte_models": {entry.name: BYTE_MODELS[entry.name] for entry in entries},
        "ceiling": ceiling,
        "pack": pack,
        "steps": steps,
        "compile": compiles,
        "tables": {
            "steps": report.build_table(STEP_COLUMNS, steps),
            "compile": report.build_table(COMPILE_COLUMNS, compiles),
        },
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # Compile times must not come from a persistent compilation cache (JAX settles this at a
    # process's first compile, so it holds when main is the first, as on the command line).
    jax.config.update("jax_enable_compilation_cache", False)
    result = run(args, report.command_line("benchmarks.optimizers", argv))
    report.publish(result, args.out, "optimizers", format_report)
    return result


if __name__ == "__main__":
    main()
