"""VOLO: Vision Outlooker (Yuan et al., arXiv 2106.13112), as timm's `VOLO`.

NHWC images in, logits out. Module and parameter names mirror timm's so that a
checkpoint converts name by name (`network.0.1.attn.v.weight` is
`network_0_1/attn/v/kernel` here). Stage 1 is a stack of Outlookers on the 1/8
grid, a strided-conv Downsample to the 1/16 grid follows, then Transformer
blocks, then class-attention blocks on a class token, a final LayerNorm, the class
head on the class token and an aux head on every patch token (token labeling).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from volo_jax.layers import (
    DropPath,
    Mlp,
    TorchLayerNorm,
    batch_norm,
    conv2d,
    dense,
    patchify,
    with_axes,
)
from volo_jax.ops import TOKEN_MIXERS
from volo_jax.ops.attention import Attention, dot_product_attention

Dtype = Any

#: `VOLO` fields that timm's VOLO does not take: execution choices and the mixer ablation.
JAX_ONLY_FIELDS = (
    "remat",
    "outlook_impl",
    "attention_impl",
    "token_mixer",
    "token_mixer_kwargs",
    "dtype",
    "param_dtype",
    "platform",
)

#: Token mixers the outlooker stage can use (`VOLO(token_mixer=...)`): `TOKEN_MIXERS`.
MIXER_NAMES = tuple(TOKEN_MIXERS)


class PatchEmbed(nn.Module):
    """Conv stem (7x7/s, 3x3, 3x3, each + BatchNorm + ReLU) and a patch projection.

    Input (B, H, W, in_chans) -> (B, H / patch_size, W / patch_size, embed_dim).
    """

    hidden_dim: int
    embed_dim: int
    patch_size: int = 8
    stem_stride: int = 2
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        # Names follow the torch Sequential: conv.0, conv.1 (BN), conv.2 (ReLU), ...; the
        # convolutions keep flax's default init (timm leaves PyTorch's).
        conv = dict(kernel_init=nn.linear.default_kernel_init, **dt)
        x = conv2d(self.hidden_dim, 7, self.stem_stride, 3, name="conv_0", **conv)(x)
        x = nn.relu(batch_norm(train, "conv_1", **dt)(x))
        x = conv2d(self.hidden_dim, 3, 1, 1, name="conv_3", **conv)(x)
        x = nn.relu(batch_norm(train, "conv_4", **dt)(x))
        x = conv2d(self.hidden_dim, 3, 1, 1, name="conv_6", **conv)(x)
        x = nn.relu(batch_norm(train, "conv_7", **dt)(x))
        k = self.patch_size // self.stem_stride
        return patchify(
            self.embed_dim, k, self.dtype, self.param_dtype, name="proj", platform=self.platform
        )(x)


class Downsample(nn.Module):
    """Patch merging by a strided conv. (B, H, W, C) -> (B, H / p, W / p, out_dim)."""

    out_dim: int
    patch_size: int = 2
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return patchify(
            self.out_dim,
            self.patch_size,
            self.dtype,
            self.param_dtype,
            name="proj",
            platform=self.platform,
        )(x)


def _mixer_mlp_residuals(block: Any, mixer: nn.Module, x: jax.Array, train: bool) -> jax.Array:
    """`x + DP(mixer(LN(x)))`, then `x + DP(MLP(LN(x)))`, with timm's names (norm1,
    norm2, mlp, drop_path1/2), called from `block`'s compact `__call__`. `block`
    supplies dim, mlp_ratio, drop_path, dtype, param_dtype and platform."""
    dt = dict(dtype=block.dtype, param_dtype=block.param_dtype, platform=block.platform)
    y = mixer(TorchLayerNorm(name="norm1", **dt)(x), train)
    x = x + DropPath(block.drop_path, name="drop_path1")(y, train)
    y = Mlp(int(block.dim * block.mlp_ratio), name="mlp", **dt)(
        TorchLayerNorm(name="norm2", **dt)(x), train
    )
    return x + DropPath(block.drop_path, name="drop_path2")(y, train)


class Outlooker(nn.Module):
    """Pre-norm token-mixer block + MLP block. (B, H, W, C) -> (B, H, W, C).

    The mixer, named 'attn', is `TOKEN_MIXERS[token_mixer]`: outlook attention, or for
    the ablation of the VOLO paper and "Demystifying Local ViT" any other local operator
    or global self-attention. It gets the block's settings its registry entry takes
    (`TokenMixer.block_settings`), then `token_mixer_kwargs`.
    """

    dim: int
    num_heads: int
    kernel_size: int = 3
    padding: int = 1
    stride: int = 2
    mlp_ratio: float = 3.0
    qkv_bias: bool = False
    attn_drop: float = 0.0
    drop_path: float = 0.0
    outlook_impl: str = "auto"
    token_mixer: str = "outlook"
    token_mixer_kwargs: tuple[tuple[str, Any], ...] = ()
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    def _mixer(self) -> nn.Module:
        settings = dict(
            kernel_size=self.kernel_size,
            padding=self.padding,
            stride=self.stride,
            qkv_bias=self.qkv_bias,
            attn_drop=self.attn_drop,
            impl=self.outlook_impl,
        )
        mixer = TOKEN_MIXERS[self.token_mixer]
        kwargs = {k: settings[k] for k in mixer.block_settings}
        kwargs.update(self.token_mixer_kwargs)
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        return mixer(self.dim, self.num_heads, name="attn", **kwargs, **dt)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return _mixer_mlp_residuals(self, self._mixer(), x, train)


class Transformer(nn.Module):
    """Pre-norm self-attention block + MLP block. (B, H, W, C) -> (B, H, W, C)."""

    dim: int
    num_heads: int
    mlp_ratio: float = 3.0
    qkv_bias: bool = False
    attn_drop: float = 0.0
    drop_path: float = 0.0
    attention_impl: str = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        attn = Attention(
            self.dim,
            self.num_heads,
            self.qkv_bias,
            self.attn_drop,
            impl=self.attention_impl,
            name="attn",
            **dt,
        )
        return _mixer_mlp_residuals(self, attn, x, train)


class ClassAttention(nn.Module):
    """The class token attends to all tokens. (B, 1 + N, C) -> class token (B, 1, C)."""

    dim: int
    num_heads: int
    head_dim: int | None = None
    qkv_bias: bool = False
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        b, n, _ = x.shape
        head_dim = self.head_dim or self.dim // self.num_heads
        inner = head_dim * self.num_heads
        in_proj = dict(use_bias=self.qkv_bias, **dt)
        kv = dense(2 * inner, ("embed", "heads"), name="kv", **in_proj)(x)
        kv = kv.reshape(b, n, 2, self.num_heads, head_dim)
        k, v = kv[:, :, 0], kv[:, :, 1]  # 2 x (B, N, heads, hd)
        q = dense(inner, ("embed", "heads"), name="q", **in_proj)(x[:, :1])
        q = q.reshape(b, 1, self.num_heads, head_dim)
        attn_drop = nn.Dropout(self.attn_drop, deterministic=not train)
        cls = dot_product_attention(q, k, v, attn_drop, self.platform).reshape(b, 1, inner)
        cls = dense(self.dim, ("heads", "embed"), name="proj", **dt)(cls)
        return nn.Dropout(self.proj_drop, deterministic=not train)(cls)


class ClassBlock(nn.Module):
    """Updates only the class token (first token); patch tokens pass through.

    (B, 1 + N, C) -> (B, 1 + N, C).
    """

    dim: int
    num_heads: int
    head_dim: int | None = None
    mlp_ratio: float = 3.0
    qkv_bias: bool = False
    drop: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        attn = ClassAttention(
            self.dim,
            self.num_heads,
            self.head_dim,
            self.qkv_bias,
            self.attn_drop,
            self.drop,
            name="attn",
            **dt,
        )
        cls = x[:, :1]
        y = attn(TorchLayerNorm(name="norm1", **dt)(x), train)
        cls = cls + DropPath(self.drop_path, name="drop_path1")(y, train)
        y = Mlp(int(self.dim * self.mlp_ratio), drop=self.drop, name="mlp", **dt)(
            TorchLayerNorm(name="norm2", **dt)(cls), train
        )
        cls = cls + DropPath(self.drop_path, name="drop_path2")(y, train)
        return jnp.concatenate([cls, x[:, 1:]], axis=1)


#: MixToken's default group: the official code mixes within each GPU's batch of 128 images.
MIX_GROUP_SIZE = 128


def mix_token_groups(batch: int, group_size: int = MIX_GROUP_SIZE) -> int:
    """How many MixToken groups a (micro-)batch of `batch` images forms: batch / group_size,
    or one group of the whole batch when it holds at most `group_size` images. ValueError
    when `group_size` does not divide a larger batch."""
    if group_size < 1:
        raise ValueError(f"MixToken group size must be >= 1, got {group_size}")
    if batch <= group_size:
        return 1
    if batch % group_size:
        raise ValueError(
            f"MixToken group size {group_size} does not divide the (micro-)batch of {batch} "
            "images: use a divisor of it (or at least the batch, for one group)"
        )
    return batch // group_size


def mix_token_mask(height: int, width: int, box: jax.Array, scale: int = 1) -> jax.Array:
    """Boolean mask (..., height, width) of the box(es) (..., 4) = (y0, x0, y1, x1), given
    on a grid `scale` times coarser (half-open ranges, as Python slices): a (height, width)
    mask for one box (4,), (G, height, width) for the boxes (G, 4) of G groups."""
    box = jnp.asarray(box) * scale
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    y0, x0, y1, x1 = (box[..., i, None, None] for i in range(4))
    return (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)


def sample_mix_box(
    rng: jax.Array, grid: tuple[int, int], beta: float = 1.0, num_groups: int | None = None
) -> jax.Array:
    """MixToken's random box on the (h, w) token grid, as the official `rand_bbox`.

    lam ~ Beta(beta, beta), cut = int(side * sqrt(1 - lam)) and a uniform centre c; the
    box spans c - cut // 2 .. c + cut // 2 (half-open), clipped to the grid. As in the
    official code its sides are even before clipping (2 * (cut // 2)) and there is no
    box when cut <= 1: on 14x14, 27% of the tokens mixed on average, no mixing 2% of
    the time. Returns int32 (y0, x0, y1, x1): one box (4,),
    or with `num_groups` one independent box per group of the batch, (num_groups, 4)
    (the official code draws one box per GPU).
    """
    shape = () if num_groups is None else (num_groups,)
    lam_key, y_key, x_key = jax.random.split(rng, 3)
    lam = jax.random.beta(lam_key, beta, beta, shape)
    h, w = grid
    cut = jnp.sqrt(1.0 - lam)
    cut_h = (h * cut).astype(jnp.int32)
    cut_w = (w * cut).astype(jnp.int32)
    cy = jax.random.randint(y_key, shape, 0, h)
    cx = jax.random.randint(x_key, shape, 0, w)
    y0 = jnp.clip(cy - cut_h // 2, 0, h)
    x0 = jnp.clip(cx - cut_w // 2, 0, w)
    y1 = jnp.clip(cy + cut_h // 2, 0, h)
    x1 = jnp.clip(cx + cut_w // 2, 0, w)
    return jnp.stack([y0, x0, y1, x1], axis=-1).astype(jnp.int32)


def mix_box_lam(box: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Fraction of tokens NOT replaced by the box: 1 - area / (h * w); a scalar for one
    box (4,), (G,) for the boxes (G, 4) of G groups."""
    area = (box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1])
    return 1.0 - area.astype(jnp.float32) / (grid[0] * grid[1])


def mix_tokens(x: jax.Array, box: jax.Array, scale: int = 1) -> jax.Array:
    """MixToken on a token map x (B, H, W, C), as the official code, which pairs within each
    GPU's batch: the batch is split into G consecutive groups of B / G images, one per
    box, and inside its group's box image b of a group takes the tokens of the group's
    mirror image (index B / G - 1 - b within the group). `box`: one (4,) for the whole
    batch (one group) or (G, 4), on a grid `scale` times coarser than (H, W). The mirror
    pairing is its own inverse, so the same call un-mixes a map computed from mixed tokens.

    Groups that lie within one device's shard of a batch-sharded x mix without moving data
    between devices; a group that spans devices costs a collective-permute.
    """
    boxes = jnp.reshape(box, (-1, 4))
    groups, batch = boxes.shape[0], x.shape[0]
    if batch % groups:
        raise ValueError(
            f"MixToken: {groups} boxes (one per group) do not split the batch of {batch} "
            "into equal groups"
        )
    mask = mix_token_mask(x.shape[1], x.shape[2], boxes, scale)  # (G, H, W)
    grouped = x.reshape(groups, batch // groups, *x.shape[1:])
    mixed = jnp.where(mask[:, None, :, :, None], grouped[:, ::-1], grouped)
    return mixed.reshape(x.shape)


class VOLO(nn.Module):
    """VOLO classifier; arguments and defaults as timm's `VOLO`.

    `__call__(images (B, H, W, in_chans), train=False)` returns the class logits
    `head(cls) + 0.5 * max_tokens(aux_head(tokens))`, (B, num_classes); with
    `return_dense=True`, the pair (head(cls) (B, num_classes), aux logits
    (B, N, num_classes)) that token labeling trains on. `mix_box` (int32
    (y0, x0, y1, x1) on the token grid, see `sample_mix_box`) applies MixToken, as
    the official code, which pairs within each GPU's batch: with boxes (G, 4) the
    batch is split into G consecutive groups (one box (4,): one group, the whole
    batch), and the box of every image's stem output is replaced by that of the
    group's mirror image (see `mix_tokens`); the aux logits are un-mixed before they
    are returned.
    RNG streams: 'dropout' (dropout and stochastic depth) when training.
    `platform` is the platform the model is built for (`volo_jax.platforms`; None: none
    in particular), which `create_model` fills from the devices; `outlook_impl` picks
    how outlook attention runs ('auto': the platform's, see
    `volo_jax.ops.outlook.IMPLEMENTATIONS`) and `attention_impl` how the transformer
    stages' self-attention does ('auto': the platform's, see
    `volo_jax.ops.attention.ATTENTION`); the parameters are the same either way.
    `token_mixer` swaps outlook attention in the outlooker stage for another local
    operator (`MIXER_NAMES`), the ablation of the paper; `token_mixer_kwargs`
    ((name, value) pairs, or a dict through `create_model`) override its defaults,
    e.g. (('block_size', 2), ('halo_size', 1)) for halo attention on a 4x4 grid.
    """

    layers: Sequence[int]
    embed_dims: Sequence[int]
    num_heads: Sequence[int]
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "token"
    patch_size: int = 8
    stem_hidden_dim: int = 64
    downsamples: Sequence[bool] = (True, False, False, False)
    outlook_attention: Sequence[bool] = (True, False, False, False)
    mlp_ratio: float = 3.0
    qkv_bias: bool = False
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    post_layers: Sequence[str] = ("ca", "ca")
    use_aux_head: bool = True
    pooling_scale: int = 2
    remat: bool = False
    outlook_impl: str = "auto"
    attention_impl: str = "auto"
    token_mixer: str = "outlook"
    token_mixer_kwargs: tuple[tuple[str, Any], ...] = ()
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    platform: str | None = None

    def setup(self) -> None:
        self._check()
        dt = dict(dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        self.patch_embed = PatchEmbed(
            self.stem_hidden_dim, self.embed_dims[0], self.patch_size, stem_stride=2, **dt
        )
        grid = self.img_size // self.patch_size // self.pooling_scale
        init = nn.initializers.truncated_normal(0.02)
        self.pos_embed = self.param(
            "pos_embed",
            with_axes(init, None, "height", "width", "embed"),
            (1, grid, grid, self.embed_dims[-1]),
            self.param_dtype,
        )
        outlooker = nn.remat(Outlooker, static_argnums=(2,)) if self.remat else Outlooker
        transformer = nn.remat(Transformer, static_argnums=(2,)) if self.remat else Transformer
        total = sum(self.layers)
        network: list[Any] = []
        for i, depth in enumerate(self.layers):
            dim, heads = self.embed_dims[i], self.num_heads[i]
            if self.outlook_attention[i]:
                # As in the official code, outlooker blocks get no stochastic depth.
                stage = [
                    outlooker(
                        dim,
                        heads,
                        mlp_ratio=self.mlp_ratio,
                        qkv_bias=self.qkv_bias,
                        attn_drop=self.attn_drop_rate,
                        outlook_impl=self.outlook_impl,
                        token_mixer=self.token_mixer,
                        token_mixer_kwargs=self.token_mixer_kwargs,
                        **dt,
                    )
                    for _ in range(depth)
                ]
            else:
                start = sum(self.layers[:i])
                stage = [
                    transformer(
                        dim,
                        heads,
                        self.mlp_ratio,
                        self.qkv_bias,
                        self.attn_drop_rate,
                        drop_path=self.drop_path_rate * (start + j) / max(total - 1, 1),
                        attention_impl=self.attention_impl,
                        **dt,
                    )
                    for j in range(depth)
                ]
            network.append(stage)
            if self.downsamples[i]:
                network.append(Downsample(self.embed_dims[i + 1], 2, **dt))
        self.network = network
        self.pos_drop = nn.Dropout(self.pos_drop_rate)
        self.post_network = [
            ClassBlock(
                self.embed_dims[-1],
                self.num_heads[-1],
                mlp_ratio=self.mlp_ratio,
                qkv_bias=self.qkv_bias,
                attn_drop=self.attn_drop_rate,
                **dt,
            )
            for _ in self.post_layers
        ]
        if self.post_layers:
            self.cls_token = self.param(
                "cls_token",
                with_axes(init, None, None, "embed"),
                (1, 1, self.embed_dims[-1]),
                self.param_dtype,
            )
        self.norm = TorchLayerNorm(**dt)
        self.head_drop = nn.Dropout(self.drop_rate)
        self.head = dense(self.num_classes, ("embed", "classes"), **dt)
        if self.use_aux_head:
            self.aux_head = dense(self.num_classes, ("embed", "classes"), **dt)

    def _check(self) -> None:
        n = len(self.layers)
        for name in ("embed_dims", "num_heads", "downsamples", "outlook_attention"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"VOLO: {name} needs one entry per stage ({n}), got {getattr(self, name)}"
                )
        if self.global_pool not in ("token", "avg"):
            raise ValueError(
                f"VOLO: global_pool must be 'token' or 'avg', got {self.global_pool!r}"
            )
        if self.img_size % (self.patch_size * self.pooling_scale):
            raise ValueError(
                f"VOLO: img_size {self.img_size} must be a multiple of patch_size x pooling_scale "
                f"= {self.patch_size * self.pooling_scale}"
            )
        if self.num_classes < 1:
            raise ValueError(f"VOLO: num_classes must be >= 1, got {self.num_classes}")
        if any(p != "ca" for p in self.post_layers):
            raise ValueError(f"VOLO: post_layers may only hold 'ca', got {self.post_layers}")
        if self.token_mixer not in MIXER_NAMES:
            raise ValueError(
                f"VOLO: token_mixer must be one of {', '.join(MIXER_NAMES)}, got "
                f"{self.token_mixer!r}"
            )
        if self.global_pool == "token" and not self.post_layers:
            raise ValueError("VOLO: global_pool='token' needs post_layers (the class token)")

    @property
    def block_counts(self) -> tuple[int, ...]:
        """Blocks per stage, then the class-attention blocks, as a checkpoint numbers
        them: the converter's cheap fingerprint (`convert.mapping.identify_model`)."""
        return (*self.layers, len(self.post_layers))

    @property
    def widths(self) -> tuple[int, ...]:
        """Token widths of the stages: with `block_counts`, the converter's cheap fingerprint."""
        return tuple(self.embed_dims)

    def forward_features(
        self, x: jax.Array, train: bool = False, mix_box: jax.Array | None = None
    ) -> jax.Array:
        """Images (B, H, W, in_chans) -> normalised tokens (B, [1 +] N, C), class token first."""
        expected = (self.img_size, self.img_size, self.in_chans)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"VOLO built for img_size {self.img_size} expects images (B, {expected[0]}, "
                f"{expected[1]}, {expected[2]}) in NHWC, got {tuple(x.shape)}"
            )
        x = self.patch_embed(x, train)
        if mix_box is not None:
            x = mix_tokens(x, mix_box, self.pooling_scale)
        for idx, stage in enumerate(self.network):
            if idx == 2:  # after the outlooker stage and its downsample, as timm
                x = self.pos_drop(x + self.pos_embed.astype(x.dtype), deterministic=not train)
            for block in stage if isinstance(stage, (list, tuple)) else (stage,):
                x = block(x, train)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.post_layers:
            cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
            for block in self.post_network:
                x = block(x, train)
        return self.norm(x)

    def forward_head(
        self,
        x: jax.Array,
        train: bool = False,
        return_dense: bool = False,
        mix_box: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Tokens (B, 1 + N, C) -> logits (B, num_classes), or with `return_dense`
        (class logits (B, num_classes), aux logits (B, N, num_classes))."""
        pooled = x.mean(axis=1) if self.global_pool == "avg" else x[:, 0]
        pooled = self.head_drop(pooled, deterministic=not train)
        x = self.head_drop(x, deterministic=not train)
        logits = self.head(pooled)
        if not self.use_aux_head:
            if return_dense:
                raise ValueError("return_dense needs the aux head (use_aux_head=True)")
            return logits
        aux = self.aux_head(x[:, 1:])  # (B, N, classes), patch tokens only
        if return_dense:
            if mix_box is not None:
                grid = self.img_size // self.patch_size // self.pooling_scale
                aux = mix_tokens(aux.reshape(aux.shape[0], grid, grid, -1), mix_box)
                aux = aux.reshape(aux.shape[0], grid * grid, -1)
            return logits, aux
        return logits + 0.5 * aux.max(axis=1)

    def __call__(
        self,
        x: jax.Array,
        train: bool = False,
        return_dense: bool = False,
        mix_box: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        if mix_box is not None and not return_dense:
            raise ValueError(
                "mix_box (MixToken) needs return_dense=True: the targets are per token"
            )
        tokens = self.forward_features(x, train, mix_box)
        return self.forward_head(tokens, train, return_dense, mix_box)


def _register_variants() -> None:
    from volo_jax.models.registry import PretrainedCfg, register_model

    base = "https://github.com/sail-sg/volo/releases/download/volo_1/"
    archs = {
        "d1": dict(layers=(4, 4, 8, 2), embed_dims=(192, 384, 384, 384), num_heads=(6, 12, 12, 12)),
        "d2": dict(
            layers=(6, 4, 10, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16)
        ),
        "d3": dict(
            layers=(8, 8, 16, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16)
        ),
        "d4": dict(
            layers=(8, 8, 16, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16)
        ),
        "d5": dict(
            layers=(12, 12, 20, 4),
            embed_dims=(384, 768, 768, 768),
            num_heads=(12, 16, 16, 16),
            mlp_ratio=4.0,
            stem_hidden_dim=128,
        ),
    }
    # (variant, resolution, crop_pct, release file) as timm's default_cfgs.
    releases = [
        ("d1", 224, 0.96, "d1_224_84.2"),
        ("d1", 384, 1.0, "d1_384_85.2"),
        ("d2", 224, 0.96, "d2_224_85.2"),
        ("d2", 384, 1.0, "d2_384_86.0"),
        ("d3", 224, 0.96, "d3_224_85.4"),
        ("d3", 448, 1.0, "d3_448_86.3"),
        ("d4", 224, 0.96, "d4_224_85.7"),
        ("d4", 448, 1.15, "d4_448_86.79"),
        ("d5", 224, 0.96, "d5_224_86.10"),
        ("d5", 448, 1.15, "d5_448_87.0"),
        ("d5", 512, 1.15, "d5_512_87.07"),
    ]
    for variant, size, crop_pct, release in releases:
        name = f"volo_{variant}_{size}"
        cfg = PretrainedCfg(
            input_size=(3, size, size),
            crop_pct=crop_pct,
            interpolation="bicubic",
            url=f"{base}{release}.pth.tar",
            hf_hub_id=f"timm/{name}.sail_in1k",
        )
        register_model(name, VOLO, cfg, **archs[variant])


_register_variants()
