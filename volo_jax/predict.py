"""Classify images: python -m volo_jax.predict --model volo_d1_224 --weights DIR IMAGE...

Prints, per image, the top-5 classes with their probabilities (softmax of the
model's eval logits), after timm's eval preprocessing for the model.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from volo_jax.cli import run_cli
from volo_jax.data.transforms import eval_transform, imagenet_class_names, load_image
from volo_jax.models import create_model, pretrained_cfg
from volo_jax.ops.cpu import cpu_kernels, for_platform
from volo_jax.weights import load_weights_into, read_metadata


def load_classifier(weights: str, model_name: str | None = None) -> tuple[Any, dict, str]:
    """(model, variables, model name) for a weights directory; `model_name` may pick
    another resolution of the same variant (the position embedding is resized)."""
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


def predict(
    images: Sequence[np.ndarray], model: Any, variables: dict, model_name: str
) -> np.ndarray:
    """Class probabilities (N, num_classes) for uint8 RGB images (H, W, 3) of any size."""
    cfg = pretrained_cfg(model_name)
    batch = np.stack(
        [
            eval_transform(im, model.img_size, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)
            for im in images
        ]
    )
    device = jax.devices()[0]  # where the batch will run
    forward = for_platform(cpu_kernels(model.apply), device.platform)
    logits = jax.jit(forward)(variables, batch)
    return np.asarray(jax.nn.softmax(logits.astype(np.float32), axis=-1))


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m volo_jax.predict", description="Top-5 classes of images."
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--weights", required=True, help="weights directory (convert's --dst)")
    parser.add_argument("--model", default=None, help="model name (default: the weights')")
    parser.add_argument("--top", type=int, default=5, help="how many classes to print")
    args = parser.parse_args()

    pixels = [load_image(path) for path in args.images]  # unreadable files fail first
    model, variables, name = load_classifier(args.weights, args.model)
    names = class_names(model.num_classes, read_metadata(args.weights))
    probs = predict(pixels, model, variables, name)
    for path, p in zip(args.images, probs, strict=True):
        print(path)
        for k in np.argsort(-p)[: args.top]:
            print(f"  {p[k]:7.2%}  {names[k]}")
    return 0


if __name__ == "__main__":
    run_cli(main)
