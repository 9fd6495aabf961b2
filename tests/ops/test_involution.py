"""Involution: the aggregation against a NumPy loop of the paper's formula, the layer
against a NumPy re-computation of its kernel generation and against a PyTorch module
written like the official one (converted weights), gradients of both implementations."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from volo_jax.convert import torch_to_flax
from volo_jax.ops import TOKEN_MIXERS, Involution, involution_aggregate


def _loop_involution(x, kernels, k, stride, padding, dilation):
    """y[b,i,j,g*Cg+c] = sum_{u,v} W[b,i,j,g,u*K+v] x[b, i*s+u*d-p, j*s+v*d-p, g*Cg+c]."""
    b, height, width, c = x.shape
    _, h, w, groups, _ = kernels.shape
    cg = c // groups
    out = np.zeros((b, h, w, c), np.float64)
    for i in range(h):
        for j in range(w):
            for u in range(k):
                for v in range(k):
                    r, q = i * stride + u * dilation - padding, j * stride + v * dilation - padding
                    if not (0 <= r < height and 0 <= q < width):
                        continue
                    weight = np.repeat(kernels[:, i, j, :, u * k + v], cg, axis=-1)  # (B, C)
                    out[:, i, j] += weight * x[:, r, q]
    return out


GEOMETRIES = [
    # (B, H, W, C, G, K, stride, dilation)
    (2, 8, 8, 8, 2, 3, 1, 1),
    (1, 8, 10, 16, 4, 7, 2, 1),  # RedNet's K = 7 with stride
    (1, 9, 9, 6, 3, 3, 1, 2),  # dilation, odd size
]


@pytest.mark.parametrize("impl", ["slices", "unfold"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_aggregate_equals_the_formula(impl, geometry):
    b, height, width, c, g, k, s, d = geometry
    p = d * (k - 1) // 2
    h, w = (height + 2 * p - d * (k - 1) - 1) // s + 1, (width + 2 * p - d * (k - 1) - 1) // s + 1
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, height, width, c)).astype(np.float32)
    kernels = rng.standard_normal((b, h, w, g, k * k)).astype(np.float32)
    out = involution_aggregate(jnp.asarray(x), jnp.asarray(kernels), k, s, p, d, impl=impl)
    np.testing.assert_allclose(out, _loop_involution(x, kernels, k, s, p, d), atol=1e-5)


def test_gradients_of_both_implementations_agree():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 8)), jnp.float32)
    kernels = jnp.asarray(rng.standard_normal((2, 4, 4, 2, 9)), jnp.float32)

    def grads(impl):
        def loss(x, kernels):
            return jnp.sum(jnp.sin(involution_aggregate(x, kernels, 3, 2, 1, impl=impl)))

        return jax.grad(loss, argnums=(0, 1))(x, kernels)

    for a, b in zip(grads("slices"), grads("unfold"), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _bn(x, p, s, eps=1e-5):
    return (x - s["mean"]) / np.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


@pytest.mark.parametrize("stride", [1, 2])
def test_layer_equals_numpy_kernel_generation(stride):
    """avg-pool -> 1x1 conv + BN + ReLU -> 1x1 conv (bias) -> kernels -> aggregation."""
    dim, k, g = 32, 7, 2
    layer = Involution(dim, k, stride)
    x = np.random.default_rng(2).standard_normal((2, 8, 8, dim)).astype(np.float32)
    variables = nn.unbox(layer.init(jax.random.key(0), x))
    # Non-trivial BatchNorm statistics.
    stats = jax.tree_util.tree_map(lambda a: a + 0.3, variables["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": stats}
    out = np.asarray(layer.apply(variables, x))
    assert layer.num_groups == g and out.shape == (2, 8 // stride, 8 // stride, dim)

    params, stats = variables["params"], variables["batch_stats"]
    pooled = x.reshape(2, 8 // stride, stride, 8 // stride, stride, dim).mean(axis=(2, 4))
    hidden = pooled @ np.asarray(params["conv1"]["conv"]["kernel"])[0, 0]
    hidden = np.maximum(_bn(hidden, params["conv1"]["bn"], stats["conv1"]["bn"]), 0)
    conv2 = params["conv2"]["conv"]
    kernels = hidden @ np.asarray(conv2["kernel"])[0, 0] + np.asarray(conv2["bias"])
    kernels = kernels.reshape(*kernels.shape[:3], g, k * k)
    np.testing.assert_allclose(out, _loop_involution(x, kernels, k, stride, 3, 1), atol=1e-4)


def test_layer_equals_official_style_torch_module():
    """A PyTorch involution written as the official RedNet one (ConvModule names,
    nn.Unfold on the full-resolution input, kernels from the pooled input)."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class TorchInvolution(nn.Module):
        def __init__(self, channels, kernel_size, stride):
            super().__init__()
            self.k, self.s, self.g = kernel_size, stride, channels // 16
            self.conv1 = nn.Sequential()
            self.conv1.add_module("conv", nn.Conv2d(channels, channels // 4, 1, bias=False))
            self.conv1.add_module("bn", nn.BatchNorm2d(channels // 4))
            self.conv1.add_module("act", nn.ReLU())
            self.conv2 = nn.Sequential()
            self.conv2.add_module("conv", nn.Conv2d(channels // 4, kernel_size**2 * self.g, 1))
            self.pool = nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity()
            self.unfold = nn.Unfold(kernel_size, 1, (kernel_size - 1) // 2, stride)

        def forward(self, x):
            weight = self.conv2(self.conv1(self.pool(x)))
            b, _, h, w = weight.shape
            weight = weight.view(b, self.g, self.k**2, h, w).unsqueeze(2)
            cols = self.unfold(x).view(b, self.g, -1, self.k**2, h, w)
            return (weight * cols).sum(dim=3).view(b, -1, h, w)

    torch.manual_seed(0)
    ref = TorchInvolution(64, 7, 2).eval()
    with torch.no_grad():
        ref.conv1.bn.running_mean.normal_(0, 0.1)
        ref.conv1.bn.running_var.uniform_(0.5, 1.5)
        ref.conv1.bn.weight.normal_(1, 0.1)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    x = np.random.default_rng(3).standard_normal((2, 12, 12, 64)).astype(np.float32)
    layer = Involution(64, 7, 2)
    variables = torch_to_flax(state, layer, inputs=x)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(layer.apply(variables, x), expected, atol=1e-4)


def test_token_mixer_keeps_the_shape_and_trains():
    mixer = TOKEN_MIXERS["involution"](48, 3)
    x = jnp.ones((2, 14, 14, 48))
    variables = nn.unbox(mixer.init(jax.random.key(0), x))
    out, updates = mixer.apply(variables, x, train=True, mutable=["batch_stats"])
    assert out.shape == x.shape and "batch_stats" in updates
    assert mixer.num_groups == 3


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="groups"):
        Involution(30, 3, groups=4).init(jax.random.key(0), jnp.ones((1, 4, 4, 30)))
    with pytest.raises(ValueError, match="stride"):
        Involution(16, 3, 2).init(jax.random.key(0), jnp.ones((1, 5, 5, 16)))
