"""How the model variables are laid out on the mesh: the logical -> mesh rules, in one
table, and the shardings of a train state they give.

Every parameter is made with its logical axes, one name a dimension, where it is
defined (`volo_jax.layers.with_axes`, flax's logical partitioning): column-parallel
Dense kernels are ('embed', 'heads' | 'mlp' | 'classes'), row-parallel ones ('heads' |
'mlp', 'embed'); convolution kernels ('conv_height', 'conv_width', 'conv_in', 'embed');
norms and BatchNorm statistics 'norm'. `logical_axes(model)` reads them from an abstract
`model.init`; `DEFAULT_RULES` (`config.sharding_rules`) maps each name onto mesh axes;
`config.sharding` ('replicated' | 'fsdp' | 'tensor' | 'auto') keeps only the parameter
mappings onto those mesh axes.

A dimension that its mesh axes do not divide stays whole (logged once per parameter).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import meta
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from volo_jax.errors import ConfigError
from volo_jax.sharding.mesh import FSDP_AXIS, MODEL_AXIS, axis_size

if TYPE_CHECKING:  # a training dependency; the shardings themselves need only JAX
    import flax.linen as nn
    import ml_collections

LogicalAxes = tuple[str | None, ...]
Rules = Mapping[str, tuple[str, ...]]

#: Logical axis -> the mesh axes it is split over (`config.sharding_rules`), for every
#: logical name a variable is declared with (tested). () keeps a dimension whole.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),  # the batch of the inputs
    "embed": ("fsdp",),  # the model width; conv output channels
    "heads": ("model",),  # attention heads x head dim (q, k, v, outlook weights)
    "mlp": ("model",),  # the MLP's hidden features
    "classes": (),
    "norm": (),  # LayerNorm / BatchNorm scales and biases, BatchNorm statistics
    "pooled": (),  # the pooled features a convnet's `ClassifierHead` reads
    "conv_height": (),
    "conv_width": (),
    "conv_in": (),
    "conv_bias": (),  # biases of convolutions other than patch projections
    "height": (),  # the token grid of a position embedding
    "width": (),
    "rel_pos": (),  # relative-position tables (halo, window attention)
}

#: `config.sharding` -> the mesh axes the parameters may be split over.
PRESETS: dict[str, tuple[str, ...] | None] = {
    "auto": None,  # the rules as given
    "replicated": (),
    "fsdp": (FSDP_AXIS,),
    "tensor": (MODEL_AXIS,),
}

_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logging.info(message)


def path_str(path: Sequence[Any]) -> str:
    """A jax key path (or a tuple of names) -> 'params/network_2_0/attn/qkv/kernel'."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def axes_of(boxed_variables: Any) -> Any:
    """The logical axes of a variables tree made by `init` (values boxed with their names):
    the same tree with a `PartitionSpec` of logical names at each leaf. ValueError for a
    leaf made without names, or with one name too few or many."""

    def one(path: Sequence[Any], leaf: Any) -> P:
        names = getattr(leaf, "names", None)
        value = getattr(leaf, "value", leaf)
        if not isinstance(leaf, meta.AxisMetadata) or names is None:
            raise ValueError(
                f"{path_str(path)} {tuple(getattr(value, 'shape', ()))} has no logical axes: "
                "make it with `volo_jax.layers.with_axes` (or a layer of volo_jax.layers)"
            )
        if len(names) != len(value.shape):
            raise ValueError(
                f"{path_str(path)}: {len(names)} logical axes {names} for shape {value.shape}"
            )
        return P(*names)

    return jax.tree_util.tree_map_with_path(one, boxed_variables, is_leaf=meta.is_axis_metadata)


def logical_axes(model: nn.Module, inputs: Any = None) -> dict[str, Any]:
    """The logical axes of every variable of `model` ({'params': ..., 'batch_stats': ...},
    a `PartitionSpec` of logical names at each leaf), read from `model.init` traced
    abstractly (nothing is computed). `inputs`: what init is traced with (an array or
    ShapeDtypeStruct); by default one NHWC image of the model's `img_size`, `in_chans`."""
    if inputs is None:
        size = model.img_size
        inputs = jax.ShapeDtypeStruct((1, size, size, model.in_chans), jnp.float32)
    boxed = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), inputs)
    return dict(axes_of(boxed))


def preset_rules(preset: str, rules: Rules | None = None) -> dict[str, tuple[str, ...]]:
    """`rules` (default `DEFAULT_RULES`) restricted by a `config.sharding` preset: the
    parameters' logical axes keep only the mesh axes the preset allows ('batch' is kept)."""
    if preset not in PRESETS:
        raise ConfigError(f"config.sharding: must be one of {sorted(PRESETS)}, got {preset!r}")
    rules = {k: _as_axes(v) for k, v in (DEFAULT_RULES if rules is None else rules).items()}
    allowed = PRESETS[preset]
    if allowed is None:
        return rules
    return {k: v if k == "batch" else tuple(a for a in v if a in allowed) for k, v in rules.items()}


def rules_from_config(config: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
    """`config.sharding_rules` (default `DEFAULT_RULES`) under the `config.sharding` preset."""
    rules = config.get("sharding_rules")
    rules = None if rules is None else dict(rules.items() if hasattr(rules, "items") else rules)
    return preset_rules(config.get("sharding", "auto") or "auto", rules)


def _as_axes(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def spec_for(
    axes: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh: Mesh, path: str = ""
) -> P:
    """The PartitionSpec of one array whose dimensions have the logical `axes`: each name
    mapped by `rules` onto `mesh`.

    A mesh axis missing from the mesh, of size 1, or already used by an earlier dimension
    is left out; mesh axes that do not divide the dimension leave it whole (logged once,
    naming `path`).
    """
    if len(axes) != len(shape):
        raise ValueError(f"{path}: logical axes {tuple(axes)} do not fit shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[tuple[str, ...] | str | None] = []
    for dim, name in zip(shape, axes, strict=True):
        mesh_axes = tuple(
            a
            for a in _as_axes(rules.get(name) if name else None)
            if a in mesh.axis_names and a not in used and mesh.shape[a] > 1
        )
        if mesh_axes and dim % axis_size(mesh, mesh_axes):
            _log_once(
                f"sharding: {path} dim {dim} ({name}) does not divide over "
                f"{mesh_axes} = {axis_size(mesh, mesh_axes)} devices; kept whole"
            )
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def param_specs(abstract: Any, axes: Any, rules: Rules, mesh: Mesh, prefix: str = "params") -> Any:
    """PartitionSpec tree of a variables tree ({'network_0_0': ...}, arrays or
    ShapeDtypeStructs) whose logical axes are `axes` (the same tree, a PartitionSpec of
    logical names a leaf: `logical_axes(model)[prefix]`). ValueError where the trees differ."""
    flat_axes = traverse_util.flatten_dict(_as_dict(axes))
    flat = traverse_util.flatten_dict(_as_dict(abstract))
    missing = sorted("/".join(k) for k in flat.keys() - flat_axes.keys())
    if missing:
        raise ValueError(
            f"{prefix}: no logical axes for {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
            "the variables are not those of the model the axes were read from"
        )
    specs = {
        path: spec_for(flat_axes[path], leaf.shape, rules, mesh, "/".join((prefix, *path)))
        for path, leaf in flat.items()
    }
    return traverse_util.unflatten_dict(specs)


def _as_dict(tree: Any) -> Any:
    """Nested mappings (FrozenDict, ConfigDict-free) -> nested dicts."""
    if isinstance(tree, Mapping):
        return {k: _as_dict(v) for k, v in tree.items()}
    return tree


def _mirror_specs(tree: Any, params: Any, specs: Any) -> Any:
    """Specs for a tree (an optimizer state) whose leaves mirror params: a leaf whose
    key path ends with a parameter's path and has its shape takes its spec; others
    (counts, scalars, masked nodes) are replicated."""
    by_path = {}
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
    for (path, leaf), spec in zip(flat_params, flat_specs, strict=True):
        by_path[path_str(path)] = (tuple(leaf.shape), spec)

    def one(path: Sequence[Any], leaf: Any) -> P:
        shape = tuple(getattr(leaf, "shape", ()))
        keys = path_str(path).split("/")
        for start in range(len(keys)):
            hit = by_path.get("/".join(keys[start:]))
            if hit is not None:
                return hit[1] if hit[0] == shape else P()
        return P()

    return jax.tree_util.tree_map_with_path(one, tree)


def state_specs(abstract_state: Any, axes: Mapping[str, Any], mesh: Mesh, rules: Rules) -> Any:
    """PartitionSpec tree of a train state with fields params, opt_state, batch_stats,
    ema_params, ema_batch_stats (each optional) and any others (step, rng: replicated);
    `axes`: the model's `logical_axes`."""
    params = getattr(abstract_state, "params", None)
    pspecs = param_specs(params, axes["params"], rules, mesh) if params is not None else None
    fields = {}
    for name in ("params", "opt_state", "ema_params", "batch_stats", "ema_batch_stats"):
        value = getattr(abstract_state, name, None)
        if value is None:
            continue
        if name in ("params", "ema_params"):
            fields[name] = pspecs
        elif name in ("batch_stats", "ema_batch_stats"):
            stats_axes = axes.get("batch_stats", {})
            fields[name] = param_specs(value, stats_axes, rules, mesh, prefix="batch_stats")
        else:
            fields[name] = _mirror_specs(value, params, pspecs)
    others = {
        name: jax.tree_util.tree_map(lambda _: P(), getattr(abstract_state, name))
        for name in ("step", "rng")
        if hasattr(abstract_state, name)
    }
    return abstract_state.replace(**fields, **others)


def to_shardings(specs: Any, mesh: Mesh) -> Any:
    """PartitionSpec tree -> NamedSharding tree on `mesh`."""
    return jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )


def state_shardings(abstract_state: Any, axes: Mapping[str, Any], mesh: Mesh, rules: Rules) -> Any:
    """NamedSharding tree of a train state (see `state_specs`): params, their EMA and
    the optimizer moments per the rules; counts, step, RNG and scalars replicated."""
    return to_shardings(state_specs(abstract_state, axes, mesh, rules), mesh)


def variables_shardings(
    abstract_variables: Mapping[str, Any], axes: Mapping[str, Any], mesh: Mesh, rules: Rules
) -> Any:
    """NamedSharding tree of model variables {'params': ..., 'batch_stats': ...} whose
    logical axes are `axes` (`logical_axes(model)`)."""
    return {
        name: to_shardings(param_specs(tree, axes.get(name, {}), rules, mesh, prefix=name), mesh)
        for name, tree in abstract_variables.items()
    }


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings` (a restore target for orbax)."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )
