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
Lion, RMSprop, Adagrad, value clipping, schedules) or reduces over all leaves
together (global-norm clipping) gives the per-leaf path's results: bitwise for
elementwise ones, to float32 rounding of the sum for global norms, whose terms
are added in another order. Transformations whose rule needs each parameter
tensor on its own (LAMB's and LARS's trust ratios, Adafactor's factored
moments, adaptive gradient clipping, masks by parameter name) would see one
tensor per group; this library's refuse :class:`FlatParams` with an error
(:func:`refuse_flat`) rather than compute something else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from optim_jax.base import Array, Params


@dataclasses.dataclass(frozen=True)
class LeafSlot:
    """Where one leaf lives in its group buffer.

    ``grid[i]`` is the number of shards of dimension ``i``; the leaf occupies
    columns ``[offset, offset + columns)`` of every row of the group buffer.
    """

    path: str
    shape: tuple[int, ...]
    grid: tuple[int, ...]
    offset: int
    columns: int
    sharding: NamedSharding | None

    @property
    def shard_shape(self) -> tuple[int, ...]:
        return tuple(d // n for d, n in zip(self.shape, self.grid, strict=True))

    def to_rows(self, x: Array) -> Array:
        """``x`` as ``(shards, columns)``: shard-major, each shard's values in row-major order."""
        rank = len(self.shape)
        interleaved = [s for n, d in zip(self.grid, self.shard_shape, strict=True) for s in (n, d)]
        shard_first = [2 * i for i in range(rank)] + [2 * i + 1 for i in range(rank)]
        rows = x.reshape(interleaved).transpose(shard_first)
        return rows.reshape(math.prod(self.grid), self.columns)

    def from_rows(self, rows: Array) -> Array:
        """The inverse of :meth:`to_rows`."""
        rank = len(self.shape)
        x = rows.reshape(*self.grid, *self.shard_shape)
        interleaved = [j for i in range(rank) for j in (i, rank + i)]
        return x.transpose(interleaved).reshape(self.shape)


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
            raise ValueError("unpack: expected FlatParams packed with this layout")
        return _unpack(self, flat)

    def members(self, g: int) -> list[int]:
        """Indices of the leaves in group ``g``, in tree order (= column order)."""
        return [i for i, lg in enumerate(self.leaf_groups) if lg == g]

    def _pack(self, tree: Params) -> FlatParams:
        leaves = self.treedef.flatten_up_to(tree)
        buffers = {}
        for g, group in enumerate(self.groups):
            rows = [
                self.slots[i].to_rows(jnp.asarray(leaves[i], group.dtype)) for i in self.members(g)
            ]
            buffer = rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=1)
            buffers[group.name] = _constrain(buffer, group.sharding)
        return FlatParams(buffers, self)

    def _unpack(self, flat: FlatParams) -> Params:
        leaves: list[Array | None] = [None] * self.num_leaves
        for g, group in enumerate(self.groups):
            members = self.members(g)
            cuts = [self.slots[i].offset for i in members[1:]]
            pieces = jnp.split(flat.buffers[group.name], cuts, axis=1)
            for i, rows in zip(members, pieces, strict=True):
                leaves[i] = _constrain(self.slots[i].from_rows(rows), self.slots[i].sharding)
        return self.treedef.unflatten(leaves)

    def shardings(self) -> FlatParams:
        """The buffers' shardings (None where unsharded), e.g. for ``out_shardings``."""
        return FlatParams({group.name: group.sharding for group in self.groups}, self)

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


def refuse_flat(tree: Any, transformation: str, why: str) -> None:
    """Raises if ``tree`` holds :class:`FlatParams`: for rules per tensor, which it merges."""
    if any(is_flat(x) for x in jax.tree.leaves(tree, is_leaf=is_flat)):
        raise ValueError(
            f"{transformation} cannot run on the flat multi-tensor layout (FlatParams): {why}. "
            "Give it the per-leaf parameters."
        )


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
            raise ValueError(
                f"flat_layout: parameter {path!r} has a {type(sharding).__name__}; "
                "only NamedSharding is supported"
            )
        mesh = sharding.mesh if isinstance(sharding, NamedSharding) else None
        return mesh, (), (1,) * len(shape)
    mesh = sharding.mesh
    if any(t != AxisType.Auto for t in getattr(mesh, "axis_types", ())):
        raise ValueError(
            f"flat_layout: parameter {path!r} lives on a mesh with non-Auto axis types "
            f"{mesh.axis_types}; the flat layout supports Auto axes only"
        )
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    axes, grid = [], []
    for dim, (size, entry) in enumerate(zip(shape, spec, strict=True)):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        n = math.prod(mesh.shape[a] for a in names)
        if size % n:
            raise ValueError(
                f"flat_layout: dimension {dim} of parameter {path!r} (size {size}) is sharded "
                f"over {names} ({n} shards), which does not divide it"
            )
        axes.extend(names)
        grid.append(n)
    return mesh, tuple(axes), tuple(grid)


def flat_layout(params: Params) -> FlatLayout:
    """The layout that groups ``params``' leaves by dtype and sharding.

    ``params`` may hold arrays or ``jax.ShapeDtypeStruct`` s (with or without a
    ``sharding``); leaves without a ``NamedSharding`` count as unsharded.
    Groups are ordered by first appearance, leaves within a group by tree order.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not flat:
        raise ValueError("flat_layout: params has no leaves")
    keys: dict[tuple, int] = {}
    group_specs: list[dict[str, Any]] = []
    slots, leaf_groups = [], []
    for path, leaf in flat:
        name = _path_name(path)
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise ValueError(f"flat_layout: parameter {name!r} has dtype {dtype}, not a float")
        sharding = getattr(leaf, "sharding", None)
        mesh, axes, grid = _leaf_grid(name, shape, sharding)
        key = (dtype, mesh, axes)
        if key not in keys:
            keys[key] = len(group_specs)
            label = "_".join((str(dtype), *axes))
            if any(spec["name"] == label for spec in group_specs):
                label = f"{label}#{len(group_specs)}"
            group_specs.append({"name": label, "columns": 0, "shards": math.prod(grid)})
        g = keys[key]
        columns = math.prod(shape) // math.prod(grid)
        leaf_sharding = sharding if isinstance(sharding, NamedSharding) else None
        slots.append(LeafSlot(name, shape, grid, group_specs[g]["columns"], columns, leaf_sharding))
        group_specs[g]["columns"] += columns
        leaf_groups.append(g)
    groups = tuple(
        Group(spec["name"], dtype, mesh, axes, spec["shards"], spec["columns"])
        for (dtype, mesh, axes), spec in zip(keys, group_specs, strict=True)
    )
    return FlatLayout(treedef, groups, tuple(slots), tuple(leaf_groups))
