"""PyTorch state dict -> Flax variables, name by name, strictly.

Flax modules here carry timm's names, with list indices joined by '_'
(`network.0.1.attn.v.weight` <-> params `network_0_1/attn/v/kernel`), so one rule
maps every model: module path segments `name_i_j` become `name.i.j`, and the leaf
names and layouts are translated as below. Every Flax variable must be filled and
every tensor used; anything else is one error listing what did not fit.

| Flax leaf                  | torch name     | layout change                 |
|----------------------------|----------------|-------------------------------|
| params .../kernel (2-D)    | weight         | transpose (Linear)            |
| params .../kernel (4-D)    | weight         | (O, I, kh, kw) -> (kh, kw, I, O) |
| params .../scale           | weight         | (LayerNorm, BatchNorm)        |
| params .../embedding       | weight         |                               |
| batch_stats .../mean, var  | running_mean, running_var |                    |
| anything else (pos_embed)  | same name      | pos_embed grid resized        |
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from volo_jax.convert.resize import resize_pos_embed
from volo_jax.errors import CheckpointError

#: Tensors a torch state dict may hold that have no Flax counterpart.
IGNORED_TORCH_SUFFIXES = ("num_batches_tracked",)

_INDEXED = re.compile(r"(.*?)((?:_\d+)+)")
_BATCH_STATS = {"mean": "running_mean", "var": "running_var"}
_PARAM_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def _module_segment(segment: str) -> str:
    match = _INDEXED.fullmatch(segment)
    if not match:
        return segment
    return match.group(1) + match.group(2).replace("_", ".")


def torch_name(collection: str, path: Sequence[str]) -> str:
    """The torch state-dict name of the Flax variable `collection/path`."""
    *modules, leaf = path
    if collection == "batch_stats":
        leaf = _BATCH_STATS[leaf]
    elif collection == "params":
        leaf = _PARAM_LEAVES.get(leaf, leaf)
    else:
        raise CheckpointError(f"no torch counterpart for collection {collection!r}")
    return ".".join([*(_module_segment(m) for m in modules), leaf])


def to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    """Moves a torch tensor into the Flax layout of the variable named `leaf`."""
    if leaf == "kernel":
        if value.ndim == 2:
            return value.T
        if value.ndim == 3:
            return value.transpose(2, 1, 0)
        if value.ndim == 4:
            return value.transpose(2, 3, 1, 0)
    return value


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    """The inverse of `to_flax_layout`."""
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel" and value.ndim == 3:
        return value.transpose(2, 1, 0)
    return to_flax_layout(leaf, value)


def example_input(model: nn.Module, batch: int = 1) -> jax.ShapeDtypeStruct:
    """The NHWC input a model is built for, from its `img_size` and `in_chans`."""
    size = getattr(model, "img_size", 224)
    return jax.ShapeDtypeStruct((batch, size, size, getattr(model, "in_chans", 3)), jnp.float32)


def abstract_variables(model: nn.Module, inputs: Any = None) -> dict[str, Any]:
    """Shapes and dtypes of a model's variables, without allocating them.

    `inputs` (an array or ShapeDtypeStruct) is what `model.init` is traced with;
    by default an image batch of the model's `img_size`.
    """
    x = example_input(model) if inputs is None else inputs
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))
    return nn.unbox(boxed)  # plain ShapeDtypeStructs, without the logical axes


def torch_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{torch name: torch-layout shape} that a state dict for `model` must have."""
    shapes = {}
    for (collection, *path), leaf in traverse_util.flatten_dict(abstract_variables(model)).items():
        dummy = np.empty(leaf.shape, np.bool_)
        shapes[torch_name(collection, path)] = to_torch_layout(path[-1], dummy).shape
    return shapes


def _is_pos_embed(path: Sequence[str]) -> bool:
    return path[-1] == "pos_embed"


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    model: nn.Module,
    *,
    skip: Iterable[str] = (),
    model_name: str | None = None,
    antialias: bool = True,
    inputs: Any = None,
) -> dict[str, Any]:
    """Converts a PyTorch state dict into the variables of a Flax model (or layer).

    Args:
      state_dict: {torch name: array}, e.g. from `read_state_dict`.
      model: the Flax module the weights are for; a position embedding of another
        grid is resized (bicubic, timm's antialias by default) to the model's.
      skip: regular expressions of Flax paths ('params/head/kernel') to leave out
        of the result (and not require), e.g. a classifier to be trained anew;
        their torch tensors are dropped.
      model_name: used in error messages only.
      antialias: timm's (True) or the official VOLO code's (False) resize.
      inputs: an example input (array or ShapeDtypeStruct) for modules that are not
        image models with `img_size`, e.g. a single layer.
    Returns:
      {'params': ..., 'batch_stats': ...} nested dicts of float32 NumPy arrays.
    Raises:
      CheckpointError: listing missing, unexpected and mis-shaped names, and the
        registered model the checkpoint does fit, if any.
    """
    skip_patterns = [re.compile(p) for p in skip]
    flat_abstract = traverse_util.flatten_dict(abstract_variables(model, inputs))
    used: set[str] = set()
    missing, misshaped = [], []
    out: dict[tuple[str, ...], np.ndarray] = {}
    for (collection, *path), leaf in flat_abstract.items():
        name = torch_name(collection, path)
        if any(p.search("/".join([collection, *path])) for p in skip_patterns):
            used.add(name)
            continue
        if name not in state_dict:
            missing.append(name)
            continue
        used.add(name)
        value = to_flax_layout(path[-1], np.asarray(state_dict[name]))
        if _is_pos_embed(path) and value.ndim == 4 and value.shape[-1] == leaf.shape[-1]:
            value = resize_pos_embed(value, tuple(leaf.shape[1:3]), antialias)
        if value.shape != leaf.shape:
            expected = to_torch_layout(path[-1], np.empty(leaf.shape, np.bool_)).shape
            misshaped.append(
                f"{name}: checkpoint {tuple(state_dict[name].shape)}, model {expected}"
            )
            continue
        out[(collection, *path)] = value.astype(leaf.dtype)
    unexpected = sorted(
        n for n in state_dict if n not in used and not n.endswith(IGNORED_TORCH_SUFFIXES)
    )
    if missing or unexpected or misshaped:
        raise CheckpointError(
            _mismatch_message(state_dict, model_name, missing, unexpected, misshaped)
        )
    return traverse_util.unflatten_dict(out)


def _mismatch_message(
    state_dict: Mapping[str, np.ndarray],
    model_name: str | None,
    missing: list[str],
    unexpected: list[str],
    misshaped: list[str],
) -> str:
    def listing(title: str, items: list[str], limit: int = 12) -> str:
        if not items:
            return ""
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:limit]) + more

    target = model_name or "the model"
    message = (
        f"the checkpoint does not fit {target}:"
        + listing("missing from the checkpoint", missing)
        + listing("unexpected in the checkpoint", unexpected)
        + listing("mis-shaped", misshaped)
    )
    matches = [m for m in identify_model(state_dict) if m != model_name]
    if matches:
        message += (
            f"\nThe checkpoint fits {' / '.join(matches)}: convert it with --model {matches[0]}"
            " (a different resolution of the same variant is resized automatically)."
        )
    return message


def numbered_groups(names: Iterable[str]) -> collections.Counter[int]:
    """How many numbered submodules each container of a state dict holds, as a multiset of
    sizes: 'network.0.3.norm1.weight' is block 3 of 'network.0'. A numbered entry that is
    a tensor itself ('patch_embed.conv.0.weight', a Sequential's layer) does not count."""
    groups: dict[str, set[int]] = collections.defaultdict(set)
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) - 2):
            if parts[i].isdigit() and not parts[i + 1].isdigit():
                groups[".".join(parts[:i])].add(int(parts[i]))
    return collections.Counter(len(indices) for indices in groups.values())


def identify_model(state_dict: Mapping[str, np.ndarray]) -> list[str]:
    """Registered models whose structure this state dict fits (classifier width and
    position grid aside). Candidates whose blocks per stage (`block_counts`) are not among
    the state dict's `numbered_groups` are ruled out before any is traced (tracing one
    takes about a second), and so are those with a width (`widths`) no tensor has."""
    from volo_jax.models import create_model, list_models

    names = {n for n in state_dict if not n.endswith(IGNORED_TORCH_SUFFIXES)}
    groups = numbered_groups(names)
    dims = {d for name in names for d in np.shape(state_dict[name])}
    found = []
    for candidate in list_models():
        model = create_model(candidate)
        if collections.Counter(model.block_counts) - groups or not set(model.widths) <= dims:
            continue  # a stage's block count or a width that the checkpoint lacks
        expected = _registered_torch_shapes(model)
        if set(expected) != names:
            continue
        if all(
            _fits(name, tuple(state_dict[name].shape), shape) for name, shape in expected.items()
        ):
            found.append(candidate)
    return found


#: torch_shapes of the registered models, by architecture, for this process (tracing
#: every registered model takes seconds each).
_ARCHITECTURE_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}


def _registered_torch_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """`torch_shapes(model)`, traced once for the models that differ only in resolution
    (volo_d1_224 and volo_d1_384): the shapes that depend on it (the position grid) are
    compared by width only (`_fits`)."""
    key = repr(model.clone(img_size=0)) if hasattr(model, "img_size") else repr(model)
    if key not in _ARCHITECTURE_SHAPES:
        _ARCHITECTURE_SHAPES[key] = torch_shapes(model)
    return _ARCHITECTURE_SHAPES[key]


def _fits(name: str, actual: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    if name.endswith("pos_embed"):  # any grid, same width
        return len(actual) == len(expected) and actual[-1] == expected[-1]
    if name.split(".")[0] in ("head", "aux_head"):  # any number of classes
        return actual[1:] == expected[1:]
    return actual == expected


def flax_to_torch(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax variables -> a torch-named state dict (NumPy), the inverse mapping."""
    out = {}
    for (collection, *path), value in traverse_util.flatten_dict(dict(variables)).items():
        out[torch_name(collection, path)] = to_torch_layout(path[-1], np.asarray(value))
    return out
