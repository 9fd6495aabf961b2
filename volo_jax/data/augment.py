"""Train augmentation in TensorFlow, as the official VOLO recipe, with stateless randomness
(one seed per example, so a run is a deterministic function of its seed and step).

Two orders, as the official code:

* With token labels (a score map per image; the official `tlt` package's
  `label_transforms_factory.transforms_imagenet_train`): horizontal flip (of the image and
  its score map) -> RandAugment on the whole, uncropped image, whose geometric ops (Rotate,
  ShearX/Y, TranslateX/YRel) move the score map too (nearest neighbour, as `tlt`'s
  `random_augment_label.affine_label`) -> random resized crop last, its box returned for
  the ROI-align of the map (`volo_jax.training.token_labels`).
* Without (timm's `create_transform(is_training=True)`): random resized crop ->
  horizontal flip -> RandAugment.

Both then scale to [0, 1], normalise, and apply random erasing ('pixel' mode: one box of
normal noise, area 2%-33%, aspect 0.3-3.3, with probability `erase_prob`).
The random resized crop is timm's: scale (0.08, 1), ratio (3/4, 4/3), 10 attempts then a
centre-crop fallback; bilinear, bicubic or a random choice of the two.

RandAugment follows timm's `rand-m{M}-n{N}-mstd{S}-inc{0|1}-p{P}` spec ('rand-m9-mstd0.5-
inc1' in the recipe): N ops (default 2) drawn with replacement from timm's 15 ops
(the 'increasing' set with inc1), each applied with probability P (default 0.5) at a
magnitude drawn from N(M, S) clipped to [0, 10]; rotation, shear and translation
fill with the ImageNet mean colour. No well-kept library implements timm's variant
(keras' and tf-models' RandAugment use other op sets, magnitudes and RNG, and
tf-models-official pins its own TensorFlow), hence this one. Differences from timm's
PIL code: TensorFlow decoders and `tf.image.resize(antialias=True)` instead of PIL
resampling; geometric ops sample bilinearly (timm picks bilinear or bicubic at random)
and differ from PIL by sub-pixel offsets; random erasing uses 10 candidate boxes drawn
at once (the first that fits wins, as timm's loop). The RandAugment ops run on uint8
images, as PIL's: the point and enhancement ops give PIL's output bit for bit, the
geometric ops truncate their bilinear samples as PIL does (tests/data/test_augment.py).
They are written for TensorFlow's CPU kernels: same-shape or scalar operands (a (3,)
vector broadcast over an image costs about 10 times as much), no `tf.where` over
images, `tf.reverse` for the flip, translations and shears as shifted slices and row
gathers (ImageProjectiveTransformV3, much slower on the CPU, is kept for rotation;
docs/performance.md has the per-op times). The score-map ops match `tlt`'s exactly
(tests/training/test_official_token_labeling.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import numpy as np

from volo_jax.data.tf_quiet import tf
from volo_jax.data.transforms import RandAugmentSpec, parse_randaugment

Op = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (image, argument) -> image
LevelToArg = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (level, random sign) -> argument

LEVEL_MAX = 10.0
FILL = (124.0, 116.0, 104.0)  # round(255 * ImageNet mean), timm's `img_mean` fill colour


def _seeds(seed: tf.Tensor, count: int) -> list[tf.Tensor]:
    return list(tf.unstack(tf.random.experimental.stateless_split(seed, count)))


def _uniform(seed: tf.Tensor, shape=(), low: float = 0.0, high: float = 1.0) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed, low, high)


def _randint(seed: tf.Tensor, low: tf.Tensor, high: tf.Tensor) -> tf.Tensor:
    """Uniform int32 in [low, high] (inclusive, as Python's random.randint)."""
    return tf.random.stateless_uniform([], seed, low, high + 1, dtype=tf.int32)


# ---------------------------------------------------------------------------------------------
# Random resized crop and flip
# ---------------------------------------------------------------------------------------------


def random_resized_crop_box(
    seed: tf.Tensor,
    height: tf.Tensor,
    width: tf.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tf.Tensor:
    """timm's RandomResizedCrop.get_params: int32 (top, left, crop_h, crop_w)."""
    s_area, s_ratio, s_top, s_left = _seeds(seed, 4)
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    target = h * w * _uniform(s_area, [10], scale[0], scale[1])
    aspect = tf.exp(_uniform(s_ratio, [10], math.log(ratio[0]), math.log(ratio[1])))
    cw = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
    ch = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
    fits = (cw > 0) & (ch > 0) & (cw <= width) & (ch <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    # Fallback: the whole image, its aspect clamped to the ratio range, centred.
    in_ratio = w / h
    fb_w = tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w)
    fb_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
    fb_w, fb_h = tf.cast(fb_w, tf.int32), tf.cast(fb_h, tf.int32)
    found = tf.reduce_any(fits)
    crop_h = tf.where(found, ch[first], fb_h)
    crop_w = tf.where(found, cw[first], fb_w)
    top = tf.where(found, _randint(s_top, 0, height - crop_h), (height - crop_h) // 2)
    left = tf.where(found, _randint(s_left, 0, width - crop_w), (width - crop_w) // 2)
    return tf.stack([top, left, crop_h, crop_w])


def resize(image: tf.Tensor, size: int, method: str) -> tf.Tensor:
    """(H, W, 3) (uint8, or float with values in [0, 255]) -> uint8 (size, size, 3),
    antialiased, rounded."""
    if image.dtype != tf.uint8:  # uint8 goes in as it is: the same values, one pass less
        image = tf.cast(image, tf.float32)
    out = tf.image.resize(image, (size, size), method, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def resize_crop(crop: tf.Tensor, seed: tf.Tensor, size: int, interpolation: str) -> tf.Tensor:
    """An (h, w, 3) crop (uint8, or float with values in [0, 255]) -> uint8 (size, size,
    3); `interpolation` 'random' picks bilinear or bicubic by `seed`."""
    if interpolation != "random":
        return resize(crop, size, interpolation)
    return tf.cond(
        _uniform(seed) < 0.5,
        lambda: resize(crop, size, "bilinear"),
        lambda: resize(crop, size, "bicubic"),
    )


def _box_fractions(box: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """int32 (top, left, crop_h, crop_w) -> float32 (y0, x0, y1, x1) fractions of the image."""
    # In float64, then rounded: the nearest float32 to the exact fraction, however a
    # graph optimiser rewrites the division (e.g. as a product with the reciprocal).
    hw = tf.cast(tf.stack([height, width, height, width]), tf.float64)
    corners = tf.stack([box[0], box[1], box[0] + box[2], box[1] + box[3]])
    return tf.cast(tf.cast(corners, tf.float64) / hw, tf.float32)


def crop_and_resize(
    image: tf.Tensor,
    seed: tf.Tensor,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    interpolation: str,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Random resized crop of an (H, W, 3) image (uint8, or float with values in [0, 255])
    -> (uint8 (size, size, 3), the crop as float (y0, x0, y1, x1) fractions of the
    image)."""
    s_box, s_interp = _seeds(seed, 2)
    shape = tf.shape(image)
    box = random_resized_crop_box(s_box, shape[0], shape[1], scale, ratio)
    crop = image[box[0] : box[0] + box[2], box[1] : box[1] + box[3]]
    out = resize_crop(crop, s_interp, size, interpolation)
    return out, _box_fractions(box, shape[0], shape[1])


_JPEG_MARGIN = 16  # pixels: the largest MCU (4:2:0 chroma subsampling)


def decode_random_crop(
    data: tf.Tensor, seed: tf.Tensor, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Decodes only a random resized crop window of an encoded image: a JPEG's size comes
    from its header and only the window is decoded (`decode_and_crop_jpeg`); other formats
    are decoded whole and cropped. The box is the one `random_resized_crop_box` draws from
    the image's size, so the pixels are those of decoding the whole image and cropping it.

    Returns:
        (uint8 (h, w, 3) crop, int32 (top, left, h, w) box, int32 (height, width) of the
        image).
    """

    def jpeg() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        shape = tf.image.extract_jpeg_shape(data)[:2]
        box = random_resized_crop_box(seed, shape[0], shape[1], scale, ratio)
        # A window's last column (and row) is upsampled from subsampled chroma as an image
        # edge: a margin of one MCU (16 pixels) around the box keeps its pixels those of
        # the whole image.
        start = tf.maximum(box[:2] - _JPEG_MARGIN, 0)
        stop = tf.minimum(box[:2] + box[2:] + _JPEG_MARGIN, shape)
        window = tf.image.decode_and_crop_jpeg(
            data, tf.concat([start, stop - start], 0), channels=3
        )
        offset = box[:2] - start
        crop = window[offset[0] : offset[0] + box[2], offset[1] : offset[1] + box[3]]
        return crop, box, shape

    def other() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        shape = tf.shape(image)[:2]
        box = random_resized_crop_box(seed, shape[0], shape[1], scale, ratio)
        return image[box[0] : box[0] + box[2], box[1] : box[1] + box[3]], box, shape

    return tf.cond(tf.io.is_jpeg(data), jpeg, other)


# ---------------------------------------------------------------------------------------------
# RandAugment ops: uint8 (H, W, 3) images, as PIL's (timm's ops call PIL on uint8 images)
# ---------------------------------------------------------------------------------------------


def _on_uint8(op: Op) -> Op:
    """Runs a uint8 op on an image of another dtype too (integer values in [0, 255]; the
    result has the input's dtype); uint8 images go through as they are."""

    @functools.wraps(op)
    def wrapped(image: tf.Tensor, arg: tf.Tensor) -> tf.Tensor:
        image = tf.convert_to_tensor(image)
        arg = tf.cast(arg, tf.float32)
        if image.dtype == tf.uint8:
            return op(image, arg)
        pixels = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return tf.cast(op(pixels, arg), image.dtype)

    return wrapped


def _truncate_to_uint8(values: tf.Tensor) -> tf.Tensor:
    """float -> uint8 as PIL stores a float result: clipped to [0, 255], truncated."""
    return tf.cast(tf.clip_by_value(values, 0.0, 255.0), tf.uint8)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ImageEnhance (`Image.blend`): degenerate + factor * (image - degenerate) in
    float32, clipped, truncated to uint8. `degenerate`: float32, broadcastable to the image."""
    pixels = tf.cast(image, tf.float32)
    return _truncate_to_uint8(degenerate + factor * (pixels - degenerate))


def _grey(image: tf.Tensor, channels: int = 1) -> tf.Tensor:
    """PIL's 'L' conversion of a uint8 (H, W, 3) image, float32 (H, W, channels) with
    integer values (the grey level repeated): (19595 R + 38470 G + 7471 B + 2^15) >> 16,
    exact in float32 (integers below 2^24). A product with a (3, channels) matrix: the
    repeated grey costs no more than one, and broadcasting it over 3 channels would."""
    weights = tf.constant([[19595.0] * channels, [38470.0] * channels, [7471.0] * channels])
    shape = tf.shape(image)
    flat = tf.reshape(tf.cast(image, tf.float32), [-1, 3])
    weighted = tf.reshape(tf.matmul(flat, weights), tf.concat([shape[:2], [channels]], 0))
    return tf.floor((weighted + 32768.0) / 65536.0)


def _lut_index(image: tf.Tensor) -> tf.Tensor:
    """uint8 (H, W, 3) -> int32 (H, W, 3): channel c's level v as 256 c + v, the index of
    a (3, 256) table flattened (`bias_add`: cheaper than a broadcast add of a (3,) vector)."""
    return tf.nn.bias_add(tf.cast(image, tf.int32), tf.constant([0, 256, 512]))


def _apply_luts(index: tf.Tensor, luts: tf.Tensor) -> tf.Tensor:
    """int32 (H, W, 3) `_lut_index`, uint8 (3, 256) lookup table per channel -> uint8
    (H, W, 3)."""
    return tf.gather(tf.reshape(luts, [-1]), index)


def _histograms(index: tf.Tensor) -> tf.Tensor:
    """int32 (3, 256): each channel's histogram, from the image's `_lut_index`."""
    counts = tf.math.bincount(tf.reshape(index, [-1]), minlength=768, maxlength=768)
    return tf.reshape(counts, [3, 256])


def _affine(image: tf.Tensor, transform: tf.Tensor) -> tf.Tensor:
    """Output pixel (x, y) <- input (a x + b y + c, d x + e y + f) for PIL-style
    coefficients (a, b, c, d, e, f), bilinear, truncated to uint8 as PIL does; outside
    pixels get the fill colour. The image gets a border of the fill colour, and points
    beyond it take the nearest border pixel: the same as a constant fill per channel
    (the kernel's fill value is one scalar), in one float32 pass (its fastest dtype)."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    fill = tf.constant(FILL, tf.float32)
    pixels = tf.cast(image, tf.float32)
    side = tf.broadcast_to(fill, tf.stack([h, 1, 3]))
    pixels = tf.concat([side, pixels, side], axis=1)
    edge = tf.broadcast_to(fill, tf.stack([1, w + 2, 3]))
    pixels = tf.concat([edge, pixels, edge], axis=0)
    a, b, c, d, e, f = tf.unstack(tf.cast(transform, tf.float32))
    coeffs = tf.stack([a, b, c + 1.0, d, e, f + 1.0, 0.0, 0.0])[None]  # the border's offset
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=pixels[None],
        transforms=coeffs,
        output_shape=tf.stack([h, w]),
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="NEAREST",
    )[0]
    return _truncate_to_uint8(out)


@_on_uint8
def auto_contrast(image: tf.Tensor, _: tf.Tensor) -> tf.Tensor:
    """PIL ImageOps.autocontrast (cutoff 0): each channel's [lo, hi] stretched to [0, 255],
    the lookup table computed as PIL's (float64, truncated)."""
    lo = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float64)[:, None]  # (3, 1)
    hi = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float64)[:, None]
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    levels = tf.range(256, dtype=tf.float64)[None]
    stretched = tf.clip_by_value(tf.cast(levels * scale - lo * scale, tf.int32), 0, 255)
    luts = tf.where(hi > lo, stretched, tf.cast(levels, tf.int32))
    return _apply_luts(_lut_index(image), tf.cast(luts, tf.uint8))


@_on_uint8
def equalize(image: tf.Tensor, _: tf.Tensor) -> tf.Tensor:
    """PIL ImageOps.equalize: per channel, step = (pixels - count of the top level) // 255,
    level i -> (step // 2 + pixels below i) // step (the identity where step is 0)."""
    index = _lut_index(image)
    hist = _histograms(index)
    levels = tf.range(256)
    top = 255 - tf.argmax(tf.cast(hist[:, ::-1] > 0, tf.int32), axis=1, output_type=tf.int32)
    top_count = tf.gather(hist, top, batch_dims=1)
    step = (tf.reduce_sum(hist, axis=1) - top_count) // 255  # (3,)
    below = tf.cumsum(hist, axis=1, exclusive=True)
    luts = (below + (step // 2)[:, None]) // tf.maximum(step, 1)[:, None]
    luts = tf.where((step > 0)[:, None], tf.clip_by_value(luts, 0, 255), levels[None])
    return _apply_luts(index, tf.cast(luts, tf.uint8))


@_on_uint8
def invert(image: tf.Tensor, _: tf.Tensor) -> tf.Tensor:
    return tf.constant(255, tf.uint8) - image


def _rotation(degrees: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """PIL Image.rotate's affine coefficients: about the centre, counter-clockwise."""
    angle = -degrees * math.pi / 180.0
    cx, cy = tf.cast(width, tf.float32) / 2.0, tf.cast(height, tf.float32) / 2.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    return tf.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy])


@_on_uint8
def rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
    """PIL Image.rotate(degrees) about the centre (counter-clockwise)."""
    shape = tf.shape(image)
    return _affine(image, _rotation(degrees, shape[0], shape[1]))


@_on_uint8
def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    """Keeps the `bits` most significant bits (0 <= bits <= 8; 0 gives black)."""
    mask = tf.cast(256.0 - tf.pow(2.0, 8.0 - bits), tf.uint8)
    return tf.bitwise.bitwise_and(image, mask)


@_on_uint8
def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
    """Inverts the levels >= threshold (0 <= threshold <= 256; 256 inverts none)."""
    at_least = tf.cast(tf.minimum(threshold, 255.0), tf.uint8)
    # 255 - v = v XOR 255: XOR with 255 where v >= threshold (tf.where costs more).
    flips = tf.cast(image >= at_least, tf.uint8) * tf.constant(255, tf.uint8)
    return tf.cond(threshold <= 255.0, lambda: tf.bitwise.bitwise_xor(image, flips), lambda: image)


@_on_uint8
def solarize_add(image: tf.Tensor, add: tf.Tensor) -> tf.Tensor:
    """Adds `add` (0 <= add <= 255) to the levels below 128, saturating at 255."""
    room = tf.constant(255, tf.uint8) - image
    below = tf.cast(image < 128, tf.uint8)
    return image + below * tf.minimum(room, tf.cast(add, tf.uint8))


@_on_uint8
def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return _blend(_grey(image, channels=3), image, factor)


@_on_uint8
def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend with the grey image's mean level (PIL: int(mean + 0.5))."""
    mean = tf.floor(tf.reduce_mean(tf.cast(_grey(image), tf.float64)) + 0.5)
    return _blend(tf.cast(mean, tf.float32), image, factor)


@_on_uint8
def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return _truncate_to_uint8(factor * tf.cast(image, tf.float32))


@_on_uint8
def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend with PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13, rounded; the border
    pixels kept): a 3 x 3 box sum of shifted slices plus 4 x the centre, in float32 (exact:
    integers below 2^24)."""
    pixels = tf.cast(image, tf.float32)
    rows = pixels[:-2] + pixels[1:-1] + pixels[2:]  # (H - 2, W, 3)
    box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]  # (H - 2, W - 2, 3)
    centre = pixels[1:-1, 1:-1]
    # round(s / 13) = floor((s + 6) / 13) for an integer s (s / 13 is never a half).
    smooth = tf.floor((box + 4.0 * centre + 6.0) / 13.0)
    inner = _truncate_to_uint8(smooth + factor * (centre - smooth))
    middle = tf.concat([image[1:-1, :1], inner, image[1:-1, -1:]], axis=1)
    return tf.concat([image[:1], middle, image[-1:]], axis=0)


def _shear_rows(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Output (x, y) <- input (x + factor y, y), as `_affine` with a horizontal shear
    (bilinear, the fill colour beyond the image, truncated) in a few passes: row y is
    shifted by factor y, a whole number of pixels gathered from the row bordered with
    the fill colour and a fraction blended, one per row."""
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    shifts = factor * tf.cast(tf.range(height), tf.float32)  # (H,)
    whole = tf.floor(shifts)
    frac = (shifts - whole)[:, None, None]
    # Every source index (whole + x and one more) lies within `border` of the image.
    border = tf.cast(tf.reduce_max(tf.abs(whole)), tf.int32) + 1
    values = tf.cast(image, tf.float32)
    side = tf.broadcast_to(tf.constant(FILL, tf.float32), tf.stack([height, border, 3]))
    bordered = tf.concat([side, values, side], axis=1)
    index = tf.cast(whole, tf.int32)[:, None] + border + tf.range(width + 1)[None]
    extended = tf.gather(bordered, index, axis=1, batch_dims=1)  # (H, W + 1, 3)
    low, high = extended[:, :-1], extended[:, 1:]
    return tf.cast(low + frac * (high - low), tf.uint8)  # within [low, high]: no clip


@_on_uint8
def shear_x(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return _shear_rows(image, factor)


def _shear_columns(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Output (x, y) <- input (x, y + factor x): `_shear_rows` along columns, the rows
    gathered from the flattened image (a transpose there and back costs more)."""
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    shifts = factor * tf.cast(tf.range(width), tf.float32)  # (W,)
    whole = tf.floor(shifts)
    frac = (shifts - whole)[None, :, None]
    border = tf.cast(tf.reduce_max(tf.abs(whole)), tf.int32) + 1
    values = tf.cast(image, tf.float32)
    side = tf.broadcast_to(tf.constant(FILL, tf.float32), tf.stack([border, width, 3]))
    bordered = tf.reshape(tf.concat([side, values, side], axis=0), [-1, 3])
    rows = tf.range(height + 1)[:, None] + tf.cast(whole, tf.int32)[None] + border
    extended = tf.gather(bordered, rows * width + tf.range(width)[None])  # (H + 1, W, 3)
    low, high = extended[:-1], extended[1:]
    return tf.cast(low + frac * (high - low), tf.uint8)  # within [low, high]: no clip


@_on_uint8
def shear_y(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return _shear_columns(image, factor)


def _translate(image: tf.Tensor, pixels: tf.Tensor, axis: int) -> tf.Tensor:
    """Output index i <- input index i + pixels along `axis` (0: rows, 1: columns), as
    `_affine` with a translation (bilinear, the fill colour beyond the image, truncated)
    but in a few passes: the image shifted by floor(pixels) and by one more, blended by
    the fractional part."""
    shape = tf.shape(image)
    size = shape[axis]
    whole = tf.floor(pixels)
    frac = pixels - whole
    shift = tf.cast(whole, tf.int32)
    # Input indices shift .. shift + size (size + 1 of them); outside the image, the fill.
    start = tf.clip_by_value(shift, 0, size)
    stop = tf.clip_by_value(shift + size + 1, 0, size)
    before = tf.clip_by_value(-shift, 0, size + 1)
    after = size + 1 - before - (stop - start)
    values = tf.cast(image, tf.float32)
    fill = tf.constant(FILL, tf.float32)
    if axis == 0:
        inside = values[start:stop]
        before_shape, after_shape = [before, shape[1], 3], [after, shape[1], 3]
    else:
        inside = values[:, start:stop]
        before_shape, after_shape = [shape[0], before, 3], [shape[0], after, 3]
    extended = tf.concat(
        [
            tf.broadcast_to(fill, tf.stack(before_shape)),
            inside,
            tf.broadcast_to(fill, tf.stack(after_shape)),
        ],
        axis=axis,
    )
    if axis == 0:
        low, high = extended[:-1], extended[1:]
    else:
        low, high = extended[:, :-1], extended[:, 1:]
    # low + frac * (high - low) stays within [low, high] in float32 (frac < 1): no clip.
    return tf.cast(low + frac * (high - low), tf.uint8)


@_on_uint8
def translate_x(image: tf.Tensor, fraction: tf.Tensor) -> tf.Tensor:
    return _translate(image, fraction * tf.cast(tf.shape(image)[1], tf.float32), axis=1)


@_on_uint8
def translate_y(image: tf.Tensor, fraction: tf.Tensor) -> tf.Tensor:
    return _translate(image, fraction * tf.cast(tf.shape(image)[0], tf.float32), axis=0)


# ---------------------------------------------------------------------------------------------
# The geometric ops on a token-label score map [2, T, H, W] (values, class indices), as the
# official `tlt/data/random_augment_label.py`: scipy.ndimage.affine_transform, order 0
# (nearest: round half up), coefficients in (row, column) order; scores are 0 where the
# source coordinate leaves [0, size - 1] (mode 'constant'), indices repeat the edge (mode
# 'nearest').
# ---------------------------------------------------------------------------------------------


def _nearest_index(coords: tf.Tensor) -> tf.Tensor:
    """scipy's order-0 sample index of float64 coordinates: round half up."""
    return tf.cast(tf.floor(coords + 0.5), tf.int32)


def _f64(value: tf.Tensor | float) -> tf.Tensor:
    """The map ops compute coordinates in float64, as scipy does (a float32 coordinate can
    round to the other side of a half-location)."""
    return tf.cast(value, tf.float64)


def affine_label_map(label_map: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """`tlt` `affine_label`: [2, T, H, W] -> [2, T, H, W], output (r, c) <- input (a r + b c
    + c0, d r + e c + f) for matrix (a, b, c0, d, e, f), nearest; scores 0 outside the map
    (a coordinate beyond [0, size - 1]), indices those of the nearest edge location."""
    a, b, c0, d, e, f = tf.unstack(_f64(matrix))
    shape = tf.shape(label_map)
    h, w = shape[2], shape[3]
    rows = _f64(tf.range(h))[:, None]
    cols = _f64(tf.range(w))[None, :]
    coord_r = a * rows + b * cols + c0  # (H, W)
    coord_c = d * rows + e * cols + f
    # scipy's 'constant' mode: a sample is outside unless 0 <= coordinate <= size - 1.
    inside = (coord_r >= 0) & (coord_r <= _f64(h - 1)) & (coord_c >= 0) & (coord_c <= _f64(w - 1))
    src_r, src_c = _nearest_index(coord_r), _nearest_index(coord_c)
    flat_index = tf.clip_by_value(src_r, 0, h - 1) * w + tf.clip_by_value(src_c, 0, w - 1)
    flat = tf.reshape(label_map, tf.concat([shape[:2], [h * w]], 0))
    moved = tf.reshape(tf.gather(flat, tf.reshape(flat_index, [-1]), axis=2), shape)
    values = tf.where(inside, moved[0], 0.0)
    return tf.stack([values, moved[1]])


def rotate_label_map(label_map: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
    """`tlt` `rotate_label`: the image's rotation, about (H / 2, W / 2) in index units."""
    angle = _f64(degrees) * math.pi / 180.0
    shape = _f64(tf.shape(label_map))
    cr, cc = shape[2] / 2.0, shape[3] / 2.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    return affine_label_map(
        label_map,
        tf.stack([cos, sin, cr - cos * cr - sin * cc, -sin, cos, cc + sin * cr - cos * cc]),
    )


def _matrix(*entries: tf.Tensor | float) -> tf.Tensor:
    return tf.stack([_f64(entry) for entry in entries])


def shear_x_label_map(label_map: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return affine_label_map(label_map, _matrix(1.0, 0.0, 0.0, factor, 1.0, 0.0))


def shear_y_label_map(label_map: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return affine_label_map(label_map, _matrix(1.0, factor, 0.0, 0.0, 1.0, 0.0))


def translate_x_label_map(label_map: tf.Tensor, fraction: tf.Tensor) -> tf.Tensor:
    pixels = _f64(fraction) * _f64(tf.shape(label_map)[3])
    return affine_label_map(label_map, _matrix(1.0, 0.0, 0.0, 0.0, 1.0, pixels))


def translate_y_label_map(label_map: tf.Tensor, fraction: tf.Tensor) -> tf.Tensor:
    pixels = _f64(fraction) * _f64(tf.shape(label_map)[2])
    return affine_label_map(label_map, _matrix(1.0, 0.0, pixels, 0.0, 1.0, 0.0))


def _ops(increasing: bool) -> list[tuple[Op, LevelToArg, Op | None]]:
    """(image op, (level in [0, 10], random sign in {-1, 1}) -> the op's argument, score-map
    op or None) triples: timm's `_RAND_INCREASING_TRANSFORMS` (or `_RAND_TRANSFORMS`), their
    `*_level_to_arg`, and `tlt`'s `NAME_TO_LABELOP` (the geometric ops move the map)."""

    def enhance(level: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
        if increasing:
            return tf.maximum(0.1, 1.0 + sign * level / LEVEL_MAX * 0.9)
        return level / LEVEL_MAX * 1.8 + 0.1

    def posterize_bits(level: tf.Tensor, _: tf.Tensor) -> tf.Tensor:
        bits = tf.floor(level / LEVEL_MAX * 4.0)
        return 4.0 - bits if increasing else bits

    def solarize_threshold(level: tf.Tensor, _: tf.Tensor) -> tf.Tensor:
        value = tf.floor(level / LEVEL_MAX * 256.0)
        return 256.0 - value if increasing else value

    return [
        (auto_contrast, lambda level, sign: level, None),
        (equalize, lambda level, sign: level, None),
        (invert, lambda level, sign: level, None),
        (rotate, lambda level, sign: sign * level / LEVEL_MAX * 30.0, rotate_label_map),
        (posterize, posterize_bits, None),
        (solarize, solarize_threshold, None),
        (solarize_add, lambda level, sign: tf.floor(level / LEVEL_MAX * 110.0), None),
        (color, enhance, None),
        (contrast, enhance, None),
        (brightness, enhance, None),
        (sharpness, enhance, None),
        (shear_x, lambda level, sign: sign * level / LEVEL_MAX * 0.3, shear_x_label_map),
        (shear_y, lambda level, sign: sign * level / LEVEL_MAX * 0.3, shear_y_label_map),
        (
            translate_x,
            lambda level, sign: sign * level / LEVEL_MAX * 0.45,
            translate_x_label_map,
        ),
        (
            translate_y,
            lambda level, sign: sign * level / LEVEL_MAX * 0.45,
            translate_y_label_map,
        ),
    ]


Images = tuple[tf.Tensor, tf.Tensor | None]  # (image, score map or None)


def _rand_augment_layer(images: Images, seed: tf.Tensor, spec: RandAugmentSpec) -> Images:
    """One RandAugment layer: a random op, applied with probability spec.prob, to the
    image and (geometric ops) its score map."""
    ops = _ops(spec.increasing)
    s_op, s_apply, s_mag, s_sign = _seeds(seed, 4)
    index = tf.random.stateless_uniform([], s_op, 0, len(ops), dtype=tf.int32)
    level = tf.constant(spec.magnitude, tf.float32)
    if spec.magnitude_std > 0:
        level = level + spec.magnitude_std * tf.random.stateless_normal([], s_mag)
    level = tf.clip_by_value(level, 0.0, LEVEL_MAX)
    sign = tf.where(_uniform(s_sign) < 0.5, -1.0, 1.0)
    image, label_map = images
    if label_map is None:
        branches = [functools.partial(_apply_op, op, arg, image, level, sign) for op, arg, _ in ops]
        return (
            tf.cond(
                _uniform(s_apply) < spec.prob,
                lambda: tf.switch_case(index, branches),
                lambda: image,
            ),
            None,
        )
    branches = [
        functools.partial(_apply_op_with_map, op, arg, map_op, image, label_map, level, sign)
        for op, arg, map_op in ops
    ]
    return tf.cond(
        _uniform(s_apply) < spec.prob,
        lambda: tf.switch_case(index, branches),
        lambda: (image, label_map),
    )


def _apply_op(
    op: Op, arg: LevelToArg, image: tf.Tensor, level: tf.Tensor, sign: tf.Tensor
) -> tf.Tensor:
    return op(image, arg(level, sign))


def _apply_op_with_map(
    op: Op,
    arg: LevelToArg,
    map_op: Op | None,
    image: tf.Tensor,
    label_map: tf.Tensor,
    level: tf.Tensor,
    sign: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor]:
    value = arg(level, sign)
    return op(image, value), label_map if map_op is None else map_op(label_map, value)


def rand_augment(
    image: tf.Tensor,
    seed: tf.Tensor,
    spec: RandAugmentSpec,
    label_map: tf.Tensor | None = None,
) -> tf.Tensor | tuple[tf.Tensor, tf.Tensor]:
    """timm RandAugment of an (H, W, 3) image (uint8, or another dtype with integer values
    in [0, 255]: the ops run on uint8 and the result has the input's dtype); given its
    score map [2, T, h, w], returns (image, map), the geometric ops applied to both (the
    official `tlt` RandAugment)."""
    image = tf.convert_to_tensor(image)
    dtype = image.dtype
    if dtype != tf.uint8:
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    images: Images = (image, label_map)
    for layer_seed in _seeds(seed, spec.num_layers):
        images = _rand_augment_layer(images, layer_seed, spec)
    out = tf.cast(images[0], dtype)
    return out if label_map is None else (out, images[1])


# ---------------------------------------------------------------------------------------------
# Random erasing and the whole transform
# ---------------------------------------------------------------------------------------------


def random_erase(image: tf.Tensor, seed: tf.Tensor, prob: float) -> tf.Tensor:
    """timm RandomErasing(prob, mode='pixel', max_count=1) on a normalised (H, W, C) image:
    with probability `prob`, one box of standard normal noise (drawn in the box's shape,
    as timm's), assembled from slices (a `tf.where` over the image costs more)."""
    s_apply, s_area, s_ratio, s_top, s_left, s_noise = _seeds(seed, 6)
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    area = tf.cast(h * w, tf.float32)
    target = area * _uniform(s_area, [10], 0.02, 1 / 3)
    aspect = tf.exp(_uniform(s_ratio, [10], math.log(0.3), math.log(1 / 0.3)))
    eh = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
    ew = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
    fits = (ew < w) & (eh < h)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    eh, ew = eh[first], ew[first]
    top = _randint(s_top, 0, h - eh)
    left = _randint(s_left, 0, w - ew)

    def erased() -> tf.Tensor:  # Noise is drawn only for the images that are erased.
        noise = tf.random.stateless_normal(tf.stack([eh, ew, shape[2]]), s_noise, dtype=image.dtype)
        band = image[top : top + eh]
        band = tf.concat([band[:, :left], noise, band[:, left + ew :]], axis=1)
        return tf.concat([image[:top], band, image[top + eh :]], axis=0)

    return tf.cond(tf.reduce_any(fits) & (_uniform(s_apply) < prob), erased, lambda: image)


@dataclasses.dataclass(frozen=True)
class TrainAugment:
    """The switchable train augmentation (config.augment) and normalisation."""

    size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "random"
    hflip: float = 0.5
    randaugment: str = "rand-m9-mstd0.5-inc1"
    erase_prob: float = 0.25
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __call__(
        self, image: tf.Tensor, seed: tf.Tensor, label_map: tf.Tensor | None = None
    ) -> dict[str, tf.Tensor]:
        """uint8 (H, W, 3) image, int64 (2,) seed[, float32 score map [2, T, h, w] of the
        whole image] -> {'image': float32 (S, S, 3) normalised, 'crop_box': float32 (4,) the
        crop (y0, x0, y1, x1) as fractions of the (flipped, RandAugmented) image}, plus
        'label_map' (flipped and moved by RandAugment, as the image) with a score map, or
        'flip' (bool: the crop was mirrored after the box was taken) without one."""
        s_crop, s_flip, s_ra, s_erase = _seeds(seed, 4)
        if label_map is None:  # timm's order: crop, flip, RandAugment
            pixels, box = self._crop(image, s_crop)
            return self._after_crop(pixels, box, s_flip, s_ra, s_erase)
        # tlt's order: flip, RandAugment, crop last
        flip = _uniform(s_flip) < self.hflip
        spec = self._spec()
        if image.dtype != tf.uint8:
            image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        image, label_map = tf.cond(
            flip,
            lambda: (tf.reverse(image, [1]), tf.reverse(label_map, [-1])),
            lambda: (image, label_map),
        )
        if spec is not None:
            image, label_map = rand_augment(image, s_ra, spec, label_map)
        pixels, box = self._crop(image, s_crop)
        return {
            "image": self._normalise_and_erase(pixels, s_erase),
            "crop_box": box,
            "label_map": label_map,
        }

    def from_file(
        self, data: tf.Tensor, seed: tf.Tensor, label_map: tf.Tensor | None = None
    ) -> dict[str, tf.Tensor]:
        """The same as ``self(decoded image, seed, label_map)`` from the encoded image
        (a string scalar: JPEG, PNG, BMP, GIF). Without a score map only the crop window of
        a JPEG is decoded (:func:`decode_random_crop`); with one, RandAugment needs the
        whole image."""
        if label_map is not None:
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
            return self(image, seed, label_map)
        s_crop, s_flip, s_ra, s_erase = _seeds(seed, 4)
        s_box, s_interp = _seeds(s_crop, 2)
        crop, box, shape = decode_random_crop(
            data, s_box, tuple(self.crop_scale), tuple(self.crop_ratio)
        )
        pixels = resize_crop(crop, s_interp, self.size, self.interpolation)
        return self._after_crop(
            pixels, _box_fractions(box, shape[0], shape[1]), s_flip, s_ra, s_erase
        )

    def _spec(self) -> RandAugmentSpec | None:
        return parse_randaugment(self.randaugment) if self.randaugment else None

    def _after_crop(
        self,
        pixels: tf.Tensor,
        box: tf.Tensor,
        s_flip: tf.Tensor,
        s_ra: tf.Tensor,
        s_erase: tf.Tensor,
    ) -> dict[str, tf.Tensor]:
        """timm's steps after the crop: flip, RandAugment, normalisation, erasing."""
        flip = _uniform(s_flip) < self.hflip
        # tf.reverse: a strided slice with step -1 costs 10 times more.
        pixels = tf.cond(flip, lambda: tf.reverse(pixels, [1]), lambda: pixels)
        spec = self._spec()
        if spec is not None:
            pixels = rand_augment(pixels, s_ra, spec)
        return {"image": self._normalise_and_erase(pixels, s_erase), "crop_box": box, "flip": flip}

    def _normalise_and_erase(self, pixels: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """uint8 (S, S, 3) -> float32 (S, S, 3) normalised, randomly erased. The mean and
        std are constants of the image's shape: broadcasting a (3,) vector over the
        image costs about 10 times as much in TensorFlow's kernels (the same values)."""
        shape = (self.size, self.size, 3)
        mean = tf.constant(np.broadcast_to(np.asarray(self.mean, np.float32), shape))
        std = tf.constant(np.broadcast_to(np.asarray(self.std, np.float32), shape))
        pixels = (tf.cast(pixels, tf.float32) / 255.0 - mean) / std
        if self.erase_prob > 0:
            pixels = random_erase(pixels, seed, self.erase_prob)
        return tf.ensure_shape(pixels, (self.size, self.size, 3))

    def _crop(self, image: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return crop_and_resize(
            image,
            seed,
            self.size,
            tuple(self.crop_scale),
            tuple(self.crop_ratio),
            self.interpolation,
        )
