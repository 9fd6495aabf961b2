"""Local operators: the shared unfold/fold primitives and the token mixers built on them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn

from volo_jax.ops.dwconv import ConvNormAct, DWBlock, DynamicDWConv, dynamic_depthwise_conv
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


def _outlook(dim: int, num_heads: int, **kw: Any) -> nn.Module:
    return OutlookAttention(dim, num_heads, **{"kernel_size": 3, "padding": 1, **kw})


#: name -> factory f(dim, num_heads, **kw) of a (B, H, W, C) -> (B, H, W, C) mixer,
#: called as `mixer(x, train)`; keyword arguments override the defaults above.
TOKEN_MIXERS: dict[str, Callable[..., nn.Module]] = {
    "outlook": _outlook,
    "involution": _involution,
    "halo": _halo,
    "dwconv": _dwconv,
    "dynamic_dwconv": _dynamic_dwconv,
    "window": _window,
}

__all__ = [
    "TOKEN_MIXERS",
    "ConvNormAct",
    "DWBlock",
    "DynamicDWConv",
    "HaloAttn",
    "Involution",
    "OutlookAttention",
    "PosEmbedRel",
    "WindowAttention",
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
