"""Depth-wise and dynamic depth-wise convolution against NumPy loops of their formulas;
DWNet's block against a PyTorch module written like the official one."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from volo_jax.convert import torch_to_flax
from volo_jax.layers import ConvNormAct, conv2d
from volo_jax.ops import TOKEN_MIXERS, DWBlock, DynamicDWConv, dynamic_depthwise_conv


def _loop_depthwise(x, kernels, bias, k, stride, padding):
    """out[b,i,j,c] = bias[c] + sum_{u,v} kernels[b,u*K+v,c] x[b, i*s+u-p, j*s+v-p, c]."""
    b, height, width, c = x.shape
    h, w = (height + 2 * padding - k) // stride + 1, (width + 2 * padding - k) // stride + 1
    out = np.zeros((b, h, w, c)) + bias
    for i in range(h):
        for j in range(w):
            for u in range(k):
                for v in range(k):
                    r, q = i * stride + u - padding, j * stride + v - padding
                    if 0 <= r < height and 0 <= q < width:
                        out[:, i, j] += kernels[:, u * k + v] * x[:, r, q]
    return out


def test_static_depthwise_conv_equals_the_formula():
    c, k = 6, 5
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 7, c)).astype(np.float32)
    conv = conv2d(c, k, groups=c, use_bias=True)
    params = nn.unbox(conv.init(jax.random.key(0), x))
    params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # a non-zero bias
    kernel = np.asarray(params["params"]["kernel"])  # (K, K, 1, C)
    expected = _loop_depthwise(
        x,
        np.broadcast_to(kernel.reshape(1, k * k, c), (2, k * k, c)),
        np.asarray(params["params"]["bias"]),
        k,
        1,
        k // 2,
    )
    np.testing.assert_allclose(conv.apply(params, x), expected, atol=1e-5)


@pytest.mark.parametrize("impl", ["slices", "unfold"])
@pytest.mark.parametrize("geometry", [(7, 1, 3), (3, 2, 1), (5, 1, 0)])
def test_dynamic_depthwise_equals_the_formula(impl, geometry):
    k, s, p = geometry
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 9, 10, 4)).astype(np.float32)
    kernels = rng.standard_normal((3, k * k, 4)).astype(np.float32)
    out = dynamic_depthwise_conv(jnp.asarray(x), jnp.asarray(kernels), k, s, p, impl=impl)
    np.testing.assert_allclose(out, _loop_depthwise(x, kernels, 0.0, k, s, p), atol=1e-5)


def test_dynamic_depthwise_gradients_of_both_implementations_agree():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
    kernels = jnp.asarray(rng.standard_normal((2, 9, 3)), jnp.float32)

    def grads(impl):
        def loss(x, kernels):
            return jnp.sum(jnp.sin(dynamic_depthwise_conv(x, kernels, 3, 1, 1, impl=impl)))

        return jax.grad(loss, argnums=(0, 1))(x, kernels)

    for a, b in zip(grads("slices"), grads("unfold"), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_dynamic_dwconv_layer_equals_numpy():
    """GAP -> 1x1 conv C -> C/4 -> BN -> ReLU -> 1x1 conv -> C*K*K, kernel per channel."""
    c, k = 8, 3
    x = np.random.default_rng(3).standard_normal((2, 6, 6, c)).astype(np.float32)
    layer = DynamicDWConv(c, k)
    variables = nn.unbox(layer.init(jax.random.key(0), x))
    variables = jax.tree_util.tree_map(lambda a: a + 0.2, variables)  # BN stats, bias != 0
    params, stats = variables["params"], variables["batch_stats"]
    hidden = x.mean(axis=(1, 2)) @ np.asarray(params["conv1"]["kernel"])[0, 0]
    bn_p, bn_s = params["bn"], stats["bn"]
    hidden = (hidden - bn_s["mean"]) / np.sqrt(bn_s["var"] + 1e-5) * bn_p["scale"] + bn_p["bias"]
    hidden = np.maximum(hidden, 0)
    w = hidden @ np.asarray(params["conv2"]["kernel"])[0, 0] + np.asarray(params["conv2"]["bias"])
    kernels = w.reshape(2, c, k * k).transpose(0, 2, 1)  # conv2 channel = c * K*K + offset
    expected = _loop_depthwise(x, kernels, np.asarray(params["bias"]), k, 1, k // 2)
    np.testing.assert_allclose(layer.apply(variables, x), expected, atol=1e-4)


def _torch_dwblock(dim, k, dynamic):
    """DWNet's DWBlock (and DynamicDWConv) as modules with the official names."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class TorchDynamicDWConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(dim, dim // 4, 1, bias=False)
            self.bn = nn.BatchNorm2d(dim // 4)
            self.conv2 = nn.Conv2d(dim // 4, dim * k * k, 1)
            self.bias = nn.Parameter(torch.randn(dim))

        def forward(self, x):
            b, c, h, w = x.shape
            pooled = x.mean(dim=(2, 3), keepdim=True)
            weight = self.conv2(torch.relu(self.bn(self.conv1(pooled)))).view(b * c, 1, k, k)
            out = nn.functional.conv2d(
                x.reshape(1, -1, h, w), weight, self.bias.repeat(b), padding=k // 2, groups=b * c
            )
            return out.view(b, c, h, w)

    block = nn.Module()
    block.conv0 = nn.Conv2d(dim, dim, 1, bias=False)
    block.bn0 = nn.BatchNorm2d(dim)
    if dynamic:
        block.conv = TorchDynamicDWConv()
    else:
        block.conv = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
    block.bn = nn.BatchNorm2d(dim)
    block.conv2 = nn.Conv2d(dim, dim, 1, bias=False)
    block.bn2 = nn.BatchNorm2d(dim)

    def forward(x):
        x = torch.relu(block.bn0(block.conv0(x)))
        x = torch.relu(block.bn(block.conv(x)))
        return block.bn2(block.conv2(x))

    torch.manual_seed(0)
    with torch.no_grad():
        for name, buf in block.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
        for module in block.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return block.eval(), forward


@pytest.mark.parametrize("dynamic", [False, True])
def test_dwblock_equals_official_style_torch_block(dynamic):
    torch = pytest.importorskip("torch")
    dim, k = 16, 7
    block, forward = _torch_dwblock(dim, k, dynamic)
    x = np.random.default_rng(4).standard_normal((2, 10, 9, dim)).astype(np.float32)
    layer = DWBlock(dim, kernel_size=k, dynamic=dynamic)
    state = {n: v.detach().numpy() for n, v in block.state_dict().items()}
    variables = torch_to_flax(state, layer, inputs=x)
    with torch.no_grad():
        expected = forward(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(layer.apply(variables, x), expected, atol=1e-4)


@pytest.mark.parametrize("name", ["dwconv", "dynamic_dwconv"])
def test_token_mixers_keep_the_shape_and_update_bn_stats(name):
    mixer = TOKEN_MIXERS[name](32, 4)
    x = jax.random.normal(jax.random.key(0), (2, 14, 14, 32))
    variables = nn.unbox(mixer.init(jax.random.key(1), x))
    out, updates = mixer.apply(variables, x, train=True, mutable=["batch_stats"])
    assert out.shape == x.shape
    changed = jax.tree_util.tree_map(
        lambda a, b: bool(np.any(a != b)), updates["batch_stats"], variables["batch_stats"]
    )
    assert all(jax.tree_util.tree_leaves(changed))


def test_conv_norm_act_names_and_bias_rule():
    x = jnp.ones((1, 8, 8, 3))
    with_norm = nn.unbox(ConvNormAct(4, 3, 2).init(jax.random.key(0), x))
    assert set(with_norm["params"]) == {"conv", "bn"} and "bias" not in with_norm["params"]["conv"]
    without = nn.unbox(ConvNormAct(4, 1, norm=False, act=None).init(jax.random.key(0), x))
    assert set(without["params"]["conv"]) == {"kernel", "bias"} and "batch_stats" not in without
