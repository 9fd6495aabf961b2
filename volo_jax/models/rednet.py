"""RedNet (Li et al., "Involution", CVPR 2021): ResNet with the 3x3 convs of the
bottlenecks and of the stem replaced by involution (official code: github
d-li14/involution, `cls/mmcls/models/backbones/rednet.py`).

Module names are those of the official mmcls checkpoints (`backbone.stem.1.conv1.conv`,
`backbone.layer3.0.conv2.conv2.conv`, `backbone.layer1.0.downsample.0`, `head.fc`), so
`torch_to_flax` converts their `state_dict` directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from volo_jax.layers import ClassifierHead, ConvNormAct, batch_norm, conv2d
from volo_jax.ops.involution import Involution

Dtype = Any

#: Blocks a stage, by depth (the official `arch_settings`).
REDNET_DEPTHS = {
    26: (1, 2, 4, 1),
    38: (2, 3, 5, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


class RedBottleneck(nn.Module):
    """1x1 conv -> BN -> ReLU -> 7x7 involution (stride) -> BN -> ReLU -> 1x1 conv -> BN,
    plus the (1x1 conv + BN where the shape changes) shortcut, ReLU.

    Input (B, H, W, C_in) -> (B, H / stride, W / stride, out_chs).
    """

    out_chs: int
    stride: int = 1
    expansion: int = 4
    kernel_size: int = 7
    impl: str = "slices"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        mid = self.out_chs // self.expansion
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.out_chs:
            shortcut = conv2d(self.out_chs, 1, self.stride, name="downsample_0", **dt)(x)
            shortcut = batch_norm(train, "downsample_1", **dt)(shortcut)
        y = conv2d(mid, 1, name="conv1", **dt)(x)
        y = nn.relu(batch_norm(train, "bn1", **dt)(y))
        y = Involution(mid, self.kernel_size, self.stride, impl=self.impl, name="conv2", **dt)(
            y, train
        )
        y = nn.relu(batch_norm(train, "bn2", **dt)(y))
        y = conv2d(self.out_chs, 1, name="conv3", **dt)(y)
        y = batch_norm(train, "bn3", **dt)(y)
        return nn.relu(y + shortcut)


class RedNetBackbone(nn.Module):
    """Stem (3x3/2 conv, 3x3 involution, BN, ReLU, 3x3 conv, 3x3/2 max pool) and four
    stages of `RedBottleneck`s. (B, H, W, 3) -> (B, H/32, W/32, 2048)."""

    depths: Sequence[int]
    stem_channels: int = 64
    base_channels: int = 64
    expansion: int = 4
    strides: Sequence[int] = (1, 2, 2, 2)
    impl: str = "slices"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        half = self.stem_channels // 2
        x = ConvNormAct(half, 3, 2, name="stem_0", **dt)(x, train)
        x = Involution(half, 3, 1, impl=self.impl, name="stem_1", **dt)(x, train)
        x = nn.relu(batch_norm(train, "stem_2", **dt)(x))
        x = ConvNormAct(self.stem_channels, 3, 1, name="stem_4", **dt)(x, train)
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        out_chs = self.base_channels * self.expansion
        for i, depth in enumerate(self.depths):
            for j in range(depth):
                x = RedBottleneck(
                    out_chs,
                    self.strides[i] if j == 0 else 1,
                    self.expansion,
                    impl=self.impl,
                    name=f"layer{i + 1}_{j}",
                    **dt,
                )(x, train)
            out_chs *= 2
        return x


class RedNet(nn.Module):
    """RedNet classifier: `backbone` (`RedNetBackbone`), global average pool, `head.fc`.

    Input (B, H, W, in_chans), H and W multiples of 32 -> (B, num_classes).
    """

    depths: Sequence[int] = REDNET_DEPTHS[50]
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    stem_channels: int = 64
    base_channels: int = 64
    drop_rate: float = 0.0
    impl: str = "slices"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @property
    def block_counts(self) -> tuple[int, ...]:
        """Blocks per stage, as a checkpoint numbers them: the converter's cheap
        fingerprint (`convert.mapping.identify_model`)."""
        return tuple(self.depths)

    @property
    def widths(self) -> tuple[int, ...]:
        """Output channels of the stages (bottleneck expansion 4, doubling a stage): with
        `block_counts`, the converter's cheap fingerprint."""
        return tuple(self.base_channels * 4 * 2**i for i in range(len(self.depths)))

    def setup(self) -> None:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        self.backbone = RedNetBackbone(
            tuple(self.depths), self.stem_channels, self.base_channels, impl=self.impl, **dt
        )
        self.head = ClassifierHead(self.num_classes, self.drop_rate, **dt)

    def forward_features(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Images (B, H, W, C) -> final feature map (B, H/32, W/32, 2048)."""
        return self.backbone(x, train)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return self.head(self.backbone(x, train), train)


def _register_variants() -> None:
    from volo_jax.models.registry import PretrainedCfg, register_model

    # mmcls evaluation: resize 256, centre crop 224, bilinear; ImageNet mean / std.
    # The official weights are on OneDrive (links in the d-li14/involution README).
    cfg = PretrainedCfg(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bilinear")
    for depth in (26, 38, 50):
        register_model(f"rednet{depth}", RedNet, cfg, depths=REDNET_DEPTHS[depth])


_register_variants()
