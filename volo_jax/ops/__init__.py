"""Local operators and the token mixers built on them.

Window primitives: `geometry.py` (the window geometry every primitive shares),
`patches.py` (unfold / fold), `slices.py` (windows as strided slices), `planes.py`
(windows as unit-stride slices of stride planes, the CPU's layout). Operators:
`outlook.py` and `outlook_pallas.py` (outlook attention; its Pallas kernels, whose
platform code is in `tpu/` (Mosaic) and `gpu/` (Triton)),
`attention.py` and `attention_pallas.py` (global self-attention: XLA's, cuDNN's flash
attention, or its Pallas kernel, whose platform code is `tpu/attention.py`), `halo.py`,
`involution.py`, `dwconv.py`, `window.py`. `pallas_common.py`: what the kernels share
(the per-device call under a mesh). Each module takes the `platform` its model is built for
(`volo_jax.platforms`).

`TOKEN_MIXERS` is the one registry of token mixers: VOLO's outlooker stage builds its
mixer from it (`VOLO(token_mixer=...)`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from volo_jax.ops.attention import Attention, dot_product_attention
from volo_jax.ops.dwconv import DWBlock, DynamicDWConv, dynamic_depthwise_conv
from volo_jax.ops.halo import HaloAttn, PosEmbedRel, make_divisible, relative_logits
from volo_jax.ops.involution import Involution, involution_aggregate
from volo_jax.ops.outlook import OutlookAttention, outlook_aggregate
from volo_jax.ops.patches import fold, unfold
from volo_jax.ops.window import (
    WindowAttention,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)

#: Settings of the enclosing block (VOLO's `Outlooker`) a mixer may take: outlook
#: attention's window geometry and implementation, the attention options.
BLOCK_SETTINGS = ("kernel_size", "padding", "stride", "qkv_bias", "attn_drop", "impl")


@dataclasses.dataclass(frozen=True)
class TokenMixer:
    """A registry entry: `entry(dim, num_heads, **kw)` builds a (B, H, W, C) ->
    (B, H, W, C) module, called as `mixer(x, train)`; keyword arguments override the
    defaults of `build`. `block_settings`: which of `BLOCK_SETTINGS` the block passes
    on (the others are the mixer's own defaults, as in the ablation)."""

    build: Callable[..., nn.Module]
    block_settings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.block_settings) - set(BLOCK_SETTINGS)
        if unknown:
            raise ValueError(f"block settings {sorted(unknown)} not among {BLOCK_SETTINGS}")

    def __call__(self, dim: int, num_heads: int, **kw: Any) -> nn.Module:
        return self.build(dim, num_heads, **kw)


def _outlook(dim: int, num_heads: int, **kw: Any) -> nn.Module:
    """Outlook attention with VOLO's window: K = 3, padding 1, stride 2."""
    return OutlookAttention(dim, num_heads, **{"kernel_size": 3, "padding": 1, "stride": 2, **kw})


def _self_attention(dim: int, num_heads: int, **kw: Any) -> nn.Module:
    """Global multi-head self-attention over all tokens."""
    return Attention(dim, num_heads, **kw)


def _involution(dim: int, num_heads: int, **kw: Any) -> nn.Module:
    """Involution, K = 7, one kernel group a head, with an output projection."""
    return Involution(dim, **{"kernel_size": 7, "groups": num_heads, "proj": True, **kw})


def _halo(dim: int, num_heads: int, **kw: Any) -> nn.Module:
    """Halo attention, block 7 and halo 3 (13 x 13 windows; 7 divides VOLO's 28 x 28
    and 14 x 14 grids), with an output projection."""
    kw = {"block_size": 7, "halo_size": 3, "proj": True, **kw}
    return HaloAttn(dim, num_heads=num_heads, **kw)


def _dwconv(dim: int, num_heads: int, **kw: Any) -> nn.Module:
    """DWNet's block: 1x1 conv, 7 x 7 depth-wise conv, 1x1 conv, each with BN."""
    return DWBlock(dim, num_heads, **{"kernel_size": 7, **kw, "dynamic": False})


def _dynamic_dwconv(dim: int, num_heads: int, **kw: Any) -> nn.Module:
    """DWNet's block with the SE-style dynamic 7 x 7 depth-wise conv."""
    return DWBlock(dim, num_heads, **{"kernel_size": 7, **kw, "dynamic": True})


def _window(dim: int, num_heads: int, **kw: Any) -> nn.Module:
    """Swin window attention, M = 7, no shift unless shift_size is given."""
    return WindowAttention(dim, num_heads, **{"window_size": 7, **kw})


#: name -> `TokenMixer`; 'outlook' first (VOLO's), then global self-attention, then the
#: other local operators.
TOKEN_MIXERS: dict[str, TokenMixer] = {
    "outlook": TokenMixer(_outlook, BLOCK_SETTINGS),
    "self_attention": TokenMixer(_self_attention, ("qkv_bias", "attn_drop")),
    "dwconv": TokenMixer(_dwconv),
    "dynamic_dwconv": TokenMixer(_dynamic_dwconv),
    "halo": TokenMixer(_halo),
    "involution": TokenMixer(_involution),
    "window": TokenMixer(_window),
}

__all__ = [
    "BLOCK_SETTINGS",
    "TOKEN_MIXERS",
    "Attention",
    "DWBlock",
    "DynamicDWConv",
    "HaloAttn",
    "Involution",
    "OutlookAttention",
    "PosEmbedRel",
    "TokenMixer",
    "WindowAttention",
    "dot_product_attention",
    "dynamic_depthwise_conv",
    "fold",
    "involution_aggregate",
    "make_divisible",
    "outlook_aggregate",
    "relative_logits",
    "relative_position_index",
    "shifted_window_mask",
    "unfold",
    "window_partition",
    "window_reverse",
]
