"""Dense token-labeling targets from precomputed score maps (the official format).

A score map holds, for each location of an (H, W) grid over the whole image, the
annotator's top-5 scores and class indices: float [2, 5, H, W] (values, indices).
As the official `get_featuremaps` + `get_label`, the map is made dense over the K
classes (zero elsewhere), ROI-aligned to the random crop (torchvision `roi_align`
with the box shifted by -0.5 pixel), giving a 1x1 class target and a g x g token
target, then softmaxed over classes and label-smoothed.

Simplifications: a fixed `samples` x `samples` sampling grid per output bin
(torchvision's default adapts it per box, which cannot be traced with a static
shape); the map follows the crop and the flip, not RandAugment's geometric ops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from volo_jax.training.losses import smooth_targets


def _interp_weights(coords: jax.Array, size: int) -> jax.Array:
    """Bilinear weights (..., size) of sample coordinates (...,) on an axis of `size`
    pixels, with torchvision roi_align's border rules (zero beyond one pixel out)."""
    valid = (coords >= -1.0) & (coords <= size)
    c = jnp.maximum(coords, 0.0)
    low = jnp.floor(c).astype(jnp.int32)
    at_end = low >= size - 1
    low = jnp.where(at_end, size - 1, low)
    high = jnp.where(at_end, size - 1, low + 1)
    frac = jnp.where(at_end, 0.0, c - low)
    weights = (
        jax.nn.one_hot(low, size) * (1.0 - frac)[..., None]
        + jax.nn.one_hot(high, size) * frac[..., None]
    )
    return weights * valid[..., None]


def roi_weights(start: jax.Array, stop: jax.Array, size: int, out: int, samples: int) -> jax.Array:
    """(out, size) averaging weights of roi_align along one axis: `out` bins over
    [start, stop) pixels (length at least 1), `samples` points per bin."""
    length = jnp.maximum(stop - start, 1.0)
    offsets = jnp.arange(out)[:, None] + (jnp.arange(samples)[None, :] + 0.5) / samples
    coords = start + offsets * length / out  # (out, samples)
    return _interp_weights(coords, size).mean(axis=1)


def dense_score_map(label_map: jax.Array, num_classes: int) -> jax.Array:
    """[2, T, H, W] (top-T values, class indices) -> dense (H, W, K), zero off the top-T."""
    values, indices = label_map[0], label_map[1].astype(jnp.int32)
    _, h, w = values.shape
    rows = jnp.broadcast_to(jnp.arange(h * w)[None], (values.shape[0], h * w))
    dense = jnp.zeros((h * w, num_classes), jnp.float32)
    dense = dense.at[rows, indices.reshape(-1, h * w)].add(values.reshape(-1, h * w))
    return dense.reshape(h, w, num_classes)


def roi_align(dense: jax.Array, box: jax.Array, out: int, samples: int) -> jax.Array:
    """dense (H, W, K), box (y0, x0, y1, x1) in [0, 1] of the image -> (out, out, K)."""
    h, w, _ = dense.shape
    wy = roi_weights(box[0] * h - 0.5, box[2] * h - 0.5, h, out, samples)
    wx = roi_weights(box[1] * w - 0.5, box[3] * w - 0.5, w, out, samples)
    return jnp.einsum("oh,pw,hwk->opk", wy, wx, dense)


def targets_from_score_maps(
    label_maps: jax.Array,
    boxes: jax.Array,
    flips: jax.Array,
    num_classes: int,
    grid: int,
    smoothing: float,
    samples: int = 2,
) -> tuple[jax.Array, jax.Array]:
    """Class and token targets of a batch of cropped (and maybe flipped) images.

    Args:
      label_maps: (B, 2, T, H, W) top-T (values, indices) score maps of the full images.
      boxes: (B, 4) the crops as (y0, x0, y1, x1) fractions of the full image.
      flips: (B,) bool, whether the crop was mirrored left-right.
      grid: token grid side g (img_size // 16).
    Returns:
      (class target (B, K), dense target (B, g * g, K)), softmaxed and smoothed.
    """

    def one(label_map: jax.Array, box: jax.Array, flip: jax.Array) -> tuple[jax.Array, ...]:
        dense = dense_score_map(label_map, num_classes)
        cls = roi_align(dense, box, 1, samples * grid)[0, 0]  # as dense a sampling
        tokens = roi_align(dense, box, grid, samples)
        tokens = jnp.where(flip, tokens[:, ::-1], tokens)
        return cls, tokens.reshape(grid * grid, num_classes)

    cls, tokens = jax.vmap(one)(label_maps.astype(jnp.float32), boxes, flips)
    cls = smooth_targets(jax.nn.softmax(cls, axis=-1), smoothing)
    tokens = smooth_targets(jax.nn.softmax(tokens, axis=-1), smoothing)
    return cls, tokens
