"""Swin window attention equals the attention part of timm's `SwinTransformerBlock`
(`_attn`: shift, pad, partition, `WindowAttention` with its mask, merge, unshift), with
converted weights; the helpers against direct constructions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from volo_jax.convert import torch_to_flax
from volo_jax.ops import (
    TOKEN_MIXERS,
    WindowAttention,
    relative_position_index,
    unfold,
    window_partition,
    window_reverse,
)

ATOL = 1e-4

CASES = [
    # (H, W, dim, heads, window, shift)
    (14, 14, 32, 4, 7, 0),
    (14, 14, 32, 4, 7, 3),  # Swin's shifted block
    (10, 13, 24, 3, 4, 2),  # padding to window multiples, with a shift
    (8, 8, 16, 2, 4, 1),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_equals_timm_swin_block_attention(case):
    torch = pytest.importorskip("torch")
    from timm.models.swin_transformer import SwinTransformerBlock

    height, width, dim, heads, window, shift = case
    torch.manual_seed(0)
    block = SwinTransformerBlock(
        dim, (height, width), num_heads=heads, window_size=window, shift_size=shift
    ).eval()
    assert block.window_size == (window, window) and block.shift_size == (shift, shift)
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(0, 1.0)
        block.attn.qkv.bias.normal_(0, 0.5)
    x = np.random.default_rng(0).standard_normal((2, height, width, dim)).astype(np.float32)
    layer = WindowAttention(dim, heads, window_size=window, shift_size=shift)
    state = {k: v.numpy() for k, v in block.attn.state_dict().items()}
    variables = torch_to_flax(state, layer, inputs=x)
    with torch.no_grad():
        expected = block._attn(torch.from_numpy(x)).numpy()
    out = np.asarray(layer.apply(variables, x))
    assert np.abs(out - expected).max() <= ATOL


def test_partition_is_unfold_with_stride_window():
    x = jax.random.normal(jax.random.key(0), (2, 12, 8, 5))
    windows = window_partition(x, 4)
    np.testing.assert_array_equal(windows, unfold(x, 4, stride=4))
    np.testing.assert_array_equal(window_reverse(windows, 4), x)


def test_relative_position_index_formula():
    m = 3
    index = relative_position_index(m)
    for a in range(m * m):
        for b in range(m * m):
            dy, dx = a // m - b // m, a % m - b % m
            assert index[a, b] == (dy + m - 1) * (2 * m - 1) + dx + m - 1


def test_token_mixer_on_volo_grid():
    mixer = TOKEN_MIXERS["window"](64, 4, shift_size=3)
    x = jnp.ones((1, 28, 28, 64))
    out = jax.eval_shape(lambda: mixer.apply(mixer.init(jax.random.key(0), x), x))
    assert out.shape == x.shape


def test_every_token_mixer_maps_volo_tokens_to_tokens():
    """(B, H, W, C) -> (B, H, W, C) on VOLO's 28 x 28 stage-1 grid, train and eval."""
    assert set(TOKEN_MIXERS) >= {"involution", "halo", "dwconv", "dynamic_dwconv", "window"}
    x = jnp.ones((2, 28, 28, 192))
    for name, factory in TOKEN_MIXERS.items():
        mixer = factory(192, 6)

        def run(mixer=mixer):
            variables = mixer.init(jax.random.key(0), x)
            rngs = {"dropout": jax.random.key(1)}
            out, _ = mixer.apply(variables, x, True, mutable=["batch_stats"], rngs=rngs)
            return out, mixer.apply(variables, x)

        train_out, eval_out = jax.eval_shape(run)
        assert train_out.shape == eval_out.shape == x.shape, name
