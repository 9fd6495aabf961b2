"""Transfer learning: converted or trained weights, fine-tuned on your images.

  python main.py --config=configs/finetune.py --workdir=runs/flowers \\
      --config.init_from=volo_d1_224.safetensors --config.dataset.name=/data/flowers

- The model is the one the weights hold (any registered model, with the overrides stored
  with them), at its resolution unless --config.img_size says otherwise (the position
  embedding is resized).
- The data: an image folder DIR/{train,validation}/<class>/<image>, or a prepared TFDS
  dataset with its split names, e.g. --config.dataset.name=oxford_flowers102 (train /
  validation) or cifar10 (--config.dataset.eval_split=test). The classes and their names
  come from the data; when their number differs from the weights', the classifier starts
  afresh (a log line says so) and the final weights carry the names, which
  volo-jax-predict prints.
- The recipe, for a small dataset (a few thousand images) and timm's habits: the schedule
  in steps (1,000 steps, 100 of warmup, cosine to 1e-6), batch 64, AdamW at 1e-4 with
  weight decay 0.05, label smoothing 0.1, the main.py augmentation without RandAugment and
  erasing, cross-entropy on the model's output (token labeling off: turn it on with
  --config.token_label.enabled=True on a VOLO), eval every 250 steps and at the end. SGD (momentum
  0.9): --config.optim.name=sgd --config.optim.base_lr=0.01 --config.optim.weight_decay=1e-4.
"""

import ml_collections
from ml_collections import config_dict

from configs.common import get_base_config


def get_config() -> ml_collections.ConfigDict:
    config = get_base_config()
    config.model = config_dict.placeholder(str)  # None: the model init_from holds
    config.img_size = config_dict.placeholder(int)  # None: that model's
    config.requires_init = True
    config.init_antialias = True  # timm's resize of the position embedding
    config.model_overrides.drop_path_rate = 0.1

    config.dataset.name = config_dict.placeholder(str)  # required: a folder or TFDS name
    config.dataset.num_classes = config_dict.placeholder(int)  # None: from the data
    config.dataset.shuffle_buffer = 4096

    config.train.batch_size = 64
    config.train.num_steps = 1000
    config.train.ema_decay = 0.0
    config.optim.name = "adamw"
    config.optim.base_lr = 1e-4
    config.optim.lr_batch_base = 64
    config.optim.warmup_steps = 100
    config.optim.warmup_lr = 1e-6
    config.optim.min_lr = 1e-6
    config.optim.weight_decay = 0.05
    config.optim.per_epoch_schedule = False

    config.augment.randaugment = ""
    config.augment.erase_prob = 0.0
    config.token_label.enabled = False

    config.eval.batch_size = 64
    config.log_every_steps = 50
    config.eval_every_steps = 250
    config.checkpoint_every_steps = 250
    return config
