"""The device mesh (axes ``data``, ``fsdp``, ``tensor``) and logical-axis sharding rules.

Model parameters are annotated with logical names (``embed``, ``mlp``, ...);
the rules map each name to a mesh axis (or none), so one model definition
serves data-parallel, fully-sharded and tensor-parallel layouts. Axes are of
JAX's Auto type: XLA inserts the collectives.
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from flax.core import spmd
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from train.config import DEFAULT_RULES, ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both: FSDP is data parallel too


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """The sizes of (data, fsdp, tensor), with at most one -1 resolved to the rest."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    for name, size in zip(AXES, sizes, strict=True):
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name} must be a positive integer or -1, got {size}")
    if sizes.count(-1) > 1:
        raise ConfigError("at most one mesh axis may be -1 (meaning 'the remaining devices')")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"mesh {dict(zip(AXES, sizes, strict=True))}: the fixed axes' product {known} "
                f"does not divide the {num_devices} devices"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh {dict(zip(AXES, sizes, strict=True))} has {math.prod(sizes)} devices "
            f"but JAX sees {num_devices}"
        )
    return tuple(sizes)


def build_mesh(cfg: MeshConfig) -> Mesh:
    devices = jax.devices()
    if cfg.num_devices != -1:
        if not 1 <= cfg.num_devices <= len(devices):
            raise ConfigError(
                f"mesh.num_devices={cfg.num_devices}: JAX sees {len(devices)} devices "
                "(use -1 for all of them)"
            )
        devices = devices[: cfg.num_devices]
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def rules_tuple(rules: dict[str, str | None]) -> tuple[tuple[str, str | None], ...]:
    """``mesh.rules`` as flax's rules: the given ones over the defaults.

    A partial mapping (say from the override ``mesh.rules.embed=null``) changes only the
    axes it names; a logical axis the models do not have is refused.
    """
    logical = tuple(DEFAULT_RULES)
    for name, axis in rules.items():
        if name not in logical:
            raise ConfigError(
                f"mesh.rules.{name}: unknown logical axis {name!r} (logical axes: "
                f"{', '.join(logical)})"
            )
        if axis is not None and axis not in AXES:
            raise ConfigError(f"mesh.rules.{name}: unknown mesh axis {axis!r} (axes: {AXES})")
    return tuple({**DEFAULT_RULES, **rules}.items())


def check_model_fits(dims: list[tuple[str, int, str]], together: list[tuple[str, ...]]) -> None:
    """Refuses a model whose parameters the current mesh and rules cannot shard.

    Call it in a model's constructor, where ``jax.set_mesh`` and
    ``nnx.logical_axis_rules`` are in effect (outside them it checks nothing):
    ``dims`` lists ``(logical axis, size, what sets the size)`` for the parameter
    dimensions, ``together`` the logical axes that share one parameter. Without this
    check JAX fails inside parameter creation with an IndivisibleError or a
    DuplicateSpecError that names neither the config key nor the value at fault.
    """
    mesh = jax.sharding.get_abstract_mesh()
    rules = spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return
    rules = dict(rules)
    for axes in together:
        mapped = [(name, rules[name]) for name in axes if rules.get(name) is not None]
        for i, (name, axis) in enumerate(mapped):
            for other, other_axis in mapped[i + 1 :]:
                if axis == other_axis:
                    raise ConfigError(
                        f"mesh.rules.{name} and mesh.rules.{other} are both {axis!r}, but one "
                        f"parameter has both axes and can be split only once over a mesh axis"
                    )
    for name, size, source in dims:
        axis = rules.get(name)
        if axis is not None and size % mesh.shape[axis]:
            raise ConfigError(
                f"mesh.{axis}={mesh.shape[axis]} does not divide {source}={size}, which "
                f"mesh.rules.{name}={axis!r} splits over it; pick sizes that divide, or "
                f"mesh.rules.{name}=null"
            )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data`` x ``fsdp``; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def param_shardings(params: nnx.State, mesh: Mesh, rules: dict[str, str | None]):
    """``NamedSharding`` for every parameter, from its logical annotation and ``rules``."""
    with nnx.logical_axis_rules(rules_tuple(rules)):
        specs = nnx.get_partition_spec(params)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
