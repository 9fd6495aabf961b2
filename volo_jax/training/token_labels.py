"""Dense token-labeling targets from precomputed score maps (the official format).

A score map holds, for each location of an (H, W) grid over the whole image, the
annotator's top-5 scores and class indices: float [2, 5, H, W] (values, indices). The
input pipeline flips it and moves it with RandAugment's geometric ops together with its
image (`volo_jax.data.augment`); here, as the official `tlt/data/mixup.py`
(`get_featuremaps`, `get_label`, `get_labelmaps_with_coords`), it is made dense over the K
classes (zero elsewhere) and ROI-aligned to the random crop (torchvision `roi_align`,
aligned=False, the box scaled by the map's width and shifted by -0.5), giving a 1x1 class
target and a g x g token target, each softmaxed over the classes and then `p * on + off`
with on = 1 - s + s / K and off = s / K (so they sum to 1 + s / K, as the official code).

The official code hands roi_align the crop as (top, left, bottom, right), which roi_align
reads as (x1, y1, x2, y2): its crop of the map is the crop box mirrored about the
diagonal. `official_box_order=True` keeps that (the published models were trained so);
False crops the map where the image was cropped.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


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


def roi_weights(
    start: jax.Array, stop: jax.Array, size: int, out: int, sampling_ratio: int, slots: int
) -> jax.Array:
    """(out, size) averaging weights of torchvision roi_align along one axis: `out` bins over
    [start, stop) pixels (length at least 1), each the mean of `sampling_ratio` bilinear
    samples, or with sampling_ratio <= 0 of ceil(bin length) samples (at most `slots`)."""
    length = jnp.maximum(stop - start, 1.0)
    bin_length = length / out
    if sampling_ratio > 0:
        count = jnp.float32(sampling_ratio)
        slots = sampling_ratio
    else:
        count = jnp.ceil(bin_length)
    sample = jnp.arange(slots, dtype=jnp.float32)
    coords = (
        start
        + jnp.arange(out, dtype=jnp.float32)[:, None] * bin_length
        + (sample[None, :] + 0.5) * bin_length / count
    )  # (out, slots)
    used = (sample < count).astype(jnp.float32)[None, :, None]
    return (_interp_weights(coords, size) * used).sum(axis=1) / count


def dense_score_map(label_map: jax.Array, num_classes: int) -> jax.Array:
    """[2, T, H, W] (top-T values, class indices) -> dense (H, W, K), zero off the top-T."""
    values, indices = label_map[0], label_map[1].astype(jnp.int32)
    _, h, w = values.shape
    rows = jnp.broadcast_to(jnp.arange(h * w)[None], (values.shape[0], h * w))
    dense = jnp.zeros((h * w, num_classes), jnp.float32)
    dense = dense.at[rows, indices.reshape(-1, h * w)].add(values.reshape(-1, h * w))
    return dense.reshape(h, w, num_classes)


def roi_align(
    dense: jax.Array,
    box: jax.Array,
    out: int,
    sampling_ratio: int = -1,
    official_box_order: bool = False,
) -> jax.Array:
    """torchvision roi_align (aligned=False) of dense (H, W, K) to (out, out, K) for the crop
    box (y0, x0, y1, x1) in [0, 1] of the image, as the official `get_label`: the box times
    the map's width, minus 0.5. `official_box_order` passes it as the official code does,
    (y0, x0, y1, x1) read as (x1, y1, x2, y2)."""
    h, w, _ = dense.shape
    pixels = box.astype(jnp.float32) * w - 0.5 if official_box_order else None
    if official_box_order:
        row_start, row_stop, col_start, col_stop = pixels[1], pixels[3], pixels[0], pixels[2]
    else:
        row_start, row_stop = box[0] * h - 0.5, box[2] * h - 0.5
        col_start, col_stop = box[1] * w - 0.5, box[3] * w - 0.5
    slots = max(1, math.ceil(max(h, w) / out)) + 1  # room for ceil(bin) samples
    wy = roi_weights(row_start, row_stop, h, out, sampling_ratio, slots)
    wx = roi_weights(col_start, col_stop, w, out, sampling_ratio, slots)
    return jnp.einsum("oh,pw,hwk->opk", wy, wx, dense)


def on_off_targets(probs: jax.Array, smoothing: float) -> jax.Array:
    """The official label smoothing of soft targets (`get_labelmaps_with_coords`):
    probs (..., K) * on + off, on = 1 - s + s / K, off = s / K (sums to 1 + s / K)."""
    off = smoothing / probs.shape[-1]
    return probs * (1.0 - smoothing + off) + off


def targets_from_score_maps(
    label_maps: jax.Array,
    boxes: jax.Array,
    num_classes: int,
    grid: int,
    smoothing: float,
    sampling_ratio: int = -1,
    official_box_order: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Class and token targets of a batch of crops (the official `get_labelmaps_with_coords`).

    Args:
      label_maps: (B, 2, T, H, W) top-T (values, indices) score maps of the full images,
        already flipped and moved by RandAugment with their images.
      boxes: (B, 4) the crops as (y0, x0, y1, x1) fractions of the full image.
      grid: token grid side g: img_size / (patch_size x pooling_scale), 14 at 224.
      sampling_ratio: roi_align samples per bin and axis; <= 0: ceil(bin length), as the
        official code (torchvision's -1).
      official_box_order: crop the map with the official transposed box (see the module).
    Returns:
      (class target (B, K), dense target (B, g * g, K)), softmaxed, then `p * on + off`.
    """

    def one(label_map: jax.Array, box: jax.Array) -> tuple[jax.Array, jax.Array]:
        dense = dense_score_map(label_map, num_classes)
        cls = roi_align(dense, box, 1, sampling_ratio, official_box_order)[0, 0]
        tokens = roi_align(dense, box, grid, sampling_ratio, official_box_order)
        return cls, tokens.reshape(grid * grid, num_classes)

    cls, tokens = jax.vmap(one)(label_maps.astype(jnp.float32), boxes)
    cls = on_off_targets(jax.nn.softmax(cls, axis=-1), smoothing)
    tokens = on_off_targets(jax.nn.softmax(tokens, axis=-1), smoothing)
    return cls, tokens
