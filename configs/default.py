"""The embedded default: a small VOLO on scikit-learn's handwritten digits, CPU-sized.

1797 8x8 grey digits (they ship with scikit-learn) are written once as an image folder
under WORKDIR/data (a fixed held-out split of 360 test images) and upscaled to 32x32;
a 4-stage VOLO of 0.8M parameters trains with the official loss (token labeling with
MixToken, label smoothing), AdamW and a warmup + cosine schedule, and a light
augmentation (random resized crop only; digits must not be flipped).

  python main.py --config=configs/default.py --workdir=/tmp/digits
"""

import ml_collections

from configs.common import get_base_config


def get_config() -> ml_collections.ConfigDict:
    config = get_base_config()
    config.img_size = 32
    config.model_overrides.update(
        {
            "layers": (1, 1, 1, 1),
            "embed_dims": (64, 128, 128, 128),
            "num_heads": (2, 4, 4, 4),
            "stem_hidden_dim": 32,
            "mlp_ratio": 2.0,
            "drop_path_rate": 0.0,
            "remat": False,
        }
    )

    config.dataset.name = "sklearn_digits"
    config.dataset.num_classes = 10
    config.dataset.train_split = "train"
    config.dataset.eval_split = "test"

    config.augment.crop_scale = (0.5, 1.0)
    config.augment.interpolation = "bicubic"
    config.augment.hflip = 0.0
    config.augment.randaugment = ""
    config.augment.erase_prob = 0.0
    config.eval.crop_pct = 1.0
    config.eval.interpolation = "bicubic"
    config.eval.batch_size = 120

    config.train.batch_size = 64
    config.train.num_epochs = 40
    config.train.cooldown_epochs = 0
    config.optim.base_lr = 1e-3
    config.optim.lr_batch_base = 64
    config.optim.warmup_epochs = 3
    config.optim.per_epoch_schedule = False  # a smooth lr curve for a short run
    config.log_every_steps = 22
    config.eval_every_steps = 110
    config.checkpoint_every_steps = 110
    return config
