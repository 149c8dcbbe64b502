"""Per-parameter treatment: parameter groups, the weight-decay mask, layer-wise LR decay, freezing.

Parameters are addressed by their *path* in the parameter pytree, written as a
``/``-joined string of its keys: ``{"layers": [{"kernel": w}]}`` gives
``"layers/0/kernel"``. Dict keys, attribute names (Equinox modules, dataclasses)
and sequence indices all become one component each. A Flax NNX ``Variable``
(``nnx.Param``) flattens to one child reached through its ``value`` attribute;
that trailing ``value`` is not part of the path, so ``nnx.state(model,
nnx.Param)`` gives paths such as ``"layers/0/kernel"``, as the equivalent
nested dict would. :func:`param_paths` shows the paths of a tree.

Groups are built on ``optax.partition`` and ``optax.masked``: a group's inner
transformation sees only its own leaves (the others are ``optax.MaskedNode``),
so its state holds buffers for those leaves only.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import jax
import numpy as np
import optax

from optim_jax import base, flat

LabelsOrFn: TypeAlias = Any | Callable[[base.Params], Any]
MaskOrFn: TypeAlias = Any | Callable[[base.Params], Any]
GroupSpec: TypeAlias = optax.GradientTransformation | Mapping[str, Any] | None

#: Path components that :func:`decay_mask` exempts from weight decay (compared
#: case-insensitively with each component of a parameter's path). ``bias`` and
#: ``scale`` catch the multi-dimensional biases of ``DenseGeneral`` attention
#: projections; the rest are the usual embedding names: Flax's ``nn.Embed`` /
#: ``nnx.Embed`` store their table as ``embedding``, GPT-2 uses ``wte``/``wpe``,
#: HF models ``word_embeddings``/``position_embeddings``/``embed_tokens``, ViTs
#: ``pos_embed``/``pos_embedding``/``cls_token``.
DEFAULT_NO_DECAY_NAMES: tuple[str, ...] = (
    "bias",
    "scale",
    "embed",
    "embedding",
    "embeddings",
    "embed_tokens",
    "wte",
    "wpe",
    "word_embeddings",
    "position_embeddings",
    "token_embedding",
    "pos_embed",
    "pos_embedding",
    "cls_token",
)

_VARIABLE_VALUE_ATTRS = ("value", "raw_value")  # how Flax NNX Variables expose their array


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_components(path: tuple) -> tuple[str, ...]:
    """The key path of a leaf (from ``jax.tree_util``) as a tuple of strings."""
    if (
        path
        and isinstance(path[-1], jax.tree_util.GetAttrKey)
        and path[-1].name in _VARIABLE_VALUE_ATTRS
    ):
        path = path[:-1]
    return tuple(_key_name(key) for key in path)


def param_paths(params: base.Params) -> Any:
    """A pytree shaped like ``params`` holding each leaf's ``/``-joined path string.

    Handy for label functions, e.g.
    ``lambda p: jax.tree.map(lambda s: "head" if s.startswith("head/") else "body",
    param_paths(p))``.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: "/".join(path_components(path)), params)


def _is_params_placeholder(params: Any) -> bool:
    # ``optax.tree_map_params`` calls ``init`` with a placeholder object instead
    # of parameters; there is nothing to validate then.
    return type(params).__name__ == "_ParamsPlaceholder"


def _ndim(leaf: Any) -> int:
    return len(getattr(leaf, "shape", ()))


BY_NAME = "it chooses parameters by their names, which the layout merges"

# --------------------------------------------------------------------------- decay mask


def decay_mask(
    params: base.Params,
    *,
    exclude: Iterable[str] = DEFAULT_NO_DECAY_NAMES,
    min_ndim: int = 2,
) -> Any:
    """True for the leaves that weight decay should apply to, False for the rest.

    A leaf is decayed iff it has at least ``min_ndim`` dimensions (nanoGPT's
    rule ``p.dim() >= 2``, which exempts biases and normalisation scales) and
    no component of its path (see the module docstring) equals one of
    ``exclude`` (case-insensitive), which exempts embedding tables and
    multi-dimensional biases. Practice on embeddings varies: minGPT exempts
    ``nn.Embedding`` and timm exempts ViT position embeddings and class tokens,
    as this helper does by default; nanoGPT and the HF ``Trainer`` decay them
    (``exclude=()`` gives nanoGPT's rule, ``exclude=("bias",)`` roughly the
    Trainer's). Components are compared whole, so ``embed_out`` (GPT-NeoX's
    untied output head) is still decayed while ``embed`` and ``embedding`` are
    not.

    Pass the function itself as a mask: ``optim_jax.adamw(1e-3, mask=decay_mask)``;
    change the rule with ``functools.partial(decay_mask, exclude=(...))``.
    Works on nested dicts (Linen), ``nnx.State`` (the result is an ``nnx.State``
    of ``Param(bool)``, which Optax's ``masked`` accepts) and any other pytree.

    Args:
      params: the parameters (or anything with their structure and shapes).
      exclude: path components whose leaves are never decayed.
      min_ndim: leaves with fewer dimensions are never decayed.
    """
    if isinstance(exclude, str):
        raise TypeError(f"exclude must be a collection of names, not the string {exclude!r}")
    names = {str(name).lower() for name in exclude}
    if isinstance(min_ndim, bool) or not isinstance(min_ndim, int) or min_ndim < 0:
        raise ValueError(f"min_ndim must be a non-negative integer, got {min_ndim!r}")

    flat.refuse_flat(
        params,
        "decay_mask",
        "it reads the per-leaf names; pass it as a mask (mask=optim_jax.decay_mask), which "
        "the flat layout gives the per-leaf view",
    )

    def one(path, leaf):
        if _ndim(leaf) < min_ndim:
            return False
        return not any(c.lower() in names for c in path_components(path))

    return jax.tree_util.tree_map_with_path(one, params)


# --------------------------------------------------------------------------- groups


def _zero_updates() -> optax.GradientTransformation:
    """Updates of zero and no state: the transformation of a frozen group."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(base.zeros_like_param, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def _resolve(tree_or_fn: Any, params: Any) -> Any:
    return tree_or_fn(params) if callable(tree_or_fn) else tree_or_fn


def _check_labels(labels: Any, params: Any, groups: Mapping[Hashable, Any]) -> None:
    try:
        jax.tree.map(lambda *_: None, labels, params)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"labels: the label tree must have the structure of the params (or a prefix of it): "
            f"{err}"
        ) from err
    missing: dict[Any, str] = {}
    for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]:
        try:
            known = label in groups
        except TypeError as err:  # unhashable
            raise TypeError(f"labels: label {label!r} is not hashable") from err
        if not known and label not in missing:
            missing[label] = "/".join(path_components(path))
    if missing:
        listed = ", ".join(f"{label!r} (e.g. at {where!r})" for label, where in missing.items())
        raise ValueError(
            f"labels: no optimizer for param-group label(s) {listed}; "
            f"the groups are {', '.join(sorted(map(repr, groups)))}"
        )


def param_groups(
    groups: Mapping[Hashable, GroupSpec],
    labels: LabelsOrFn,
    *,
    optimizer: Callable[..., optax.GradientTransformation] | None = None,
    **defaults: Any,
) -> optax.GradientTransformationExtraArgs:
    """A different optimizer, or different hyperparameters, per group of parameters.

    The torch ``param_groups`` idea on top of ``optax.partition``. ``labels``
    (a pytree of group names with the structure of the params, or a prefix of
    it, or a function ``params -> such a pytree``) assigns each leaf to a
    group; ``groups`` says what each group gets:

    * an ``optax.GradientTransformation``: that optimizer;
    * a dict of keyword arguments: ``optimizer(**{**defaults, **options})``,
      the torch form ``torch.optim.AdamW([{"params": ..., "weight_decay": 0.0},
      ...], lr=1e-3)``, written
      ``param_groups({"decay": {}, "no_decay": {"weight_decay": 0.0}}, labels,
      optimizer=optim_jax.adamw, learning_rate=1e-3)``;
    * ``None``: the group is frozen (zero updates, no state), see :func:`freeze`.

    Each group's optimizer keeps state only for its own leaves and counts its
    own steps (every group is updated on every step, so the counts agree).
    A group that no parameter is labelled with is allowed (torch allows empty
    groups too) and holds no buffers. The labels are checked against the
    groups when the state is initialised (when the parameters are known).

    Raises:
      ValueError: in ``init``, naming ``labels``, when a label has no group or
        the label tree does not fit the params; at construction when
        ``groups`` is empty or options are given without ``optimizer``.
    """
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError(f"groups must be a non-empty mapping from label to optimizer: {groups!r}")
    if defaults and optimizer is None:
        raise ValueError(
            f"optimizer: default options {sorted(defaults)} were given without an optimizer "
            f"factory to pass them to"
        )
    transforms: dict[Hashable, optax.GradientTransformation] = {}
    for label, spec in groups.items():
        if spec is None:
            transforms[label] = _zero_updates()
        elif isinstance(spec, optax.GradientTransformation):
            transforms[label] = spec
        elif isinstance(spec, Mapping):
            if optimizer is None:
                raise ValueError(
                    f"optimizer: group {label!r} gives options {dict(spec)!r}, which need an "
                    f"optimizer factory (e.g. optimizer=optim_jax.adamw)"
                )
            transforms[label] = optimizer(**{**defaults, **spec})
        else:
            raise TypeError(
                f"groups[{label!r}] must be a GradientTransformation, a dict of options or "
                f"None (frozen), got {type(spec).__name__}"
            )

    inner = optax.partition(transforms, labels)

    def init_fn(params):
        flat.refuse_flat(params, "param_groups", BY_NAME)
        if not _is_params_placeholder(params):
            _check_labels(_resolve(labels, params), params, transforms)
        return inner.init(params)

    return optax.GradientTransformationExtraArgs(init_fn, inner.update)


FROZEN_LABEL = "frozen"
TRAINABLE_LABEL = "trainable"


def freeze(
    inner: optax.GradientTransformation, frozen: MaskOrFn
) -> optax.GradientTransformationExtraArgs:
    """``inner`` on the trainable parameters; zero updates and no state for the frozen ones.

    ``frozen`` is a pytree of booleans with the structure of the params (or a
    prefix of it), or a function ``params -> such a pytree``; True marks a
    frozen leaf. Frozen leaves get updates of exactly zero (whatever their
    gradient holds, NaN included), and ``inner`` allocates nothing for them:
    unlike ``optax.masked``, which passes masked-out updates through, and
    unlike a zero learning rate, which still keeps moment buffers.

    The state is that of :func:`param_groups` with the groups ``"trainable"``
    (``inner``) and ``"frozen"``.
    """
    if not callable(frozen):
        _check_bool_leaves("frozen", frozen)

    def labels(params):
        mask = _resolve(frozen, params)
        _check_bool_leaves("frozen", mask)
        return jax.tree.map(lambda m: FROZEN_LABEL if m else TRAINABLE_LABEL, mask)

    return param_groups({TRAINABLE_LABEL: inner, FROZEN_LABEL: None}, labels)


def _check_bool_leaves(name: str, tree: Any) -> None:
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, bool) and not (
            getattr(leaf, "shape", None) == () and getattr(leaf, "dtype", None) == np.bool_
        ):
            raise TypeError(f"{name} must be a pytree of Python booleans, found {leaf!r}")


# --------------------------------------------------------------------------- layer-wise LR decay


def _normalize_layers(layer_prefixes: Any) -> list[tuple[tuple[str, ...], ...]]:
    if isinstance(layer_prefixes, str) or not isinstance(layer_prefixes, Sequence):
        raise TypeError(
            f"layer_prefixes must be a list of path prefixes (bottom layer first), got "
            f"{layer_prefixes!r}"
        )
    if not layer_prefixes:
        raise ValueError("layer_prefixes must not be empty")
    layers = []
    seen: set[tuple[str, ...]] = set()
    for entry in layer_prefixes:
        prefixes = (entry,) if isinstance(entry, str) else tuple(entry)
        if not prefixes:
            raise ValueError(f"layer_prefixes: entry {entry!r} holds no prefix")
        parsed = []
        for prefix in prefixes:
            if not isinstance(prefix, str):
                raise TypeError(f"layer_prefixes: {prefix!r} is not a string")
            components = tuple(c for c in prefix.split("/") if c)
            if not components:
                raise ValueError(f"layer_prefixes: {prefix!r} is an empty path prefix")
            if components in seen:
                raise ValueError(f"layer_prefixes: {prefix!r} appears more than once")
            seen.add(components)
            parsed.append(components)
        layers.append(tuple(parsed))
    return layers


def _layer_index(components: tuple[str, ...], layers: list) -> int | None:
    """The layer whose prefix matches ``components`` with the most components, or None."""
    best, best_len = None, -1
    for index, prefixes in enumerate(layers):
        for prefix in prefixes:
            if len(prefix) > best_len and components[: len(prefix)] == prefix:
                best, best_len = index, len(prefix)
    return best


def _check_decay(decay: Any) -> float:
    if callable(decay) or isinstance(decay, bool):
        raise TypeError(f"decay must be a number in (0, 1], got {decay!r}")
    try:
        value = float(decay)
    except (TypeError, ValueError) as err:
        raise TypeError(f"decay must be a number in (0, 1], got {decay!r}") from err
    if not 0.0 < value <= 1.0:
        raise ValueError(f"decay must be in (0, 1], got {value}")
    return value


def layerwise_lr_scales(
    params: base.Params, decay: float, layer_prefixes: Sequence[str | Sequence[str]]
) -> Any:
    """The learning-rate multiplier of every leaf under :func:`layerwise_lr_decay`.

    A pytree of Python floats with the structure of ``params``; useful to print
    and check the assignment before training.
    """
    decay = _check_decay(decay)
    layers = _normalize_layers(layer_prefixes)
    return _scales(params, decay, layers)


def _scales(params: Any, decay: float, layers: list) -> Any:
    n = len(layers)

    def one(path, _):
        index = _layer_index(path_components(path), layers)
        return 1.0 if index is None else decay ** (n - index)

    return jax.tree_util.tree_map_with_path(one, params)


def _check_all_prefixes_match(params: Any, layers: list) -> None:
    used = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        components = path_components(path)
        for prefixes in layers:
            for prefix in prefixes:
                if components[: len(prefix)] == prefix:
                    used.add(prefix)
    unused = ["/".join(p) for prefixes in layers for p in prefixes if p not in used]
    if unused:
        examples = [p for p in jax.tree.leaves(param_paths(params))][:8]
        raise ValueError(
            f"layer_prefixes: {unused} match no parameter (paths look like {examples}); "
            f"see optim_jax.param_paths"
        )


def layerwise_lr_decay(
    decay: float, layer_prefixes: Sequence[str | Sequence[str]]
) -> optax.GradientTransformation:
    """Layer-wise learning-rate decay (ELECTRA, Clark et al. 2020; BEiT, Bao et al. 2022).

    ``layer_prefixes`` lists the layers whose learning rate decays, from the
    bottom (the embeddings) up, as path prefixes (``/``-separated, matched
    whole component by component from the root, so ``"blocks/1"`` does not
    match ``"blocks/10/..."``); an entry may be a list of prefixes that form
    one layer, e.g. ``["embed", "pos_embed"]``. With ``n`` entries, a leaf in
    entry ``i`` (0-based; the most specific matching prefix wins) has its
    update scaled by

    .. math::  s_i = \\text{decay}^{\\,n - i},

    and leaves matching no prefix (the head, a final norm) form the top layer
    with scale 1. That is the assignment of BEiT's and timm's
    ``param_groups_layer_decay``: listing ``[embeddings, block 0, ...,
    block L-1]`` gives the embeddings ``decay**(L+1)``, the last block
    ``decay``, the head 1. (ELECTRA's code numbers its task head ``L+2``, which
    puts one extra factor of ``decay`` on every listed layer.)

    Chain it after the optimizer: scaling the update scales the effective
    learning rate of the layer. With AdamW the decoupled decay term
    ``lr * wd * p`` is scaled too, as in BEiT's per-group learning rates. It
    keeps no state. ``init`` checks that every prefix matches at least one
    parameter (a typo would otherwise switch the decay off silently); see
    :func:`layerwise_lr_scales` for the multiplier of every leaf.

    Raises:
      ValueError: ``decay`` outside ``(0, 1]``, empty or duplicated prefixes;
        in ``init``, a prefix that matches no parameter.
    """
    decay = _check_decay(decay)
    layers = _normalize_layers(layer_prefixes)

    def init_fn(params):
        flat.refuse_flat(params, "layerwise_lr_decay", BY_NAME)
        if not _is_params_placeholder(params):
            _check_all_prefixes_match(params, layers)
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        scales = _scales(updates, decay, layers)

        def one(u, s):
            if s == 1.0:
                return u
            return (u.astype(base.compute_dtype(u.dtype)) * s).astype(u.dtype)

        return jax.tree.map(one, updates, scales), state

    return optax.GradientTransformation(init_fn, update_fn)
