"""Runs the official token-labeling code on given inputs, in its own process (PyTorch; the
tests that call it import TensorFlow, and the two in one process can crash).

  python tests/support/official_token_labeling_worker.py IN.npz OUT.npz

The official code is the `tlt` package (TokenLabeling, which sail-sg/volo trains with; on
PyPI as `tlt`); its `tlt.loss.TokenLabelCrossEntropy(ground_truth=...)` computes what
sail-sg/volo's `loss/cross_entropy.py` TokenLabelGTCrossEntropy / TokenLabelCrossEntropy
do (the same lines). `tlt` was written for timm 0.4.5;
two names it imports moved in later timm and are aliased here before the import. Exits
with status 3 and a message when `tlt` is not installed.

Inputs (IN.npz) and what OUT.npz gets for them:
  op_maps (M, 2, T, H, W), op_names (M,) str, op_args (M,) -> op_out: the `tlt` score-map op
      (`tlt.data.random_augment_label.NAME_TO_LABELOP[name]`) of each map and argument.
  flip_map (2, T, H, W) -> flip_out: `RandomHorizontalFlipWithLabel(p=1)`'s map.
  crop_maps (B, 2, T, S, S), crop_params (B, 4) int (top, left, height, width) of an image
      of crop_image_hw (2,), labels (B,), num_classes, grid, smoothing -> crop_coords (B, 4):
      the coordinates `RandomResizedCropAndInterpolationWithCoords` stores and
      `get_labelmaps_with_coords` reads, and targets (B, K, 2 + grid**2): `mixup_target`'s
      (ground truth, class target, token targets) at lam 1 (VOLO trains without mixup).
  crop_draws -> crop_draws (crop_draws, 4): the crop's own (top, left, height, width) draws
      (its `get_params`, timm's) on that image at scale (0.08, 1), ratio (3/4, 4/3).
  logits (B, K), aux (B, grid**2, K), mix_box (4,) (bbx1, bby1, bbx2, bby2) on the grid ->
      loss_gt, loss_plain: `TokenLabelCrossEntropy` with and without ground_truth (VOLO's
      --ground-truth) on those outputs and `targets`.
  ra_image (h, w, 3) uint8, ra_map (2, T, H, W), ra_draws, ra_spec -> ra_moved (ra_draws,):
      whether `tlt`'s RandAugment moved the map, one draw per seed 0..ra_draws-1.
"""

from __future__ import annotations

import sys

import numpy as np


def _import_tlt():
    import timm.data.transforms as timm_transforms

    if not hasattr(timm_transforms, "_pil_interp"):  # renamed after timm 0.4.x
        timm_transforms._pil_interp = timm_transforms.str_to_pil_interp
    try:
        import tlt.data  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("tlt"):
            sys.stderr.write(
                "tlt, the official token-labeling code, is not installed: "
                "pip install tlt==0.2.0 (in the test extra)\n"
            )
            sys.exit(3)
        raise
    import tlt.data.label_transforms_factory as factory
    import tlt.data.mixup as mixup
    import tlt.data.random_augment_label as random_augment_label

    # PosterizeIncreasing keeps 0 bits at magnitude 10; the PIL of 2021 made that a black
    # image, today's raises.
    posterize = random_augment_label.posterize

    def posterize_zero_bits(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return img.point(lambda _: 0)
        return posterize(img, bits_to_keep, **kwargs)

    for name, op in random_augment_label.NAME_TO_OP.items():
        if op is posterize:
            random_augment_label.NAME_TO_OP[name] = posterize_zero_bits
    return factory, mixup, random_augment_label


def main(src: str, dst: str) -> None:
    import random

    import torch
    from PIL import Image

    factory, mixup, random_augment_label = _import_tlt()
    data = np.load(src, allow_pickle=False)
    out: dict[str, np.ndarray] = {}

    ops = random_augment_label.NAME_TO_LABELOP
    out["op_out"] = np.stack(
        [
            ops[str(name)](torch.from_numpy(m.copy()), float(arg)).numpy()
            for m, name, arg in zip(data["op_maps"], data["op_names"], data["op_args"], strict=True)
        ]
    )

    flip = factory.RandomHorizontalFlipWithLabel(p=1.0)
    _, flipped = flip(Image.new("RGB", (4, 4)), torch.from_numpy(data["flip_map"].copy()))
    out["flip_out"] = flipped.numpy()

    crop = factory.RandomResizedCropAndInterpolationWithCoords(size=8, interpolation="bilinear")
    img_h, img_w = (int(v) for v in data["crop_image_hw"])
    image = Image.new("RGB", (img_w, img_h))
    maps = []
    for label_map, params, label in zip(
        data["crop_maps"], data["crop_params"], data["labels"], strict=True
    ):
        crop.get_params = lambda img, scale, ratio, p=params: tuple(int(v) for v in p)
        _, with_coords = crop(image, torch.from_numpy(label_map.copy()))
        with_coords[-1, 0, 0, 5] = int(label)  # as tlt's DatasetTokenLabel.__getitem__
        maps.append(with_coords)
    batch = torch.stack(maps)
    coords = batch[:, 2, 0, 0, :4].clone()
    coords[:, 2:] += coords[:, :2]
    out["crop_coords"] = coords.numpy()
    random.seed(0)
    out["crop_draws"] = np.array(
        [
            factory.RandomResizedCropAndInterpolationWithCoords.get_params(
                image, (0.08, 1.0), (3 / 4, 4 / 3)
            )
            for _ in range(int(data["crop_draws"]))
        ]
    )
    num_classes, grid = int(data["num_classes"]), int(data["grid"])
    targets = mixup.mixup_target(
        batch,
        num_classes,
        lam=1.0,
        smoothing=float(data["smoothing"]),
        device="cpu",
        label_size=grid,
    )
    out["targets"] = targets.numpy()

    from tlt.loss import TokenLabelCrossEntropy

    logits = torch.from_numpy(data["logits"])
    aux = torch.from_numpy(data["aux"])
    box = tuple(int(v) for v in data["mix_box"])
    for name, ground_truth in (("loss_gt", True), ("loss_plain", False)):
        loss_fn = TokenLabelCrossEntropy(
            dense_weight=0.5, cls_weight=1.0, ground_truth=ground_truth
        )
        out[name] = np.asarray(loss_fn((logits, aux, box), targets).item(), np.float64)

    hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}
    augment = random_augment_label.rand_augment_transform(str(data["ra_spec"]), hparams)
    ra_image = Image.fromarray(data["ra_image"])
    ra_map = torch.from_numpy(data["ra_map"].copy())
    moved = []
    for seed in range(int(data["ra_draws"])):
        random.seed(seed)
        np.random.seed(seed)
        _, result = augment(ra_image, ra_map.clone())
        moved.append(not torch.equal(result.float(), ra_map))
    out["ra_moved"] = np.asarray(moved)

    np.savez(dst, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
