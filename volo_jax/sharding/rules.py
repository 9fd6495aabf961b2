"""Logical axis names of every parameter, declared once, and their mapping to the mesh.

Two tables, in the style of MaxText:

* `PARAM_AXES`: (regex on the 'params/network_2_0/attn/qkv/kernel' path, logical axes
  per dimension). The first rule whose regex matches and whose rank equals the array's
  applies. Column-parallel Dense kernels are ('embed', 'heads' | 'mlp' | 'classes'),
  row-parallel ones ('heads' | 'mlp', 'embed'); conv kernels split their output
  channels over 'embed'; norms and BatchNorm statistics are replicated.
* logical -> mesh rules (`config.sharding_rules`, `DEFAULT_RULES`): 'batch' over
  ('data', 'fsdp'), 'embed' over 'fsdp', 'heads' and 'mlp' over 'model', anything else
  replicated. `config.sharding` ('replicated' | 'fsdp' | 'tensor' | 'auto') keeps only
  the parameter mappings onto those mesh axes.

A dimension that its mesh axes do not divide stays whole (logged once per parameter).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from volo_jax.errors import ConfigError
from volo_jax.sharding.mesh import FSDP_AXIS, MODEL_AXIS, axis_size

if TYPE_CHECKING:  # a training dependency; the shardings themselves need only JAX
    import ml_collections

LogicalAxes = tuple[str | None, ...]
Rules = Mapping[str, tuple[str, ...]]

#: (path regex, logical axes per dimension); first match with the right rank wins.
PARAM_AXES: tuple[tuple[str, LogicalAxes], ...] = (
    # Column-parallel Dense: attention inputs (self-, class- and outlook attention).
    (r"/attn/(qkv|kv|q|v|attn)/kernel$", ("embed", "heads")),
    (r"/attn/(qkv|kv|q|v|attn)/bias$", ("heads",)),
    (r"/mlp/fc1/kernel$", ("embed", "mlp")),
    (r"/mlp/fc1/bias$", ("mlp",)),
    (r"^params/(head|aux_head)/kernel$", ("embed", "classes")),
    (r"^params/(head|aux_head)/bias$", ("classes",)),
    # Row-parallel Dense: their outputs are summed over the split dimension.
    (r"/attn/proj/kernel$", ("heads", "embed")),
    (r"/mlp/fc2/kernel$", ("mlp", "embed")),
    (r"/(attn/proj|mlp/fc2)/bias$", ("embed",)),
    # Convolutions (stem, patch projection, downsample): output channels.
    (r"/kernel$", ("conv_height", "conv_width", "conv_in", "embed")),
    (r"/proj/bias$", ("embed",)),
    # LayerNorm / BatchNorm scales and biases, BatchNorm statistics.
    (r"/(norm\d*|conv_\d+)/(scale|bias)$", ("norm",)),
    (r"^batch_stats/.*/(mean|var)$", ("norm",)),
    # Embeddings: the channels go with 'embed'.
    (r"^params/pos_embed$", (None, "height", "width", "embed")),
    (r"^params/cls_token$", (None, None, "embed")),
)

#: The default logical -> mesh mapping (`config.sharding_rules`).
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("model",),
    "mlp": ("model",),
    "classes": (),
    "norm": (),
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
    """A jax key path -> 'params/network_2_0/attn/qkv/kernel'."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def logical_axes(path: str, ndim: int) -> LogicalAxes | None:
    """The logical axes of the parameter at `path` with `ndim` dims (None: no rule)."""
    for pattern, axes in PARAM_AXES:
        if len(axes) == ndim and re.search(pattern, path):
            return axes
    return None


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


def spec_for(path: str, shape: Sequence[int], rules: Rules, mesh: Mesh) -> P:
    """The PartitionSpec of one array: its logical axes mapped by `rules` onto `mesh`.

    A mesh axis missing from the mesh, of size 1, or already used by an earlier dimension
    is left out; mesh axes that do not divide the dimension leave it whole (logged once).
    """
    axes = logical_axes(path, len(shape))
    if axes is None:
        _log_once(f"sharding: no rule for {path} {tuple(shape)}; replicated")
        return P()
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


def param_specs(abstract_params: Any, rules: Rules, mesh: Mesh, prefix: str = "params") -> Any:
    """PartitionSpec tree of a params tree ({'network_0_0': ...}, arrays or
    ShapeDtypeStructs; paths are matched as '<prefix>/network_0_0/...')."""

    def one(path: Sequence[Any], leaf: Any) -> P:
        return spec_for(
            f"{prefix}/{path_str(path)}" if prefix else path_str(path), leaf.shape, rules, mesh
        )

    return jax.tree_util.tree_map_with_path(one, abstract_params)


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


def state_specs(abstract_state: Any, mesh: Mesh, rules: Rules) -> Any:
    """PartitionSpec tree of a train state with fields params, opt_state, batch_stats,
    ema_params, ema_batch_stats (each optional) and any others (step, rng: replicated)."""
    params = getattr(abstract_state, "params", None)
    pspecs = param_specs(params, rules, mesh) if params is not None else None
    fields = {}
    for name in ("params", "opt_state", "ema_params", "batch_stats", "ema_batch_stats"):
        value = getattr(abstract_state, name, None)
        if value is None:
            continue
        if name in ("params", "ema_params"):
            fields[name] = pspecs
        elif name in ("batch_stats", "ema_batch_stats"):
            fields[name] = param_specs(value, rules, mesh, prefix="batch_stats")
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


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedSharding tree of a train state (see `state_specs`): params, their EMA and
    the optimizer moments per the rules; counts, step, RNG and scalars replicated."""
    return to_shardings(state_specs(abstract_state, mesh, rules), mesh)


def variables_shardings(abstract_variables: Mapping[str, Any], mesh: Mesh, rules: Rules) -> Any:
    """NamedSharding tree of model variables {'params': ..., 'batch_stats': ...}."""
    return {
        name: to_shardings(param_specs(tree, rules, mesh, prefix=name), mesh)
        for name, tree in abstract_variables.items()
    }


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings` (a restore target for orbax)."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )
