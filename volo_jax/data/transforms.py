"""Image loading and the timm evaluation transform, reproduced bit-exactly in NumPy + PIL.

timm 1.0.x builds its eval transform (``create_transform(..., is_training=False)`` with the
default 'center' crop mode and a square input size) as::

    Resize(floor(input_size / crop_pct), interpolation)  # torchvision, shorter side
    CenterCrop(input_size)                               # torchvision, zero-pads small images
    ToTensor()                                           # uint8 -> float32 / 255
    Normalize(mean, std)                                 # float32 (x - mean) / std

:func:`eval_transform` performs the same operations in the same order and float32 precision,
but returns an HWC array (the layout our Flax models take) instead of a CHW tensor.

:func:`parse_randaugment` reads timm's RandAugment string ('rand-m9-mstd0.5-inc1') without
TensorFlow, so that a config is checked before the train augmentation (`augment.py`) loads.
"""

import dataclasses
import io
import math
import os
import re
from collections.abc import Sequence
from importlib import resources
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from volo_jax.errors import ConfigError, ImageReadError

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

# The PIL filters that torchvision maps timm's interpolation names to.
_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
INTERPOLATIONS = tuple(_PIL_FILTERS)


def _open_rgb(file: str | os.PathLike | BinaryIO, source: str) -> np.ndarray:
    """Decodes an image file fully and returns it as uint8 RGB, shape (H, W, 3)."""
    try:
        with Image.open(file) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise ImageReadError(f"Cannot read image {source}: file not found.") from None
    except UnidentifiedImageError:
        reason = "not a recognised image format"
        raise ImageReadError(f"Cannot read image {source}: {reason}.") from None
    except OSError as e:  # Truncated or otherwise corrupt data, unreadable file.
        raise ImageReadError(f"Cannot read image {source}: {e}") from e


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Loads an image file the way timm does (``PIL.Image.open(path).convert('RGB')``).

    Returns:
        uint8 array of shape (H, W, 3).

    Raises:
        ImageReadError: the file is missing, is not an image, or is truncated/corrupt.
    """
    return _open_rgb(path, str(path))


def decode_image(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decodes encoded image bytes (JPEG, PNG, ...) like :func:`load_image` does a file.

    Args:
        data: the encoded image file content.
        source: what the bytes are (a path, a dataset record id), used in error messages.

    Returns:
        uint8 array of shape (H, W, 3).
    """
    return _open_rgb(io.BytesIO(data), source)


def _to_pil_rgb(image: np.ndarray | Image.Image) -> Image.Image:
    """Returns an RGB PIL image from a PIL image or a uint8 (H, W), (H, W, 1|3|4) array."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"Expected a uint8 image array, got dtype {array.dtype}.")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"Expected an image of shape (H, W[, 1|3|4]), got {array.shape}.")
    return Image.fromarray(array).convert("RGB")


def _resize_shorter_side(image: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Resizes so the shorter side is ``size``, as torchvision ``Resize(int)`` does on PIL."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)  # torchvision truncates the long side
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    if new_size == image.size:
        return image
    return image.resize(new_size, _PIL_FILTERS[interpolation])


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``CenterCrop(size)``: zero-pad sides shorter than ``size``, then crop.

    Args:
        image: array of shape (H, W, C).

    Returns:
        array of shape (size, size, C).
    """
    pad_h, pad_w = max(size - image.shape[0], 0), max(size - image.shape[1], 0)
    if pad_h or pad_w:  # The smaller half of the padding goes top / left.
        image = np.pad(
            image, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
        )
    # torchvision rounds the offset with Python's round() (half to even).
    top = round((image.shape[0] - size) / 2.0)
    left = round((image.shape[1] - size) / 2.0)
    return image[top : top + size, left : left + size]


def eval_resize_crop(
    image: np.ndarray | Image.Image,
    input_size: int,
    crop_pct: float,
    interpolation: str = "bicubic",
) -> np.ndarray:
    """timm's eval transform up to the crop: resize the shorter side to
    floor(input_size / crop_pct) with PIL, centre crop (zero-padding a smaller image).

    Args:
        image, input_size, crop_pct, interpolation: see :func:`eval_transform`.

    Returns:
        uint8 array of shape (input_size, input_size, 3).
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"Unsupported interpolation {interpolation!r}; expected one of {INTERPOLATIONS}."
        )
    if crop_pct <= 0:
        raise ValueError(f"crop_pct must be positive, got {crop_pct}.")
    scale_size = math.floor(input_size / crop_pct)
    resized = _resize_shorter_side(_to_pil_rgb(image), scale_size, interpolation)
    return _center_crop(np.asarray(resized), input_size)


def normalize(
    pixels: np.ndarray,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> np.ndarray:
    """uint8 (..., 3) -> float32 (pixels / 255 - mean) / std, as torchvision's ToTensor and
    Normalize (float32, in this order)."""
    scaled = pixels.astype(np.float32) / np.float32(255)
    return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def eval_transform(
    image: np.ndarray | Image.Image,
    input_size: int,
    crop_pct: float,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> np.ndarray:
    """timm's eval transform: resize shorter side, center crop, scale to [0, 1], normalize.

    Args:
        image: a PIL image (any mode) or a uint8 array of shape (H, W), (H, W, 1), (H, W, 3)
            or (H, W, 4); grayscale is replicated to RGB and alpha is dropped.
        input_size: side of the square model input.
        crop_pct: the image is resized so its shorter side is floor(input_size / crop_pct)
            before cropping; > 1 means the crop is larger than the image (zero padding).
        interpolation: 'bicubic', 'bilinear', 'nearest' or 'lanczos' (PIL filters).
        mean, std: per-channel normalization constants in [0, 1] units, shape (3,).

    Returns:
        float32 array of shape (input_size, input_size, 3).
    """
    return normalize(eval_resize_crop(image, input_size, crop_pct, interpolation), mean, std)


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names (first WordNet lemma) in class-index order."""
    text = resources.files(__package__).joinpath("imagenet_classes.txt").read_text("utf-8")
    return text.splitlines()


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed timm RandAugment string."""

    magnitude: float = 9.0
    num_layers: int = 2
    magnitude_std: float = 0.0
    increasing: bool = False
    prob: float = 0.5


def parse_randaugment(spec: str) -> RandAugmentSpec:
    """'rand-m9-mstd0.5-inc1' -> RandAugmentSpec; ConfigError on anything else."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ConfigError(f"config.augment.randaugment: expected 'rand-m9-...', got {spec!r}")
    fields = {
        "m": ("magnitude", float),
        "n": ("num_layers", int),
        "mstd": ("magnitude_std", float),
        "inc": ("increasing", lambda v: bool(int(v))),
        "p": ("prob", float),
    }
    values = {}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)([0-9.]+)", part)
        if not match or match.group(1) not in fields:
            raise ConfigError(
                f"config.augment.randaugment: unknown part {part!r} in {spec!r}; "
                f"known: {', '.join(k + 'N' for k in fields)}"
            )
        name, cast = fields[match.group(1)]
        values[name] = cast(match.group(2))
    return RandAugmentSpec(**values)
