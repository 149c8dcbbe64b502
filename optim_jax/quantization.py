"""Optimizer state in fewer bytes: bfloat16 moments and 8-bit block-wise quantised moments.

Every transformation that keeps a per-parameter moment takes ``moment_dtype``:

``None``
    the parameter's dtype (float32 for float32 parameters): the default.
``"float32"``, ``"bfloat16"``
    a plain array of that dtype. bfloat16 halves the bytes and keeps 8
    significant bits, so a moment's change of less than half a unit in its last
    place (2^-9 to 2^-8 of its value) is lost when rounded to nearest: a second
    moment with ``b2 = 0.999`` (a change of 0.1% a step) then never decays, and
    grows only on gradients several times its size. bfloat16 moments are
    therefore rounded stochastically: up or down, with the probability that
    makes the stored value right on average (:func:`round_stochastically`),
    so the running averages follow their float32 counterparts in expectation.
    ``MomentFormat("bfloat16", rounding="nearest")`` rounds to nearest instead
    (what Optax's ``mu_dtype`` does). int8 moments are rounded to nearest code: a
    block's values are stored relative to its float32 maximum, which decays with them.
``"int8"`` (or :class:`MomentFormat` for other block sizes)
    8-bit block-wise dynamic quantisation after Dettmers et al. 2022, "8-bit
    Optimizers via Block-wise Quantization" (ICLR): each block of ``block``
    consecutive values keeps its absolute maximum in float32 and every value
    as one byte, the index of the nearest entry of a 256-entry *dynamic* code
    book (Dettmers 2016) scaled by that maximum. Tensors with fewer than
    ``min_size`` elements stay float32 (the paper's rule, 4096 by default).

The dynamic code book spends its codes on orders of magnitude: after an
optional sign bit, ``k`` leading zero bits give the scale ``10^-k``, the next
(indicator) bit is 1, and the remaining bits pick one of equal bins of
``[0.1, 1]``, stored as the bin's centre. With ``k`` from 0 to 6 this gives
127 magnitudes for the signed book (first moments) and 254 for the unsigned
one (second moments, which are never negative). Zero and exactly 1 complete
the unsigned book to 256 codes; the signed one has zero, exactly +1 and -1 (so
a block's largest value is stored exactly whatever its sign: otherwise every
write would shrink a block led by a negative value) and gives up its smallest
negative magnitude, ``-5.5e-7``, to fit.

Blocks run along the last axis of each tensor, or along the last few axes
taken together when the last is shorter than a block (the attention kernels'
``[embed, heads, head_dim]`` blocks span heads x head_dim), so a block maximum
is not paid for every short row; the last block of a row is shorter when the
row length is not a multiple of ``block``. The codes keep the parameter's
shape, and under ``jax.jit`` its sharding (on meshes with Auto or Explicit axes;
the block maxima are sharded alike from ``init`` on); the block maxima have the shape
``shape[:-t] + (ceil(prod(shape[-t:]) / block),)`` for the ``t`` merged axes.
Bytes per value: ``1 + 4 / block`` (1.016 for blocks of 256), so AdamW's two
moments take 2.03 bytes per parameter instead of 8.

Arithmetic always happens in float32: a transformation reads a moment with
:func:`read`, updates it in float32 and writes it back with :func:`write`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec

from optim_jax import base, flat

DTYPES = ("float32", "bfloat16", "int8")
ROUNDINGS = ("stochastic", "nearest")


@dataclasses.dataclass(frozen=True)
class MomentFormat:
    """How a moment is stored: ``dtype`` one of :data:`DTYPES`; for ``int8`` the block
    length and the smallest tensor that is quantised (smaller ones stay float32); for
    ``bfloat16`` the rounding, one of :data:`ROUNDINGS`."""

    dtype: str = "int8"
    block: int = 256
    min_size: int = 4096
    rounding: str = "stochastic"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"moment_dtype must be one of {DTYPES} or None, got {self.dtype!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"moment rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if not (isinstance(self.block, int) and self.block >= 2):
            raise ValueError(f"moment block must be an int >= 2, got {self.block!r}")
        if not (isinstance(self.min_size, int) and self.min_size >= 0):
            raise ValueError(f"moment min_size must be an int >= 0, got {self.min_size!r}")


MomentDtype = str | MomentFormat | None


def moment_format(moment_dtype: MomentDtype) -> MomentFormat | None:
    """``moment_dtype`` as a :class:`MomentFormat` (None stays None); a ValueError naming
    the argument for anything else."""
    if moment_dtype is None or isinstance(moment_dtype, MomentFormat):
        return moment_dtype
    if isinstance(moment_dtype, str):
        return MomentFormat(moment_dtype)
    raise ValueError(
        f"moment_dtype must be one of {DTYPES}, a MomentFormat or None, got {moment_dtype!r}"
    )


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "absmax"],
    meta_fields=["block", "signed"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A float tensor stored as one byte per value plus a float32 maximum per block."""

    codes: jax.Array  # uint8, the tensor's shape: indices into the code book
    absmax: jax.Array  # float32, the unblocked axes + (number of blocks,)
    block: int
    signed: bool

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(jnp.float32)  # what it decodes to


@functools.cache
def dynamic_code_book(signed: bool) -> np.ndarray:
    """The 256 sorted code values in [-1, 1] (signed) or [0, 1] (unsigned), float32."""
    magnitude_bits = 7 if signed else 8
    magnitudes = []
    for zeros in range(7):  # scales 10^0 .. 10^-6
        fraction_bits = magnitude_bits - zeros - 1  # after the zeros and the indicator bit
        bins = 2**fraction_bits
        edges = np.linspace(0.1, 1.0, bins + 1)
        magnitudes.append(10.0**-zeros * (edges[:-1] + edges[1:]) / 2)
    magnitudes = np.concatenate(magnitudes)
    if signed:
        negatives = -np.sort(magnitudes)[1:]  # the smallest makes room for -1
        values = [magnitudes, negatives, [0.0, 1.0, -1.0]]
    else:
        values = [magnitudes, [0.0, 1.0]]
    book = np.sort(np.concatenate(values))
    assert book.size == 256 and np.unique(book).size == 256, book.size
    return book.astype(np.float32)


def _row_shape(shape: tuple[int, ...], block: int) -> tuple[int, ...]:
    """``shape`` with its last axes merged into one row of at least ``block`` values (or all
    of them): the axes that blocks run along."""
    merged = 1
    for axis in range(len(shape) - 1, -1, -1):
        merged *= shape[axis]
        if merged >= block:
            return (*shape[:axis], merged)
    return (merged,)


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """``x`` as ``[..., blocks, block]`` along its rows (the last block zero-padded)."""
    x = x.reshape(_row_shape(x.shape, block))
    pad = -x.shape[-1] % block
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], -1, block)


def _per_value(absmax: jax.Array, shape: tuple[int, ...], block: int) -> jax.Array:
    """Each value's block maximum, in the tensor's own ``shape``.

    Quantising and dequantising are then elementwise in the tensor's layout, so XLA gives
    the codes the tensor's sharding even when blocks span several (sharded) axes; only the
    small block maxima go through the blocked layout.
    """
    *rows, row = _row_shape(shape, block)
    spread = jnp.broadcast_to(absmax[..., None], (*absmax.shape, block))
    return spread.reshape(*rows, -1)[..., :row].reshape(shape)


def _explicit_spec(x: jax.Array) -> PartitionSpec | None:
    """``x``'s partition spec (one entry per dimension) when it lives on a mesh with
    Explicit axes, where shardings are part of the types; None otherwise."""
    sharding = jax.typeof(x).sharding
    if AxisType.Explicit not in getattr(sharding.mesh, "axis_types", ()):
        return None
    spec = tuple(sharding.spec)
    return PartitionSpec(*spec, *(None,) * (x.ndim - len(spec)))


def _auto_inside(
    fn: Callable, out_specs: Callable[[PartitionSpec], Any], x: jax.Array, *rest: jax.Array
) -> Any:
    """``fn(x, *rest)``, with the mesh's Explicit axes made Auto inside when ``x`` has them.

    Blocks may run over several sharded axes; on an Explicit mesh every reshape between the
    tensor's and the blocks' layout would have to be given a sharding, and a gather from the
    code book its output's. With Auto axes inside, XLA lays the blocks out as it does on an
    Auto mesh (the block maxima gathered, each value's scale computed where the value lives),
    and ``out_specs(spec of x)`` gives the results' types.
    """
    spec = _explicit_spec(x)
    if spec is None:
        return fn(x, *rest)
    return jax.sharding.auto_axes(fn, out_sharding=out_specs(spec))(x, *rest)


def quantize(x: jax.Array, block: int = 256, signed: bool = True) -> QuantizedArray:
    """``x`` (any float dtype, at least 1-D) block-wise quantised to the dynamic code book.

    The codes are sharded like ``x``; on a mesh with Explicit axes the block maxima are
    sharded like the axes of ``x`` that no block spans, and whole along the blocks.
    """
    if x.ndim == 0:
        raise ValueError("quantize needs an array with at least one dimension")

    def codes_and_absmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = x.astype(jnp.float32)
        absmax = jnp.max(jnp.abs(_blocks(x, block)), axis=-1)
        scale = _per_value(jnp.where(absmax > 0, absmax, 1.0), x.shape, block)
        return nearest_code(x / scale, signed).astype(jnp.uint8), absmax

    rows = len(_row_shape(x.shape, block)) - 1
    codes, absmax = _auto_inside(
        codes_and_absmax, lambda spec: (spec, PartitionSpec(*spec[:rows], None)), x
    )
    return QuantizedArray(codes=codes, absmax=absmax, block=block, signed=signed)


def nearest_code(y: jax.Array, signed: bool) -> jax.Array:
    """The index (int32) of the code nearest ``y`` (float32, in [-1, 1]) in the sorted book:
    the number of midpoints between neighbouring codes below ``y``, as
    ``jnp.searchsorted(midpoints, y)`` gives it.

    A binary search over the 255 midpoints is a loop of eight gathers, each a pass over
    the tensor (XLA:CPU writes every step out: 255 bytes per AdamW parameter, 41x the
    float32 step at 64M parameters). The book's structure gives the index instead, up to
    one either way: the decade ``k`` of ``|y|`` by comparisons, then the equal bin of
    ``[0.1, 1] x 10^-k`` it falls in, which holds the nearest code or borders it. Two steps
    each way against the midpoints make it exact (on the values of
    ``tests/optim_jax/test_quantization.py``, which checks the result against the search,
    the guess is off by at most one: the second step is a margin).
    """
    book = dynamic_code_book(signed)
    midpoints = jnp.asarray((book[1:] + book[:-1]) / 2)
    fraction_bits = 6 if signed else 7  # bits after the sign, zeros and indicator at k = 0
    magnitude = jnp.abs(y)
    decade = jnp.zeros(y.shape, jnp.int32)
    scale = jnp.ones(y.shape, jnp.float32)
    for k in range(1, 7):
        below = magnitude < np.float32(10.0**-k)
        decade = decade + below
        scale = jnp.where(below, np.float32(10.0**-k), scale)
    bins = jnp.left_shift(1, fraction_bits - decade)
    position = (magnitude / scale - np.float32(0.1)) * (bins.astype(jnp.float32) / np.float32(0.9))
    in_decade = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, bins - 1)
    # Magnitudes sorted ascending: the smaller decades' 2^(f-6) + ... + 2^(f-k-1) come first.
    rank = bins - (1 << (fraction_bits - 6)) + in_decade
    # Signed: -1, 126 negatives (the smallest magnitude left out), 0, 127 positives, 1.
    # Unsigned: 0, 254 magnitudes, 1.
    index = jnp.where(y >= 0, 128 + rank, 127 - rank) if signed else 1 + rank
    index = jnp.clip(index, 0, 255)
    for _ in range(2):
        index = index - ((index > 0) & (midpoints[jnp.maximum(index - 1, 0)] >= y))
    for _ in range(2):
        index = index + ((index < 255) & (midpoints[jnp.minimum(index, 254)] < y))
    return index


def dequantize(q: QuantizedArray) -> jax.Array:
    """The float32 tensor ``q`` stands for, sharded like its codes."""

    def values(codes: jax.Array, absmax: jax.Array) -> jax.Array:
        decoded = jnp.asarray(dynamic_code_book(q.signed))[codes]
        return decoded * _per_value(absmax, q.shape, q.block)

    return _auto_inside(values, lambda spec: spec, q.codes, q.absmax)


def _quantized(param: jax.Array, fmt: MomentFormat) -> bool:
    return fmt.dtype == "int8" and param.ndim >= 1 and param.size >= max(fmt.min_size, 1)


def init(
    param: jax.Array, moment_dtype: MomentDtype, *, signed: bool
) -> jax.Array | QuantizedArray:
    """A zero moment for ``param`` in ``moment_dtype`` (``signed=False`` for moments that
    are never negative, such as second moments: they get the finer unsigned code book)."""
    fmt = moment_format(moment_dtype)
    if fmt is None:
        return base.zeros_like_param(param)
    if not _quantized(param, fmt):
        dtype = jnp.float32 if fmt.dtype == "int8" else jnp.dtype(fmt.dtype)
        return base.zeros_like_param(param, dtype)
    # Quantised zeros: the codes and block maxima come out sharded as every write's will.
    return quantize(base.zeros_like_param(param, jnp.float32), fmt.block, signed)


def tree_init(params: base.Params, moment_dtype: MomentDtype, *, signed: bool) -> base.Params:
    """:func:`init` for every leaf of ``params``."""
    check_layout(params, moment_dtype)
    return jax.tree.map(lambda p: init(p, moment_dtype, signed=signed), params)


def check_layout(params: base.Params, moment_dtype: MomentDtype) -> None:
    """Raises for a bad ``moment_dtype`` (even with no parameters), and for int8 moments of
    parameters in the flat multi-tensor layout: there a block would mix tensors of different
    scales, and the small tensors that stay float32 per leaf would be quantised with them."""
    fmt = moment_format(moment_dtype)
    if fmt is not None and fmt.dtype == "int8":
        flat.refuse_flat(
            params,
            "int8 moments",
            "a block would mix tensors of different scales and quantise the small tensors "
            "that stay float32 per leaf; use moment_dtype float32 or bfloat16",
        )


def read(moment: jax.Array | QuantizedArray, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """A stored moment as an array of ``dtype`` for arithmetic."""
    if isinstance(moment, QuantizedArray):
        return dequantize(moment).astype(dtype)
    return moment.astype(dtype)


def write(value: jax.Array, like: jax.Array | QuantizedArray) -> jax.Array | QuantizedArray:
    """``value`` stored the way ``like`` is (its dtype, or its block-wise quantisation),
    rounded to nearest."""
    if isinstance(like, QuantizedArray):
        return quantize(value, like.block, like.signed)
    return value.astype(like.dtype)


Writer = Callable[[jax.Array, "jax.Array | QuantizedArray"], "jax.Array | QuantizedArray"]


def writer(moment_dtype: MomentDtype, step: jax.Array | None) -> Writer:
    """How a transformation stores its new moments at update ``step`` (its count): as
    :func:`write`, except that bfloat16 moments are rounded stochastically (unless the
    format says ``rounding="nearest"``), with ``step`` mixed into the random bits so that a
    moment that keeps its value from step to step is not rounded the same way each time.
    ``step`` None: the bits come from the values alone (for a sum that only grows)."""
    fmt = moment_format(moment_dtype)
    if fmt is None or fmt.dtype != "bfloat16" or fmt.rounding == "nearest":
        return write

    def store(value: jax.Array, like: jax.Array | QuantizedArray) -> jax.Array | QuantizedArray:
        if isinstance(like, QuantizedArray) or like.dtype != jnp.bfloat16:
            return write(value, like)
        return round_stochastically(value, step)

    return store


# The multipliers of a 32-bit integer hash found by search (Wellons, "hash-prospector",
# lowbias32: shifts 16, 15, 16): every output bit depends on every input bit. Cheaper hashes
# did worse (checked with the decaying second moment of tests/optim_jax/test_quantization.py):
# one multiply, whose draws at consecutive steps are correlated, ended 20% below float32, and
# hashing only the 16 kept bits (equal draws for every value in a bfloat16 interval) 2%.
_MIX = (np.uint32(0x7FEB352D), np.uint32(0x846CA68B))
_GOLDEN = np.uint32(0x9E3779B9)  # 2^32 / golden ratio: spreads consecutive steps apart


def round_stochastically(value: jax.Array, step: jax.Array | None = None) -> jax.Array:
    """``value`` as bfloat16, rounded up or down at random: to the upper neighbour with
    probability (distance to the lower) / (spacing), so ``E[result] = value`` (up to the
    float32 rounding of ``value`` first, and 2^-16 of a spacing).

    The 16 bits that bfloat16 drops are compared with 16 pseudo-random bits, a hash of the
    value's own bits and ``step``: no random key is carried, the result is the same on any
    layout or sharding of the array (a value and a step decide it), and the cost is a few
    integer operations in the kernel that computes ``value``. Equal values round alike at
    the same step. Zero, infinities, NaN and values that bfloat16 holds exactly are kept
    as they are.
    """
    x = value.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    h = bits if step is None else bits ^ (jnp.asarray(step).astype(jnp.uint32) * _GOLDEN)
    h = (h ^ (h >> 16)) * _MIX[0]
    h = (h ^ (h >> 15)) * _MIX[1]
    h = h ^ (h >> 16)
    # Adding the random bits below bfloat16's last place carries into it with exactly the
    # probability the dropped bits stand for; the sign bit is apart, so this rounds the
    # magnitude, up or down, symmetrically for negative values.
    rounded = (bits + (h & np.uint32(0xFFFF))) & np.uint32(0xFFFF0000)
    stochastic = jax.lax.bitcast_convert_type(rounded, jnp.float32)
    # NaN's bits could carry into the sign; infinities and NaN stay as they are.
    return jnp.where(jnp.isfinite(x), stochastic, x).astype(jnp.bfloat16)


def is_moment(x: object) -> bool:
    """``is_leaf`` for tree functions that should treat a quantised moment as one leaf."""
    return isinstance(x, QuantizedArray)
