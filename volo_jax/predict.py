"""Classify images: volo-jax-predict --weights volo_d1_224.safetensors IMAGE...
(or python -m volo_jax.predict ...)

Prints, per image, the top-5 classes with their probabilities (softmax of the
model's eval logits), after timm's eval preprocessing for the model. The images go
through the model in batches of one size (--batch-size; the last one padded), and past a
handful of images their progress goes to stderr: a bar on a terminal, lines otherwise.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from volo_jax.cli import prog_name, run_cli
from volo_jax.data.transforms import eval_transform, imagenet_class_names, load_image
from volo_jax.logs import quiet_native_logs
from volo_jax.models import create_model, pretrained_cfg
from volo_jax.progress import Progress
from volo_jax.weights import load_weights_into, read_metadata


def load_classifier(weights: str, model_name: str | None = None) -> tuple[Any, dict, str]:
    """(model, variables, model name) for a weights file or directory, the model built
    for the default backend; `model_name` may pick another resolution of the same
    variant (the position embedding is resized)."""
    meta = read_metadata(weights)
    name = model_name or meta["model"]
    pretrained_cfg(name)  # an unknown name fails with the list of known ones
    overrides = dict(meta.get("overrides", {}))
    if name != meta["model"]:
        overrides.pop("img_size", None)  # the requested resolution wins
    model = create_model(name, **overrides)
    return model, load_weights_into(weights, model, name), name


def class_names(num_classes: int, meta: dict[str, Any]) -> list[str]:
    """Names of the classes: stored with the weights, ImageNet's, or 'class i'."""
    if meta.get("class_names"):
        return list(meta["class_names"])
    if num_classes == 1000:
        return imagenet_class_names()
    return [f"class {i}" for i in range(num_classes)]


#: Images per batch of `predict` (the command line's default --batch-size).
BATCH_SIZE = 32
#: The command line shows progress past this many images (a bar on a terminal, otherwise a
#: line at every tenth of the images).
PROGRESS_MIN_IMAGES = 8


@functools.partial(jax.jit, static_argnums=(0,))
def _probabilities(model: Any, variables: dict, batch: jax.Array) -> jax.Array:
    """Class probabilities of a batch."""
    logits = model.apply(variables, batch)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def predict(
    images: Sequence[np.ndarray],
    model: Any,
    variables: dict,
    model_name: str,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
) -> np.ndarray:
    """Class probabilities (N, num_classes) for uint8 RGB images (H, W, 3) of any size.

    The images go through the model in batches of exactly `batch_size` (the last one
    padded, the padding's outputs dropped), so one compiled program serves every call with
    the same model and batch size, whatever the number of images. `progress` advances by
    the images of each batch.
    """
    cfg = pretrained_cfg(model_name)
    size = model.img_size
    out = []
    for first in range(0, len(images), batch_size):
        chunk = images[first : first + batch_size]
        batch = np.zeros((batch_size, size, size, 3), np.float32)
        for i, im in enumerate(chunk):
            batch[i] = eval_transform(im, size, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)
        probs = _probabilities(model, variables, batch)
        out.append(np.asarray(probs)[: len(chunk)])
        if progress is not None:
            progress.update(len(chunk))
    if not out:
        return np.zeros((0, model.num_classes), np.float32)
    return np.concatenate(out)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog=prog_name("volo_jax.predict"), description="Top-5 classes of images."
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument(
        "--weights",
        required=True,
        help="a .safetensors weights file or a weights directory (what convert writes)",
    )
    parser.add_argument("--model", default=None, help="model name (default: the weights')")
    parser.add_argument("--top", type=int, default=5, help="how many classes to print")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=BATCH_SIZE,
        help=f"images per batch (default {BATCH_SIZE}, or fewer when there are fewer images)",
    )
    args = parser.parse_args()
    for flag, value in (("--batch-size", args.batch_size), ("--top", args.top)):
        if value < 1:
            parser.error(f"{flag} must be positive, got {value}")

    pixels = [load_image(path) for path in args.images]  # unreadable files fail first
    model, variables, name = load_classifier(args.weights, args.model)
    names = class_names(model.num_classes, read_metadata(args.weights))
    batch_size = min(args.batch_size, len(pixels))
    with Progress(
        len(pixels),
        unit="img",
        desc="predict",
        every=max(batch_size, -(-len(pixels) // 10)),
        enabled=len(pixels) > PROGRESS_MIN_IMAGES,
    ) as progress:
        probs = predict(pixels, model, variables, name, batch_size, progress)
    for path, p in zip(args.images, probs, strict=True):
        print(path)
        for k in np.argsort(-p)[: args.top]:
            print(f"  {p[k]:7.2%}  {names[k]}")
    return 0


def run() -> None:
    """The `volo-jax-predict` command."""
    quiet_native_logs()  # before anything imports TensorFlow
    run_cli(main)


if __name__ == "__main__":
    run()
