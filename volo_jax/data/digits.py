"""scikit-learn's handwritten digits (1797 8x8 grey images, 10 classes) as an image
folder, so that training and evaluation read them like any other folder dataset.

`prepare_digits_folder(root)` writes root/train/<digit>/<index>.png and
root/test/<digit>/<index>.png once: a fixed, stratified held-out split of
`TEST_SIZE` images (seed 0). Pixel values 0..16 become 0..255; the pipeline upscales.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
from PIL import Image

TEST_SIZE = 360
SPLIT_SEED = 0
_DONE = "COMPLETE"


def digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images uint8 (1437, 8, 8), labels (1437,)), 'test': (... (360, ...))}."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        digits.target,
        test_size=TEST_SIZE,
        stratify=digits.target,
        random_state=SPLIT_SEED,
    )
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


def prepare_digits_folder(root: str) -> str:
    """Writes the digits folder under `root` unless it is already complete; returns root."""
    if os.path.exists(os.path.join(root, _DONE)):
        return root
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".digits-")
    for split, (images, labels) in digits_splits().items():
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = os.path.join(tmp, split, str(label))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(image).save(os.path.join(folder, f"{index:04d}.png"))
    open(os.path.join(tmp, _DONE), "w").close()
    if os.path.exists(root):  # an incomplete earlier attempt
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root
