"""Outlook aggregation as a fused Pallas kernel that never materialises the
unfolded values (the K*K-fold copy of v that unfold + fold write to memory).

The stride-s window grid is made contiguous by a space-to-depth view: the padded
image (B, s*Hq, s*Wq, C) is reshaped, without copying, to planes
(B, Hq, s, Wq, s, heads, hd), in which the window offset (li, lj) of every window
(y, x) sits at plane (li % s, lj % s), position (y + li // s, x + lj // s): each
offset is a plain rectangular slice. One program handles one (image, head):

    out[offset i] += sum_j attn[:, :, i, j] * v[offset j]      (K^4 multiply-adds)

accumulating in float32, and the gradient is a second kernel of the same shape.
On the CPU the kernels run in Pallas' interpret mode (for tests); on GPU and TPU
they are compiled.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _plane_geometry(size: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """(number of windows h, plane length q) along one axis."""
    h = (size + 2 * padding - kernel) // stride + 1
    q = max(math.ceil((size + 2 * padding) / stride), h + (kernel - 1) // stride)
    return h, q


def _to_planes(x: jax.Array, kernel: int, stride: int, padding: int, heads: int) -> jax.Array:
    """(B, H, W, C) -> zero-padded planes (B, Hq, s, Wq, s, heads, hd)."""
    b, height, width, c = x.shape
    _, hq = _plane_geometry(height, kernel, stride, padding)
    _, wq = _plane_geometry(width, kernel, stride, padding)
    pad_h = (padding, stride * hq - height - padding)
    pad_w = (padding, stride * wq - width - padding)
    x = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    return x.reshape(b, hq, stride, wq, stride, heads, c // heads)


def _from_planes(planes: jax.Array, size: tuple[int, int], padding: int) -> jax.Array:
    """The inverse of `_to_planes`: planes -> (B, H, W, C), padding cropped."""
    b, hq, s, wq, _, heads, hd = planes.shape
    image = planes.reshape(b, hq * s, wq * s, heads * hd)
    return image[:, padding : padding + size[0], padding : padding + size[1]]


def _offset(k: int, kernel: int, stride: int, h: int, w: int) -> tuple:
    """Ref index of window offset k (row-major) for all (h, w) windows in a plane block."""
    ki, kj = divmod(k, kernel)
    return (pl.ds(ki // stride, h), ki % stride, pl.ds(kj // stride, w), kj % stride, slice(None))


def _forward_kernel(v_ref, a_ref, o_ref, *, kernel: int, stride: int, h: int, w: int) -> None:
    kk = kernel * kernel
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
    attn = a_ref[...].astype(jnp.float32)  # (h, w, KK, KK)
    for i in range(kk):
        acc = jnp.zeros((h, w, o_ref.shape[-1]), jnp.float32)
        for j in range(kk):
            v_j = v_ref[_offset(j, kernel, stride, h, w)].astype(jnp.float32)
            acc = acc + attn[:, :, i, j, None] * v_j
        region = _offset(i, kernel, stride, h, w)
        o_ref[region] = o_ref[region] + acc.astype(o_ref.dtype)


def _backward_kernel(
    v_ref, a_ref, g_ref, dv_ref, da_ref, *, kernel: int, stride: int, h: int, w: int
) -> None:
    kk = kernel * kernel
    dv_ref[...] = jnp.zeros(dv_ref.shape, dv_ref.dtype)
    attn = a_ref[...].astype(jnp.float32)
    values = [v_ref[_offset(j, kernel, stride, h, w)].astype(jnp.float32) for j in range(kk)]
    dv = [jnp.zeros_like(values[0]) for _ in range(kk)]
    rows = []
    for i in range(kk):
        g_i = g_ref[_offset(i, kernel, stride, h, w)].astype(jnp.float32)
        rows.append(jnp.stack([jnp.sum(g_i * values[j], axis=-1) for j in range(kk)], axis=-1))
        for j in range(kk):
            dv[j] = dv[j] + attn[:, :, i, j, None] * g_i
    da_ref[...] = jnp.stack(rows, axis=-2).astype(da_ref.dtype)  # (h, w, KK, KK)
    for j in range(kk):
        region = _offset(j, kernel, stride, h, w)
        dv_ref[region] = dv_ref[region] + dv[j].astype(dv_ref.dtype)


def _specs(planes_shape: tuple, attn_shape: tuple) -> tuple[pl.BlockSpec, pl.BlockSpec]:
    """Block specs selecting image b, head n of the planes and of the attention."""
    _, hq, s, wq, _, _, hd = planes_shape
    _, h, w, _, kk, _ = attn_shape
    planes = pl.BlockSpec((None, hq, s, wq, s, None, hd), lambda b, n: (b, 0, 0, 0, 0, n, 0))
    attn = pl.BlockSpec((None, h, w, None, kk, kk), lambda b, n: (b, 0, 0, n, 0, 0))
    return planes, attn


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


def _forward(planes: jax.Array, attn: jax.Array, kernel: int, stride: int) -> jax.Array:
    b, h, w, heads = attn.shape[:4]
    planes_spec, attn_spec = _specs(planes.shape, attn.shape)
    body = functools.partial(_forward_kernel, kernel=kernel, stride=stride, h=h, w=w)
    return pl.pallas_call(
        body,
        out_shape=jax.ShapeDtypeStruct(planes.shape, planes.dtype),
        grid=(b, heads),
        in_specs=[planes_spec, attn_spec],
        out_specs=planes_spec,
        interpret=_interpret(),
        name="outlook_aggregate_fwd",
    )(planes, attn)


def _backward(
    planes: jax.Array, attn: jax.Array, grad_planes: jax.Array, kernel: int, stride: int
) -> tuple[jax.Array, jax.Array]:
    b, h, w, heads = attn.shape[:4]
    planes_spec, attn_spec = _specs(planes.shape, attn.shape)
    body = functools.partial(_backward_kernel, kernel=kernel, stride=stride, h=h, w=w)
    return pl.pallas_call(
        body,
        out_shape=(
            jax.ShapeDtypeStruct(planes.shape, planes.dtype),
            jax.ShapeDtypeStruct(attn.shape, attn.dtype),
        ),
        grid=(b, heads),
        in_specs=[planes_spec, attn_spec, planes_spec],
        out_specs=(planes_spec, attn_spec),
        interpret=_interpret(),
        name="outlook_aggregate_bwd",
    )(planes, attn, grad_planes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def outlook_aggregate_pallas(
    v: jax.Array, attn: jax.Array, kernel_size: int, stride: int, padding: int
) -> jax.Array:
    """Same contract as `outlook_aggregate`: v (B, H, W, C), attn
    (B, h, w, heads, K*K, K*K) -> (B, H, W, C)."""
    heads = attn.shape[3]
    planes = _to_planes(v, kernel_size, stride, padding, heads)
    out = _forward(planes, attn, kernel_size, stride)
    return _from_planes(out, v.shape[1:3], padding)


def _vjp_forward(v, attn, kernel_size, stride, padding):
    heads = attn.shape[3]
    planes = _to_planes(v, kernel_size, stride, padding, heads)
    out = _from_planes(_forward(planes, attn, kernel_size, stride), v.shape[1:3], padding)
    return out, (planes, attn, v.shape[1:3])


def _vjp_backward(kernel_size, stride, padding, residuals, g):
    planes, attn, size = residuals
    grad_planes = _to_planes(g, kernel_size, stride, padding, attn.shape[3])
    dv_planes, dattn = _backward(planes, attn, grad_planes, kernel_size, stride)
    return _from_planes(dv_planes, size, padding), dattn


outlook_aggregate_pallas.defvjp(_vjp_forward, _vjp_backward)
