"""RedNet: parameter counts of the official README, module names of the official
checkpoints, forward / train behaviour."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from volo_jax.convert.mapping import abstract_variables, flax_to_torch, torch_shapes
from volo_jax.models import create_model, list_models, pretrained_cfg

#: Our exact counts, and the d-li14/involution README's "Params(M)" (2 decimals).
PARAM_COUNTS = {
    "rednet26": (9_233_166, 9.23),
    "rednet38": (12_386_986, 12.39),
    "rednet50": (15_540_806, 15.54),
}


def _param_count(model) -> int:
    params = abstract_variables(model)["params"]
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_count_matches_the_official_readme(name):
    exact, readme = PARAM_COUNTS[name]
    count = _param_count(create_model(name))
    assert count == exact
    assert round(count / 1e6, 2) == readme


def test_registered_with_imagenet_config():
    assert list_models("rednet*") == ["rednet26", "rednet38", "rednet50"]
    cfg = pretrained_cfg("rednet50")
    assert cfg.input_size == (3, 224, 224) and cfg.num_classes == 1000


def test_names_are_the_official_checkpoint_names():
    shapes = torch_shapes(create_model("rednet26"))
    expected = {
        "backbone.stem.0.conv.weight": (32, 3, 3, 3),
        "backbone.stem.0.bn.running_var": (32,),
        "backbone.stem.1.conv1.conv.weight": (8, 32, 1, 1),
        "backbone.stem.1.conv1.bn.weight": (8,),
        "backbone.stem.1.conv2.conv.weight": (18, 8, 1, 1),
        "backbone.stem.1.conv2.conv.bias": (18,),
        "backbone.stem.2.weight": (32,),
        "backbone.stem.4.conv.weight": (64, 32, 3, 3),
        "backbone.layer1.0.conv1.weight": (64, 64, 1, 1),
        "backbone.layer1.0.bn1.running_mean": (64,),
        "backbone.layer1.0.conv2.conv2.conv.weight": (49 * 4, 16, 1, 1),
        "backbone.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "backbone.layer1.0.downsample.1.bias": (256,),
        "backbone.layer3.3.conv3.weight": (1024, 256, 1, 1),
        "backbone.layer4.0.conv2.conv1.conv.weight": (128, 512, 1, 1),
        "head.fc.weight": (1000, 2048),
        "head.fc.bias": (1000,),
    }
    for name, shape in expected.items():
        assert shapes[name] == shape, name
    assert not any(n.startswith("backbone.layer3.4") for n in shapes)  # 4 blocks in stage 3


def test_forward_train_and_round_trip():
    from volo_jax.convert import torch_to_flax

    model = create_model("rednet26", num_classes=10, img_size=32, depths=(1, 1, 1, 1))
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(1), x))
    train_step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    logits, updates = train_step(variables, x)
    assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()
    assert set(updates) == {"batch_stats"}
    # Every variable has a distinct torch name, and the converter takes them back.
    back = torch_to_flax(flax_to_torch(variables), model)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, jax.device_get(variables))
    features = jax.eval_shape(lambda: model.apply(variables, x, method=model.forward_features))
    assert features.shape == (2, 1, 1, 2048)


def test_bfloat16_compute():
    model = create_model("rednet26", num_classes=5, img_size=32, dtype=jnp.bfloat16)
    x = jnp.ones((1, 32, 32, 3))
    out = jax.eval_shape(lambda: model.apply(model.init(jax.random.key(0), x), x))
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 5)
