"""Logical axes declared where the parameters are made: every variable of every
registered architecture (and of every token-mixer variant of VOLO) has them, every name has a
rule, and the layouts they give are those of the path regexes they replaced."""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from volo_jax.layers import with_axes
from volo_jax.models import create_model, list_models
from volo_jax.models.volo import MIXER_NAMES
from volo_jax.sharding.rules import DEFAULT_RULES, axes_of, logical_axes, preset_rules, spec_for
from volo_jax.weights import variant

#: One model of each architecture (the resolutions of a variant share every layer); in
#: the default run one of each family, the larger ones with `-m slow` (the same layers).
_FAST = ("volo_d1_224", "halonet26t", "rednet26")
_ARCHITECTURES = {variant(name): name for name in reversed(list_models())}
#: The token-mixer variants: VOLO-D1 (one block a stage) with each mixer in its outlooker
#: stage.
MIXER_VARIANTS = [
    ("volo_d1_224", {"token_mixer": name, "layers": (1, 1, 1, 1)}) for name in MIXER_NAMES[1:]
]
MODELS = [
    pytest.param((name, {}), marks=() if name in _FAST else pytest.mark.slow)
    for name in sorted(_ARCHITECTURES.values())
] + MIXER_VARIANTS


class FakeMesh:
    """The parts of a Mesh that the rules read: axis names and sizes."""

    def __init__(self, **shape: int) -> None:
        self.shape = shape
        self.axis_names = tuple(shape)


#: Meshes and presets the layouts are compared on: both parameter axes split, each
#: alone, and sizes that some dimensions do not divide.
LAYOUTS = [
    (FakeMesh(data=2, fsdp=2, model=2), "auto"),
    (FakeMesh(data=1, fsdp=8, model=1), "fsdp"),
    (FakeMesh(data=1, fsdp=1, model=8), "tensor"),
    (FakeMesh(data=1, fsdp=4, model=4), "auto"),
    (FakeMesh(data=1, fsdp=16, model=3), "auto"),
]

# The path regexes that decided the layouts before the axes were declared in the
# modules, kept here as the reference: (path regex, logical axes); the first rule whose
# regex matches and whose rank equals the array's applies; no rule: replicated.
_PATH_RULES = (
    (r"/attn/(qkv|kv|q|v|attn)/kernel$", ("embed", "heads")),
    (r"/attn/(qkv|kv|q|v|attn)/bias$", ("heads",)),
    (r"/mlp/fc1/kernel$", ("embed", "mlp")),
    (r"/mlp/fc1/bias$", ("mlp",)),
    (r"^params/(head|aux_head)/kernel$", ("embed", "classes")),
    (r"^params/(head|aux_head)/bias$", ("classes",)),
    (r"/attn/proj/kernel$", ("heads", "embed")),
    (r"/mlp/fc2/kernel$", ("mlp", "embed")),
    (r"/(attn/proj|mlp/fc2)/bias$", ("embed",)),
    (r"/kernel$", ("conv_height", "conv_width", "conv_in", "embed")),
    (r"/proj/bias$", ("embed",)),
    (r"/(norm\d*|conv_\d+)/(scale|bias)$", ("norm",)),
    (r"^batch_stats/.*/(mean|var)$", ("norm",)),
    (r"^params/pos_embed$", (None, "height", "width", "embed")),
    (r"^params/cls_token$", (None, None, "embed")),
)
_OLD_RULES = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("model",),
    "mlp": ("model",),
    "classes": (),
    "norm": (),
}


def _old_spec(path: str, shape: tuple[int, ...], preset: str, mesh: FakeMesh) -> P:
    for pattern, axes in _PATH_RULES:
        if len(axes) == len(shape) and re.search(pattern, path):
            return spec_for(axes, shape, preset_rules(preset, _OLD_RULES), mesh, path)
    return P()


@functools.cache
def _traced(name: str, overrides: tuple) -> tuple[dict, dict]:
    """(flat logical axes, flat shapes) of every variable, {('params', ...): ...}."""
    model = create_model(name, **dict(overrides))
    size, chans = model.img_size, model.in_chans
    x = jax.ShapeDtypeStruct((1, size, size, chans), jnp.float32)
    boxed = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    axes = traverse_util.flatten_dict(axes_of(boxed))
    shapes = traverse_util.flatten_dict(nn.unbox(boxed))
    return axes, {k: tuple(v.shape) for k, v in shapes.items()}


def _id(case: tuple) -> str:
    name, overrides = case
    return "-".join((name, *([overrides["token_mixer"]] if overrides else [])))


@pytest.mark.parametrize("case", MODELS, ids=_id)
def test_every_variable_has_logical_axes_with_rules(case):
    axes, shapes = _traced(case[0], tuple(case[1].items()))
    assert axes.keys() == shapes.keys() and any(k[0] == "params" for k in axes)
    for path, names in axes.items():
        assert len(names) == len(shapes[path]), path
        unknown = [n for n in names if n is not None and n not in DEFAULT_RULES]
        assert not unknown, f"{'/'.join(path)}: {unknown} not in DEFAULT_RULES"


@pytest.mark.parametrize("case", MODELS, ids=_id)
def test_layouts_are_those_of_the_path_rules(case):
    """Every parameter and BatchNorm statistic is laid out as the path regexes laid it
    out, on every mesh and preset of LAYOUTS."""
    axes, shapes = _traced(case[0], tuple(case[1].items()))
    for mesh, preset in LAYOUTS:
        rules = preset_rules(preset)
        for path, names in axes.items():
            key = "/".join(path)
            new = spec_for(names, shapes[path], rules, mesh, key)
            assert new == _old_spec(key, shapes[path], preset, mesh), (key, mesh.shape, preset)


def test_logical_axes_of_volo():
    axes = logical_axes(create_model("volo_d1_224"))
    params = axes["params"]
    assert params["network_2_0"]["attn"]["qkv"]["kernel"] == P("embed", "heads")
    assert params["network_2_0"]["mlp"]["fc2"]["kernel"] == P("mlp", "embed")
    assert params["network_1"]["proj"]["kernel"] == P(
        "conv_height", "conv_width", "conv_in", "embed"
    )
    assert params["network_0_0"]["attn"]["attn"]["kernel"] == P("embed", "heads")
    assert params["patch_embed"]["conv_1"]["scale"] == P("norm")
    assert axes["batch_stats"]["patch_embed"]["conv_1"]["mean"] == P("norm")


def test_a_parameter_without_axes_is_an_error():
    class Bare(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.initializers.ones, (x.shape[-1],))
            v = self.param("v", with_axes(nn.initializers.ones, "embed"), (x.shape[-1],))
            return x * w * v

    boxed = jax.eval_shape(Bare().init, jax.random.key(0), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"params/w \(3,\) has no logical axes"):
        axes_of(boxed)
    wrong = jax.eval_shape(
        lambda: {"params": {"k": nn.with_logical_partitioning(jnp.ones, ("a",))((2, 3))}}
    )
    with pytest.raises(ValueError, match="1 logical axes"):
        axes_of(wrong)
