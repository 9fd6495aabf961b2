"""HaloNet as timm builds it (`timm/models/byoanet.py` configs on `byobnet.ByobNet`):
`halonet26t` and `halonet50ts`.

Only the ByobNet pieces these two models use are ported: the tiered 3-conv stem with
max pool, stages of ResNet bottleneck blocks and self-attention blocks (1x1 conv ->
`HaloAttn` -> BN + act -> 1x1 conv), 1x1 conv shortcuts, average pool and a linear
head. Module names are timm's (`stem.conv1.conv`, `stages.2.1.self_attn.kv`,
`head.fc`, ...), so `torch_to_flax` converts timm's state dicts directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from volo_jax.layers import ClassifierHead, ConvNormAct, DropPath, batch_norm, get_act
from volo_jax.ops.halo import HaloAttn, make_divisible

Dtype = Any


class TieredStem(nn.Module):
    """timm's 'tiered' stem: 3x3 convs to 3c/8 (stride 2), c/2, c, then 3x3/2 max pool
    (or, without the pool, the third conv strided). (B, H, W, 3) -> (B, H/4, W/4, c)."""

    out_chs: int
    pool: str = "maxpool"
    act: str = "relu"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        chs = (3 * self.out_chs // 8, self.out_chs // 2, self.out_chs)
        strides = (2, 1, 1 if self.pool else 2)
        for i, (c, s) in enumerate(zip(chs, strides, strict=True)):
            x = ConvNormAct(c, 3, s, act=self.act, name=f"conv{i + 1}", **dt)(x, train)
        if self.pool == "maxpool":
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        elif self.pool:
            raise ValueError(f"TieredStem: pool must be 'maxpool' or '', got {self.pool!r}")
        return x


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 bottleneck with a 1x1 conv shortcut where the shape
    changes (timm `BottleneckBlock`). (B, H, W, C_in) -> (B, H/s, W/s, out_chs)."""

    out_chs: int
    stride: int = 1
    bottle_ratio: float = 0.25
    act: str = "relu"
    drop_path: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        mid = make_divisible(self.out_chs * self.bottle_ratio)
        shortcut = _shortcut(x, self.out_chs, self.stride, train, dt)
        x = ConvNormAct(mid, 1, act=self.act, name="conv1_1x1", **dt)(x, train)
        x = ConvNormAct(mid, 3, self.stride, act=self.act, name="conv2_kxk", **dt)(x, train)
        x = ConvNormAct(self.out_chs, 1, act=None, name="conv3_1x1", **dt)(x, train)
        x = DropPath(self.drop_path, name="drop_path")(x, train)
        return get_act(self.act, self.platform)(x + shortcut)


class SelfAttnBlock(nn.Module):
    """1x1 conv -> halo attention (stride) -> BN + act -> 1x1 conv, with the bottleneck's
    shortcut (timm `SelfAttnBlock`). (B, H, W, C_in) -> (B, H/s, W/s, out_chs).

    `halo` is (block_size, halo_size, num_heads).
    """

    out_chs: int
    halo: Sequence[int]
    stride: int = 1
    bottle_ratio: float = 0.25
    act: str = "relu"
    drop_path: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        mid = make_divisible(self.out_chs * self.bottle_ratio)
        block_size, halo_size, num_heads = self.halo
        shortcut = _shortcut(x, self.out_chs, self.stride, train, dt)
        x = ConvNormAct(mid, 1, act=self.act, name="conv1_1x1", **dt)(x, train)
        x = HaloAttn(
            mid,
            stride=self.stride,
            num_heads=num_heads,
            block_size=block_size,
            halo_size=halo_size,
            name="self_attn",
            **dt,
        )(x)
        x = get_act(self.act, self.platform)(batch_norm(train, "post_attn", **dt)(x))
        x = ConvNormAct(self.out_chs, 1, act=None, name="conv3_1x1", **dt)(x, train)
        x = DropPath(self.drop_path, name="drop_path")(x, train)
        return get_act(self.act, self.platform)(x + shortcut)


def _shortcut(x: jax.Array, out_chs: int, stride: int, train: bool, dt: dict) -> jax.Array:
    """timm's 'conv1x1' downsample: 1x1 conv (stride) + BN where the shape changes.

    Created inside the calling block's compact scope, so it is named `shortcut` there.
    """
    if x.shape[-1] == out_chs and stride == 1:
        return x
    return ConvNormAct(out_chs, 1, stride, act=None, name="shortcut", **dt)(x, train)


class HaloNet(nn.Module):
    """A ResNet-like ByobNet with halo-attention blocks (timm's halonet configs).

    Attributes:
      stage_blocks: per stage, the block types in order, 'bottle' or 'self_attn'.
      stage_channels: output channels of each stage; stage_strides their first stride.
      halo_cfgs: per stage, (block_size, halo_size, num_heads) of its attention blocks.
      stem_chs: stem output channels (tiered stem: 3c/8, c/2, c).
      act: 'relu' or 'silu', everywhere (stem, blocks, post-attention norm).
    Input (B, H, W, in_chans) -> (B, num_classes). Every attention block's input map
    must be a multiple of its block size: for halonet26t / halonet50ts (block 8, last
    attention block at stride 32) H and W must be multiples of 256.
    """

    stage_blocks: Sequence[Sequence[str]]
    halo_cfgs: Sequence[Sequence[int]]
    img_size: int = 256
    in_chans: int = 3
    num_classes: int = 1000
    stage_channels: Sequence[int] = (256, 512, 1024, 2048)
    stage_strides: Sequence[int] = (1, 2, 2, 2)
    bottle_ratio: float = 0.25
    stem_chs: int = 64
    stem_pool: str = "maxpool"
    act: str = "relu"
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @property
    def block_counts(self) -> tuple[int, ...]:
        """Blocks per stage, as a checkpoint numbers them: the converter's cheap
        fingerprint (`convert.mapping.identify_model`)."""
        return tuple(len(blocks) for blocks in self.stage_blocks)

    @property
    def widths(self) -> tuple[int, ...]:
        """Output channels of the stages: with `block_counts`, the converter's cheap fingerprint."""
        return tuple(self.stage_channels)

    def setup(self) -> None:
        n = len(self.stage_blocks)
        for field in ("halo_cfgs", "stage_channels", "stage_strides"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"HaloNet: {field} needs one entry per stage ({n})")
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        self.stem = TieredStem(self.stem_chs, self.stem_pool, self.act, **dt)
        depths = [len(b) for b in self.stage_blocks]
        rates = np.split(np.linspace(0.0, self.drop_path_rate, sum(depths)), np.cumsum(depths)[:-1])
        stages = []
        for i, kinds in enumerate(self.stage_blocks):
            blocks = []
            for j, kind in enumerate(kinds):
                common = dict(
                    out_chs=self.stage_channels[i],
                    stride=self.stage_strides[i] if j == 0 else 1,
                    bottle_ratio=self.bottle_ratio,
                    act=self.act,
                    drop_path=float(rates[i][j]),
                    **dt,
                )
                if kind == "bottle":
                    blocks.append(BottleneckBlock(**common))
                elif kind == "self_attn":
                    blocks.append(SelfAttnBlock(halo=tuple(self.halo_cfgs[i]), **common))
                else:
                    raise ValueError(f"HaloNet: unknown block type {kind!r}")
            stages.append(blocks)
        self.stages = stages
        self.head = ClassifierHead(self.num_classes, self.drop_rate, **dt)

    def forward_features(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Images (B, H, W, C) -> final feature map (B, H/32, W/32, stage_channels[-1])."""
        x = self.stem(x, train)
        for stage in self.stages:
            for block in stage:
                x = block(x, train)
        return x

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.head(self.forward_features(x, train), train)


#: timm's block layouts: `interleave_blocks(('bottle', 'self_attn'), d, every)`.
HALONET26T = dict(
    stage_blocks=(
        ("bottle", "bottle"),
        ("bottle", "bottle"),
        ("bottle", "self_attn"),
        ("self_attn", "self_attn"),
    ),
    halo_cfgs=((8, 2, 8),) * 4,
    act="relu",
)
HALONET50TS = dict(
    stage_blocks=(
        ("bottle",) * 3,
        ("bottle", "bottle", "bottle", "self_attn"),
        ("bottle", "self_attn") * 3,
        ("bottle", "self_attn", "bottle"),
    ),
    halo_cfgs=((8, 3, 8), (8, 3, 4), (8, 3, 8), (8, 3, 8)),
    act="silu",
)


def _register_variants() -> None:
    from volo_jax.models.registry import PretrainedCfg, register_model

    base = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-attn-weights/"
    variants = [
        ("halonet26t", HALONET26T, 0.95, "halonet26t_a1h_256-3083328c.pth", "a1h_in1k"),
        ("halonet50ts", HALONET50TS, 0.94, "halonet50ts_a1h2_256-f3a3daee.pth", "a1h_in1k"),
    ]
    for name, arch, crop_pct, release, tag in variants:
        cfg = PretrainedCfg(
            input_size=(3, 256, 256),
            crop_pct=crop_pct,
            interpolation="bicubic",
            url=base + release,
            hf_hub_id=f"timm/{name}.{tag}",
        )
        register_model(name, HaloNet, cfg, **arch)


_register_variants()
