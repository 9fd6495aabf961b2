"""Same weights in, same logits out: halonet26t / halonet50ts against timm's ByobNet
(float32, CPU), random weights with randomized BatchNorm statistics."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support import timm_pairs
from volo_jax.convert import torch_to_flax
from volo_jax.convert.mapping import abstract_variables
from volo_jax.models import create_model, list_models, pretrained_cfg

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

ATOL = 1e-4
NAMES = ["halonet26t", "halonet50ts"]


def _pair(name: str, width_factor: float = 1.0, num_classes: int = 1000):
    """timm's model (width scaled by timm's own `width_factor`) and ours to match."""
    torch.manual_seed(0)
    ref = timm.create_model(name, width_factor=width_factor, num_classes=num_classes).eval()
    timm_pairs.randomize_(ref)
    with torch.no_grad():  # BN scales well away from timm's zero-init of the last ones
        for module in ref.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.4, 1.0)
        ref.head.fc.weight.normal_(0, 0.3)  # logits of order 1-10
    overrides = dict(num_classes=num_classes)
    if width_factor != 1.0:
        overrides.update(
            stage_channels=tuple(int(c * width_factor) for c in (256, 512, 1024, 2048)),
            stem_chs=int(64 * width_factor),
        )
    model = create_model(name, **overrides)
    return ref, model


def _check(name: str, width_factor: float, batch: int) -> None:
    ref, model = _pair(name, width_factor, num_classes=17)
    variables = torch_to_flax(timm_pairs.state_dict_numpy(ref), model, model_name=name)
    x = np.random.default_rng(0).standard_normal((batch, 256, 256, 3)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    logits = np.asarray(jax.jit(model.apply)(variables, x))
    assert np.abs(expected).max() > 0.5  # a non-trivial comparison
    assert np.abs(logits - expected).max() <= ATOL


@pytest.mark.parametrize("name", NAMES)
def test_shrunk_structure_matches_timm(name):
    """Every block type, stride and halo setting of the model, widths / 4, at 256 px."""
    _check(name, width_factor=0.25, batch=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_full_model_matches_timm(name):
    _check(name, width_factor=1.0, batch=1)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_and_names_equal_timms(name):
    ref = timm.create_model(name)
    variables = abstract_variables(create_model(name))
    ours = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables["params"]))
    assert ours == sum(p.numel() for p in ref.parameters())
    assert ours == {"halonet26t": 12_480_288, "halonet50ts": 22_733_280}[name]
    from volo_jax.convert.mapping import torch_shapes

    expected = {
        k: tuple(v.shape)
        for k, v in ref.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert torch_shapes(create_model(name)) == expected


def test_registered_with_timms_pretrained_config():
    assert set(NAMES) <= set(list_models("halonet*"))
    for name in NAMES:
        ours = pretrained_cfg(name)
        ref = timm.create_model(name, pretrained=False).pretrained_cfg
        assert ours.input_size == tuple(ref["input_size"])
        assert ours.crop_pct == ref["crop_pct"]
        assert ours.interpolation == ref["interpolation"]
        assert ours.mean == tuple(ref["mean"]) and ours.std == tuple(ref["std"])
        assert ours.url == ref["url"]
        assert ours.hf_hub_id == ref["hf_hub_id"]


def test_train_mode_traces_with_batch_stats_and_drop_path():
    model = create_model("halonet50ts", num_classes=3, drop_path_rate=0.1, drop_rate=0.2)
    x = jax.ShapeDtypeStruct((2, 256, 256, 3), np.float32)

    def train_step():
        variables = nn.unbox(model.init(jax.random.key(0), jnp.zeros(x.shape)))
        rngs = {"dropout": jax.random.key(1)}
        return model.apply(variables, jnp.zeros(x.shape), True, mutable=["batch_stats"], rngs=rngs)

    logits, updates = jax.eval_shape(train_step)
    assert logits.shape == (2, 3) and set(updates) == {"batch_stats"}
