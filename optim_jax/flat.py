"""The flattened multi-tensor layout: parameters and optimizer state in a few flat buffers.

An optimizer step over a pytree of many leaves runs one small kernel per leaf
and compiles one piece of code per leaf: compile time grows with the leaf count
and small leaves waste memory bandwidth. :class:`FlatLayout` keeps the same
numbers in a few buffers instead, one per group of leaves that share a dtype
and a sharding, so an elementwise optimizer updates each group in one fused
pass and compiles the same code whatever the number of leaves.

The layout is meant to be *stored*: pack the parameters once, keep them (and
hence the optimizer state) flat across steps, and give the model views::

    layout = flat_layout(params)
    flat_params = layout.pack(params)
    opt_state = tx.init(flat_params)

    def loss_fn(flat_params, batch):
        return model_loss(layout.unpack(flat_params), batch)

    grads = jax.grad(loss_fn)(flat_params, batch)  # flat, like flat_params
    updates, opt_state = tx.update(grads, opt_state, flat_params)
    flat_params = optax.apply_updates(flat_params, updates)

Packing inside every step instead (flat buffers built from per-leaf arrays and
cut up again afterwards) costs a copy of every buffer each way; on CPU XLA
that copy is slower than the whole per-leaf update, which is why the layout
is the stored form.

**Sharding.** Each group buffer has shape ``(shards, columns)``: row ``r`` holds,
one after another, the ``r``-th shard of every leaf of the group, so the buffer
is sharded along its first axis over the same mesh axes as the leaves and
packing, unpacking and the update need no communication. A leaf sharded over
mesh axes ``(a, b)`` (on whichever dimensions, in that order) joins the group
of its dtype and ``(a, b)``; replicated leaves form groups with one row. Only
``NamedSharding`` on meshes with Auto axes, and dimensions divisible by their
shard counts, are supported.

**Which transformations.** The flat buffers are ordinary arrays, so every
transformation whose update is elementwise (SGD with momentum, Adam, AdamW,
Lion, RMSprop, Adagrad, Sophia, value clipping, schedules) gives the per-leaf
path's results bit for bit (with XLA's default fusion: XLA:CPU's optional
multi-output fusion can round the two layouts' kernels an ulp apart), and one
that reduces over all leaves together (global-norm clipping) to float32
rounding: the same squares are added in another order. LAMB's and LARS's trust
ratios take the norm of each parameter tensor through :func:`map_per_tensor`,
which on the flat layout sums whole chunks: every leaf starts at a multiple of
:data:`CHUNK` columns (the gaps hold zeros, which these rules keep at zero), so
the norms cost a reshape, a sum and a segment sum whatever the number of
leaves; they too agree to float32 rounding. Masks (``mask=`` of the
weight-decay and LARS rules, through :func:`masked`) are given the per-leaf
view (:meth:`FlatLayout.abstract_leaves`), so :func:`optim_jax.decay_mask`
picks tensors by name and shape as it does per leaf, and the choice is applied
per chunk. Adafactor, whose statistics need each tensor's shape, sees the leaves
of one shape as one stack (:meth:`FlatLayout.runs`, :func:`map_runs`): its
compiled step grows with the number of distinct shapes, not of leaves, and its
state per tensor shape is kept as :class:`RunStacks`; build the layout with
``by_shape=True`` for it (a buffer per kind of tensor, which XLA:CPU's reductions
read in place). Rules that clip per unit of a tensor (adaptive gradient
clipping) or that give tensors different transformations by name (groups,
layer-wise decay), and int8 moments (a block would mix tensors of different
scales), refuse :class:`FlatParams` with an error (:func:`refuse_flat`) rather
than compute something else.

**Checkpoints and reports** read the per-leaf form: :func:`unflatten` turns every
:class:`FlatParams` (and :class:`RunStacks`) in a tree (parameters, optimizer state)
back into per-leaf arrays and :func:`flatten_like` packs them again, so what is saved
does not depend on the layout a program keeps.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from optim_jax.base import Array, Params

# Every leaf starts at a multiple of CHUNK columns (zeros fill the gaps), so that sums over
# one tensor are sums over whole chunks: a reshape, a sum and a segment sum over
# ``columns / CHUNK`` values, whatever the number of leaves. A group of one leaf needs no
# chunks (its tensor is the buffer) and holds the leaf unpadded: a view of it is then the
# whole buffer, never a slice, which XLA:CPU's reductions would read as a copy.
CHUNK = 128


class FlatLayoutError(ValueError):
    """Parameters the layout cannot hold, or a rule that cannot run on it."""


@dataclasses.dataclass(frozen=True)
class LeafSlot:
    """Where one leaf lives in its group buffer.

    ``grid[i]`` is the number of shards of dimension ``i``; the leaf occupies
    columns ``[offset, offset + columns)`` of every row of the group buffer, and
    ``offset`` is a multiple of :data:`CHUNK`; ``width`` is ``columns`` padded to a
    whole number of chunks (unpadded when the leaf is its group's only one).
    """

    path: str
    shape: tuple[int, ...]
    grid: tuple[int, ...]
    offset: int
    columns: int
    width: int
    sharding: NamedSharding | None

    @property
    def shard_shape(self) -> tuple[int, ...]:
        return tuple(d // n for d, n in zip(self.shape, self.grid, strict=True))

    def to_rows(self, x: Array) -> Array:
        """``x`` as ``(shards, columns)``: shard-major, each shard's values in row-major order.

        ``x`` may carry leading axes before the leaf's shape (a stack of leaves of this
        slot's shape and grid): they come after the shards, ``(shards, *lead, columns)``.
        """
        rank, lead = len(self.shape), x.shape[: x.ndim - len(self.shape)]
        interleaved = [s for n, d in zip(self.grid, self.shard_shape, strict=True) for s in (n, d)]
        b = len(lead)
        shard_first = (
            [b + 2 * i for i in range(rank)] + list(range(b)) + [b + 2 * i + 1 for i in range(rank)]
        )
        rows = x.reshape(*lead, *interleaved).transpose(shard_first)
        return rows.reshape(math.prod(self.grid), *lead, self.columns)

    def from_rows(self, rows: Array) -> Array:
        """The inverse of :meth:`to_rows` (leading axes included)."""
        rank, lead = len(self.shape), rows.shape[1:-1]
        b = len(lead)
        x = rows.reshape(*self.grid, *lead, *self.shard_shape)
        interleaved = [j for i in range(rank) for j in (i, rank + b + i)]
        x = x.transpose(*range(rank, rank + b), *interleaved)
        return x.reshape(*lead, *self.shape)


@dataclasses.dataclass(frozen=True)
class Group:
    """One flat buffer: leaves of one dtype sharded over the same mesh axes."""

    name: str
    dtype: np.dtype
    mesh: Mesh | None
    axes: tuple[str, ...]  # mesh axes of the buffer's first dimension, major first
    shards: int
    columns: int

    @property
    def sharding(self) -> NamedSharding | None:
        if self.mesh is None:
            return None
        return NamedSharding(self.mesh, PartitionSpec(self.axes or None, None))


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """How a pytree of arrays maps to a few flat group buffers (static, hashable).

    Build it with :func:`flat_layout`; :meth:`pack` and :meth:`unpack` move a
    pytree of that structure (parameters, gradients, updates) in and out of the
    layout, inside or outside ``jax.jit``.
    """

    treedef: Any
    groups: tuple[Group, ...]
    slots: tuple[LeafSlot, ...]  # one per leaf, in tree order
    leaf_groups: tuple[int, ...]  # group index of each leaf

    @property
    def num_leaves(self) -> int:
        return len(self.slots)

    def pack(self, tree: Params) -> FlatParams:
        """The leaves of ``tree`` gathered into the group buffers."""
        return _pack(self, tree)

    def unpack(self, flat: FlatParams) -> Params:
        """The pytree that :meth:`pack` was given, cut out of the group buffers.

        Differentiating through it gives a :class:`FlatParams` gradient: the
        cut is one split per buffer, whose transpose is one concatenation.
        """
        if not is_flat(flat) or flat.layout != self:
            raise FlatLayoutError("unpack: expected FlatParams packed with this layout")
        return _unpack(self, flat)

    def members(self, g: int) -> list[int]:
        """Indices (in tree order) of the leaves in group ``g``, in column order."""
        members = [i for i, lg in enumerate(self.leaf_groups) if lg == g]
        return sorted(members, key=lambda i: self.slots[i].offset)

    def runs(self, g: int) -> tuple[tuple[int, ...], ...]:
        """Group ``g``'s members cut into runs of side-by-side leaves of one shape and grid.

        A run's leaves can be seen together as one stacked array (:meth:`stacked`), so
        a rule that needs tensor shapes compiles once per kind of tensor rather than
        once per tensor.
        """

        def kind(i: int) -> tuple:
            return self.slots[i].shape, self.slots[i].grid

        return tuple(tuple(run) for _, run in itertools.groupby(self.members(g), key=kind))

    def stacked(self, run: Sequence[int], buffer: Array) -> Array:
        """The leaves of ``run`` (from :meth:`runs`) in a group buffer, as one array
        ``(len(run), *shape)``, sharded as each leaf is on its own axes."""
        slot = self.slots[run[0]]
        block = buffer[:, slot.offset : slot.offset + len(run) * slot.width]
        rows = block.reshape(buffer.shape[0], len(run), slot.width)[:, :, : slot.columns]
        return slot.from_rows(rows)

    def from_stacked(self, g: int, pieces: Sequence[Array]) -> Array:
        """Group ``g``'s buffer from one stacked array per run (the inverse of
        :meth:`stacked` over all of :meth:`runs`), padding with zeros; in the pieces' dtype."""
        rows = []
        for run, piece in zip(self.runs(g), pieces, strict=True):
            slot = self.slots[run[0]]
            run_rows = slot.to_rows(piece)
            gap = slot.width - slot.columns
            if gap:
                run_rows = jnp.pad(run_rows, ((0, 0), (0, 0), (0, gap)))
            rows.append(run_rows.reshape(run_rows.shape[0], -1))
        buffer = rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=1)
        return _constrain(buffer, self.groups[g].sharding)

    def _pack(self, tree: Params) -> FlatParams:
        leaves = self.treedef.flatten_up_to(tree)
        buffers = {}
        for g, group in enumerate(self.groups):
            rows = []
            for i in self.members(g):
                slot = self.slots[i]
                leaf_rows = slot.to_rows(jnp.asarray(leaves[i], group.dtype))
                rows.append(jnp.pad(leaf_rows, ((0, 0), (0, slot.width - slot.columns))))
            buffer = rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=1)
            buffers[group.name] = _constrain(buffer, group.sharding)
        return FlatParams(buffers, self)

    def _unpack(self, flat: FlatParams) -> Params:
        leaves: list[Array | None] = [None] * self.num_leaves
        for g, group in enumerate(self.groups):
            members = self.members(g)
            # One split per buffer (its transpose is one concatenation): each leaf, then the
            # zeros that pad it to a whole chunk, if any.
            bounds = [b for i in members for b in (self.slots[i].offset, self._end(i))]
            cuts = sorted(set(bounds) - {0, group.columns})
            split = jnp.split(flat.buffers[group.name], cuts, axis=1)
            pieces = dict(zip([0, *cuts], split, strict=True))
            for i in members:
                rows = pieces[self.slots[i].offset]
                leaves[i] = _constrain(self.slots[i].from_rows(rows), self.slots[i].sharding)
        return self.treedef.unflatten(leaves)

    def _end(self, i: int) -> int:
        return self.slots[i].offset + self.slots[i].columns

    def _tensor_of_chunk(self, g: int) -> Array:
        """For each column chunk of group ``g``'s buffer, the index (among the group's
        members) of the tensor it belongs to: computed, not a constant the size of the
        buffer's chunk count baked into the program."""
        starts = jnp.asarray([self.slots[i].offset // CHUNK for i in self.members(g)], jnp.int32)
        chunks = jnp.arange(self.groups[g].columns // CHUNK)
        return jnp.searchsorted(starts, chunks, side="right") - 1

    def _group_index(self, name: str) -> int:
        return [group.name for group in self.groups].index(name)

    def _spread(self, g: int, per_chunk: Array) -> Array:
        """``(columns // CHUNK,)`` values as ``(1, columns)``: each repeated over its chunk.

        The result has the buffer's own shape (one row, broadcast over the shards), so a
        rule that combines it with the buffers stays elementwise on ``(shards, columns)``:
        XLA can then write the result over a donated operand in place, which it does not
        for a computation on a reshaped ``(shards, chunks, CHUNK)`` view (the step would
        end with a copy of the buffer).
        """
        chunks = self.groups[g].columns // CHUNK
        return jnp.broadcast_to(per_chunk[:, None], (chunks, CHUNK)).reshape(1, chunks * CHUNK)

    def tensor_norms(self, name: str, x: Array) -> Array:
        """The L2 norm of each tensor of group ``name``, spread over the tensor's columns.

        ``x`` is a ``(shards, columns)`` buffer of that group; the result has shape
        ``(1, columns)``: every element sees the norm of the parameter tensor it belongs
        to. Computed in float32 or wider, with the square root kept off zero as
        :func:`leaf_norm` does.
        """
        g = self._group_index(name)
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if len(self.members(g)) == 1:
            return jnp.broadcast_to(leaf_norm(x), (1, x.shape[1]))
        tensor_of_chunk = self._tensor_of_chunk(g)
        x = self.chunked(x)
        chunk_sums = _chunk_sums_of_squares(x)  # (shards, chunks)
        # Summed over each shard's chunks first, so that only one value per tensor and
        # shard crosses devices.
        sums = jax.ops.segment_sum(
            chunk_sums.T,
            tensor_of_chunk,
            num_segments=len(self.members(g)),
            indices_are_sorted=True,
        ).sum(axis=1)
        return self._spread(g, _sqrt_off_zero(sums)[tensor_of_chunk])

    def per_tensor(self, name: str, values: Sequence[Any]) -> Array:
        """One value per tensor of group ``name`` (in member order) spread over its columns:
        shape ``(1, columns)``, broadcastable against the group's buffers."""
        g = self._group_index(name)
        if len(values) != len(self.members(g)):
            raise FlatLayoutError(
                f"per_tensor: group {name!r} has {len(self.members(g))} tensors, "
                f"got {len(values)} values"
            )
        if len(values) == 1:
            return jnp.broadcast_to(jnp.asarray(values[0]), (1, self.groups[g].columns))
        return self._spread(g, jnp.asarray(values)[self._tensor_of_chunk(g)])

    def abstract_leaves(self) -> Params:
        """The per-leaf pytree as ``jax.ShapeDtypeStruct`` s (shape, dtype, sharding):
        what rules that choose parameters by name or shape (masks) are given."""
        leaves = [
            jax.ShapeDtypeStruct(slot.shape, self.groups[g].dtype, sharding=slot.sharding)
            for slot, g in zip(self.slots, self.leaf_groups, strict=True)
        ]
        return self.treedef.unflatten(leaves)

    @staticmethod
    def chunked(x: Array) -> Array:
        """A ``(shards, columns)`` buffer seen as ``(shards, columns // CHUNK, CHUNK)``."""
        return x.reshape(x.shape[0], x.shape[1] // CHUNK, CHUNK)

    def describe(self) -> str:
        """One line per group: name, shape, number of leaves."""
        lines = []
        for g, group in enumerate(self.groups):
            n = len(self.members(g))
            lines.append(f"{group.name}: ({group.shards}, {group.columns}) from {n} leaves")
        return "\n".join(lines)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class FlatParams:
    """A pytree packed by a :class:`FlatLayout`: ``{group name: (shards, columns) buffer}``.

    Its leaves are the group buffers, so ``jax.tree.map``, Optax transformations,
    ``optax.apply_updates`` and checkpointing treat it as a small pytree; the
    layout rides along as static metadata.
    """

    buffers: dict[str, Array]
    layout: FlatLayout = dataclasses.field(metadata={"static": True}, repr=False)


def is_flat(x: Any) -> bool:
    return isinstance(x, FlatParams)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RunStacks:
    """Values that follow each tensor's shape, kept per run of a :class:`FlatLayout`.

    ``stacks[g][r]`` holds one value per leaf of ``layout.runs(g)[r]``, stacked along
    a first axis (Adafactor's row statistics of ``k`` matrices ``(rows, cols)``:
    ``(k, rows)``), or None where those leaves keep no such value. Optimizer state of
    this kind cannot live in the group buffers, whose columns follow the parameters;
    :func:`unflatten` gives it back per leaf, as the per-leaf path keeps it.
    """

    stacks: tuple[tuple[Array | None, ...], ...]
    layout: FlatLayout = dataclasses.field(metadata={"static": True}, repr=False)


def _is_packed(x: Any) -> bool:
    return isinstance(x, FlatParams | RunStacks)


def map_runs(
    fn: Callable[..., tuple],
    n_outputs: int,
    tree: FlatParams,
    *rest: Any,
    flat_outputs: Sequence[int] = (),
) -> tuple:
    """Applies ``fn`` to each run of leaves of one shape (:meth:`FlatLayout.runs`).

    ``fn`` gets, for each run, the run's leaves of ``tree`` and of every
    :class:`FlatParams` in ``rest`` stacked as ``(k, *shape)``, the run's entry of
    every :class:`RunStacks`, and, from any other ``rest`` argument (a per-leaf
    pytree of Python values, such as a mask, or None), the tuple of its ``k`` leaves'
    values. It returns ``n_outputs`` stacked values (or None); outputs listed in
    ``flat_outputs`` are assembled into :class:`FlatParams` (in the pieces' dtype),
    the others kept as :class:`RunStacks`; a flat output that is None for every run
    is None. The compiled program grows with the number of runs (kinds of tensor), not
    of leaves.
    """
    layout = tree.layout
    per_leaf = [None if _is_packed(x) else layout.treedef.flatten_up_to(x) for x in rest]
    outputs: list[list[list[Any]]] = [[] for _ in range(n_outputs)]
    for g, group in enumerate(layout.groups):
        for column in outputs:
            column.append([])
        for r, run in enumerate(layout.runs(g)):
            args: list[Any] = [layout.stacked(run, tree.buffers[group.name])]
            for x, leaves in zip(rest, per_leaf, strict=True):
                if isinstance(x, FlatParams):
                    args.append(layout.stacked(run, x.buffers[group.name]))
                elif isinstance(x, RunStacks):
                    args.append(x.stacks[g][r])
                else:
                    args.append(tuple(leaves[i] for i in run))
            for column, value in zip(outputs, fn(*args), strict=True):
                column[g].append(value)
    results = []
    for o, column in enumerate(outputs):
        if o in flat_outputs and all(piece is None for pieces in column for piece in pieces):
            results.append(None)
        elif o in flat_outputs:
            buffers = {
                group.name: layout.from_stacked(g, column[g])
                for g, group in enumerate(layout.groups)
            }
            results.append(FlatParams(buffers, layout))
        else:
            results.append(RunStacks(tuple(tuple(pieces) for pieces in column), layout))
    return tuple(results)


def _run_stacks_unflatten(x: RunStacks) -> Any:
    leaves: list[Any] = [None] * x.layout.num_leaves
    for g, stacks in enumerate(x.stacks):
        for run, stack in zip(x.layout.runs(g), stacks, strict=True):
            if stack is None:
                continue
            for j, i in enumerate(run):
                if isinstance(stack, jax.ShapeDtypeStruct):
                    leaves[i] = jax.ShapeDtypeStruct(
                        stack.shape[1:], stack.dtype, sharding=_unstacked(stack.sharding)
                    )
                else:
                    leaves[i] = stack[j]
    return x.layout.treedef.unflatten(leaves)


def _unstacked(sharding: Any) -> NamedSharding | None:
    """The sharding of one leaf of a stack sharded as ``sharding`` (the stacking axis is
    never sharded: :meth:`FlatLayout.stacked` puts it before the leaf's own axes)."""
    if not isinstance(sharding, NamedSharding):
        return None
    return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))


def _run_stacks_like(template: RunStacks, tree: Any) -> RunStacks:
    leaves = template.layout.treedef.flatten_up_to(tree)
    stacks = tuple(
        tuple(
            None if stack is None else jnp.stack([jnp.asarray(leaves[i]) for i in run])
            for run, stack in zip(template.layout.runs(g), group_stacks, strict=True)
        )
        for g, group_stacks in enumerate(template.stacks)
    )
    return RunStacks(stacks, template.layout)


def _chunk_sums_of_squares(x: Array) -> Array:
    """The sum of squares along the last axis of ``x`` (one :data:`CHUNK`).

    On CPU as pairwise sums of interleaved halves, which XLA fuses into one elementwise
    kernel: XLA:CPU hands a reduction over a short last axis to a library kernel about 5x
    slower than one pass over the data (16M values to 128-value chunk sums: 21 ms against
    3.8 ms on a 2-core VM, 2026-12-07). Elsewhere a plain sum, which GPU and TPU reduce well.
    """

    def pairwise(x: Array) -> Array:
        y = jnp.square(x)
        while y.shape[-1] > 1:
            y = y[..., 0::2] + y[..., 1::2]
        return y[..., 0]

    def summed(x: Array) -> Array:
        return jnp.sum(jnp.square(x), axis=-1)

    return jax.lax.platform_dependent(x, cpu=pairwise, default=summed)


def _sqrt_off_zero(squares: Array) -> Array:
    """``sqrt(squares)`` whose gradient at 0 is 0 rather than NaN (for meta-gradients)."""
    positive = squares > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)


def leaf_norm(x: Array) -> Array:
    """The L2 norm of a whole array (Frobenius for matrices, ``|x|`` for a scalar)."""
    return _sqrt_off_zero(jnp.sum(x * x))


def map_per_tensor(fn: Callable[..., Array], tree: Any, *rest: Any) -> Any:
    """``jax.tree.map`` for rules that scale each parameter tensor by a ratio of its norms.

    ``fn(norm, x, *ys)`` is elementwise in ``x, *ys`` except through ``norm(z)``, the
    L2 norm of the tensor each element of ``z`` belongs to, broadcastable against
    ``z``. On an ordinary leaf ``fn`` gets the leaf and ``norm`` = :func:`leaf_norm`;
    inside :class:`FlatParams` it gets each group buffer whole and ``norm`` =
    :meth:`FlatLayout.tensor_norms`, so a rule written once runs on both layouts.
    The norms' sums add the same squares in another order on the two layouts.
    """

    def on_flat(x: FlatParams, *ys: FlatParams) -> FlatParams:
        layout, buffers = x.layout, {}
        for group in layout.groups:
            name = group.name

            def norm(z: Array, name: str = name) -> Array:
                return layout.tensor_norms(name, z)

            buffers[name] = fn(norm, *(y.buffers[name] for y in (x, *ys)))
        return FlatParams(buffers, layout)

    def one(x: Any, *ys: Any) -> Any:
        return on_flat(x, *ys) if is_flat(x) else fn(leaf_norm, x, *ys)

    return jax.tree.map(one, tree, *rest, is_leaf=is_flat)


def refuse_flat(tree: Any, transformation: str, why: str) -> None:
    """Raises if ``tree`` holds :class:`FlatParams`: for rules per tensor, which it merges."""
    if any(is_flat(x) for x in jax.tree.leaves(tree, is_leaf=is_flat)):
        raise FlatLayoutError(
            f"{transformation} cannot run on the flat multi-tensor layout (FlatParams): {why}. "
            "Give it the per-leaf parameters."
        )


def unflatten(tree: Any) -> Any:
    """``tree`` with every :class:`FlatParams` (and :class:`RunStacks`) in it replaced by
    the per-leaf pytree it packs.

    Works inside and outside ``jax.jit``; an abstract :class:`FlatParams` (of
    ``jax.ShapeDtypeStruct`` s) becomes :meth:`FlatLayout.abstract_leaves`. A tree
    without either comes back unchanged, so code that reads parameters by name (a
    model, a checkpoint, a report) can call it whatever layout a program keeps.
    """

    def one(x: Any) -> Any:
        if isinstance(x, RunStacks):
            return _run_stacks_unflatten(x)
        if not is_flat(x):
            return x
        if all(isinstance(b, jax.ShapeDtypeStruct) for b in x.buffers.values()):
            return x.layout.abstract_leaves()
        return x.layout.unpack(x)

    return jax.tree.map(one, tree, is_leaf=_is_packed)


def flatten_like(template: Any, tree: Any) -> Any:
    """The inverse of :func:`unflatten`: ``tree`` (per-leaf) packed wherever ``template``
    holds :class:`FlatParams` or :class:`RunStacks`, with their layout."""

    def one(t: Any, x: Any) -> Any:
        if isinstance(t, RunStacks):
            return _run_stacks_like(t, x)
        return t.layout.pack(x) if is_flat(t) else x

    return jax.tree.map(one, template, tree, is_leaf=_is_packed)


def masked(
    inner: optax.GradientTransformation, mask: Any | Callable[[Params], Any]
) -> optax.GradientTransformation:
    """``optax.masked(inner, mask)`` that also runs on :class:`FlatParams`.

    On a per-leaf pytree it *is* ``optax.masked``. On :class:`FlatParams`, ``mask`` (a
    pytree of booleans like the per-leaf parameters, or a function of them) is given
    :meth:`FlatLayout.abstract_leaves`, so rules that choose tensors by name or shape
    (:func:`optim_jax.decay_mask`) work unchanged; ``inner`` then updates every buffer
    whole and each tensor keeps ``inner``'s update where its mask is True and the
    incoming one where it is False: the same numbers as the per-leaf path. That needs
    ``inner`` to treat each tensor on its own (elementwise or per-tensor rules) and to
    keep no parameter-shaped state, which would hold the masked-out tensors too: such
    an ``inner`` is refused. The state is ``optax.MaskedState`` on both layouts.
    """
    per_leaf = optax.masked(inner, mask)
    inner = optax.with_extra_args_support(inner)  # a chain's other members' keyword arguments

    def init_fn(params: Params) -> Any:
        if not is_flat(params):
            return per_leaf.init(params)
        state = inner.init(params)
        if any(is_flat(x) for x in jax.tree.leaves(state, is_leaf=is_flat)):
            raise FlatLayoutError(
                "masked: on the flat layout the masked transformation must keep no "
                "parameter-shaped state (it would hold the masked-out tensors too)"
            )
        return optax.MaskedState(inner_state=state)

    def update_fn(updates: Any, state: Any, params: Params | None = None, **extra: Any) -> Any:
        if not is_flat(updates):
            return per_leaf.update(updates, state, params, **extra)
        new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra)
        chosen = _select_per_tensor(mask, new_updates, updates)
        return chosen, optax.MaskedState(inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def tensor_mask(mask: Any | Callable[[Params], Any], layout: FlatLayout) -> dict[str, Any]:
    """A per-leaf ``mask`` (as :func:`masked` takes it) on the flat layout: for each group,
    True or False where all its tensors agree (decided when tracing), else a boolean
    ``(1, columns)`` array, True over the columns of the tensors the mask chose."""
    view = layout.abstract_leaves()
    mask_tree = mask(view) if callable(mask) else mask
    # A mask may be a prefix of the parameters' tree: each of its leaves covers a subtree.
    spread = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), mask_tree, view)
    leaf_masks = layout.treedef.flatten_up_to(spread)
    chosen = {}
    for g, group in enumerate(layout.groups):
        values = [leaf_masks[i] for i in layout.members(g)]
        if all(isinstance(v, bool) for v in values) and len(set(values)) == 1:
            chosen[group.name] = values[0]
        else:
            chosen[group.name] = layout.per_tensor(
                group.name, [jnp.asarray(v, bool) for v in values]
            )
    return chosen


def _select_per_tensor(mask: Any, on_true: FlatParams, on_false: FlatParams) -> FlatParams:
    """``on_true`` in the tensors where the per-leaf ``mask`` is True, else ``on_false``."""
    buffers = {}
    for name, chosen in tensor_mask(mask, on_true.layout).items():
        t, f = on_true.buffers[name], on_false.buffers[name]
        buffers[name] = (
            (t if chosen else f) if isinstance(chosen, bool) else jnp.where(chosen, t, f)
        )
    return FlatParams(buffers, on_true.layout)


# Jitted (with the layout static) so that packing outside a step is one compiled program
# rather than three dispatches per leaf; inside a step they inline.
_pack = jax.jit(FlatLayout._pack, static_argnums=0)
_unpack = jax.jit(FlatLayout._unpack, static_argnums=0)


def _constrain(x: Array, sharding: NamedSharding | None) -> Array:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def _path_name(path: Sequence[Any]) -> str:
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/") or "<root>"


def _leaf_grid(path: str, shape: tuple[int, ...], sharding: Any) -> tuple[Any, tuple, tuple]:
    """``(mesh, mesh axes in order, shards per dimension)`` of one leaf."""
    if not isinstance(sharding, NamedSharding) or sharding.is_fully_replicated:
        if sharding is not None and not sharding.is_fully_replicated:
            raise FlatLayoutError(
                f"flat_layout: parameter {path!r} has a {type(sharding).__name__}; "
                "only NamedSharding is supported"
            )
        mesh = sharding.mesh if isinstance(sharding, NamedSharding) else None
        return mesh, (), (1,) * len(shape)
    mesh = sharding.mesh
    if any(t != AxisType.Auto for t in getattr(mesh, "axis_types", ())):
        raise FlatLayoutError(
            f"flat_layout: parameter {path!r} lives on a mesh with non-Auto axis types "
            f"{mesh.axis_types}; the flat layout supports Auto axes only"
        )
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    axes, grid = [], []
    for dim, (size, entry) in enumerate(zip(shape, spec, strict=True)):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        n = math.prod(mesh.shape[a] for a in names)
        if size % n:
            raise FlatLayoutError(
                f"flat_layout: dimension {dim} of parameter {path!r} (size {size}) is sharded "
                f"over {names} ({n} shards), which does not divide it"
            )
        axes.extend(names)
        grid.append(n)
    return mesh, tuple(axes), tuple(grid)


def flat_layout(params: Params, *, by_shape: bool = False) -> FlatLayout:
    """The layout that groups ``params``' leaves by dtype and sharding (and shape).

    ``params`` may hold arrays or ``jax.ShapeDtypeStruct`` s (with or without a
    ``sharding``); leaves without a ``NamedSharding`` count as unsharded.
    Groups are ordered by first appearance. Within a group, leaves of one shape and
    one sharding grid sit side by side (kinds of leaf in order of first appearance,
    tree order within a kind), so that a rule that needs each tensor's shape
    (Adafactor's factored moments) can see the ``k`` layers' matrices of a transformer
    as one ``(k, rows, columns)`` stack: :meth:`FlatLayout.runs`.

    ``by_shape=True`` gives each kind (dtype, sharding, shape) a buffer of its own:
    more buffers (one per distinct shape, still not one per leaf), each a whole
    stack. That is the layout for Adafactor: its row, column and RMS reductions then
    read the buffers in place, where on a shared buffer XLA:CPU first copies each
    stack's slice out for its reduction kernel (60 against 28 bytes per parameter
    for a step on a transformer-like tree). Elementwise rules gain nothing from it.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not flat:
        raise FlatLayoutError("flat_layout: params has no leaves")
    keys: dict[tuple, int] = {}
    group_specs: list[dict[str, Any]] = []
    leaves = []  # (name, shape, grid, sharding, group) in tree order
    for path, leaf in flat:
        name = _path_name(path)
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise FlatLayoutError(f"flat_layout: parameter {name!r} has dtype {dtype}, not a float")
        sharding = getattr(leaf, "sharding", None)
        mesh, axes, grid = _leaf_grid(name, shape, sharding)
        key = (dtype, mesh, axes, *((shape, grid) if by_shape else ()))
        if key not in keys:
            keys[key] = len(group_specs)
            kind = ("x".join(map(str, shape)) or "scalar",) if by_shape else ()
            label = "_".join((str(dtype), *axes, *kind))
            if any(spec["name"] == label for spec in group_specs):
                label = f"{label}#{len(group_specs)}"
            group_specs.append({"name": label, "columns": 0, "shards": math.prod(grid)})
        leaf_sharding = sharding if isinstance(sharding, NamedSharding) else None
        leaves.append((name, shape, grid, leaf_sharding, keys[key]))
    kinds: dict[tuple, int] = {}
    for _, shape, grid, _, g in leaves:
        kinds.setdefault((g, shape, grid), len(kinds))
    order = sorted(range(len(leaves)), key=lambda i: kinds[leaves[i][4], *leaves[i][1:3]])
    sizes = collections.Counter(leaf[4] for leaf in leaves)
    slots: list[LeafSlot | None] = [None] * len(leaves)
    for i in order:
        name, shape, grid, leaf_sharding, g = leaves[i]
        columns = math.prod(shape) // math.prod(grid)
        width = columns if sizes[g] == 1 else -(-columns // CHUNK) * CHUNK
        offset = group_specs[g]["columns"]
        slots[i] = LeafSlot(name, shape, grid, offset, columns, width, leaf_sharding)
        group_specs[g]["columns"] += width
    groups = tuple(
        Group(spec["name"], dtype, mesh, axes, spec["shards"], spec["columns"])
        for (dtype, mesh, axes, *_), spec in zip(keys, group_specs, strict=True)
    )
    return FlatLayout(treedef, groups, tuple(slots), tuple(leaf[4] for leaf in leaves))
