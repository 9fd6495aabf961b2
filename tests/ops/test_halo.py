"""Halo attention equals timm's `HaloAttn` with converted weights (float32, CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from volo_jax.convert import torch_to_flax
from volo_jax.ops import TOKEN_MIXERS, HaloAttn, make_divisible, relative_logits

torch = pytest.importorskip("torch")

ATOL = 1e-4

CONFIGS = [
    # (dim, H, W, HaloAttn kwargs)
    (32, 16, 32, dict(num_heads=4, block_size=8, halo_size=3)),
    (32, 16, 16, dict(num_heads=4, block_size=8, halo_size=2, stride=2)),  # strided queries
    (24, 14, 14, dict(num_heads=2, block_size=7, halo_size=2, stride=2)),  # odd block: avg pool
    (32, 8, 16, dict(num_heads=2, block_size=4, halo_size=1, stride=2, avg_down=True)),
    (32, 12, 12, dict(num_heads=4, dim_head=8, block_size=6, halo_size=2, qkv_bias=True)),
    (32, 8, 8, dict(num_heads=4, block_size=4, halo_size=2, scale_pos_embed=True)),
    (32, 8, 8, dict(num_heads=2, block_size=4, halo_size=3, qk_ratio=0.5, dim_out=48)),
]


def _timm_halo(dim, kwargs, seed=0):
    from timm.layers.halo_attn import HaloAttn as TimmHaloAttn

    torch.manual_seed(seed)
    module = TimmHaloAttn(dim, **kwargs).eval()
    if kwargs.get("qkv_bias"):
        with torch.no_grad():
            module.q.bias.normal_()
            module.kv.bias.normal_()
    return module


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(c[3]))
def test_equals_timm(config):
    dim, height, width, kwargs = config
    ref = _timm_halo(dim, kwargs)
    layer = HaloAttn(dim, **kwargs)
    x = np.random.default_rng(0).standard_normal((2, height, width, dim)).astype(np.float32)
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    variables = torch_to_flax(state, layer, inputs=x)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    out = np.asarray(layer.apply(variables, x))
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() <= ATOL


def test_relative_logits_equal_timms_pos_embed():
    from timm.layers.halo_attn import PosEmbedRel as TimmPosEmbedRel

    block, win, d = 4, 8, 6
    torch.manual_seed(1)
    ref = TimmPosEmbedRel(block, win, d, scale=1.0)
    q = torch.randn(3, 5, block * block, d)
    with torch.no_grad():
        expected = ref(q).numpy()
    ours = relative_logits(
        jnp.asarray(q.numpy().reshape(3, 5, block, block, d)),
        jnp.asarray(ref.height_rel.detach().numpy()),
        jnp.asarray(ref.width_rel.detach().numpy()),
    )
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_make_divisible_matches_timm():
    from timm.layers import make_divisible as timm_make_divisible

    for v in (7, 8, 12, 30, 64, 100.5, 127, 256 * 0.25):
        assert make_divisible(v) == timm_make_divisible(v)


def test_token_mixer_on_volo_grids():
    """Block 7, halo 3 fits VOLO's 28 x 28 (stage 1) and 14 x 14 grids."""
    for size, dim, heads in ((28, 48, 2), (14, 64, 4)):
        mixer = TOKEN_MIXERS["halo"](dim, heads)
        x = jnp.ones((1, size, size, dim))
        out = jax.eval_shape(lambda m=mixer, x=x: m.apply(m.init(jax.random.key(0), x), x))
        assert out.shape == x.shape


def test_refuses_sizes_that_are_not_block_multiples():
    with pytest.raises(ValueError, match="block_size"):
        HaloAttn(16, num_heads=2, block_size=8).init(jax.random.key(0), jnp.ones((1, 12, 16, 16)))
