"""The shared base of all configs: the official VOLO ImageNet recipe at 224.

Every field can be overridden on the command line (`--config.batch_size=256`);
`volo_jax.training.config.validate_config` checks the result.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from volo_jax.sharding.rules import DEFAULT_RULES

# The official per-variant learning rate (for a total batch of 1024) and stochastic depth.
BASE_LR = {"d1": 1.6e-3, "d2": 1e-3, "d3": 1e-3, "d4": 1e-3, "d5": 8e-4}
DROP_PATH = {"d1": 0.1, "d2": 0.2, "d3": 0.5, "d4": 0.5, "d5": 0.75}


def get_base_config() -> ml_collections.ConfigDict:
    """ImageNet-1k training of volo_d1 at 224 as the official `main.py` and README."""
    config = ml_collections.ConfigDict()
    config.mode = "train"  # 'train' or 'eval'
    config.seed = 42

    # Model: a registered name, its input size, and overrides of any VOLO field.
    config.model = "volo_d1_224"
    config.img_size = 224
    config.model_overrides = ml_collections.ConfigDict(
        {
            "drop_path_rate": DROP_PATH["d1"],
            "remat": False,
            # The outlooker stage's token mixer (the paper's ablation), its keyword
            # arguments as JSON (e.g. '{"block_size": 2}' for halo on a small grid),
            # and how outlook attention runs ('auto', 'reference', 'slices', 'planes', 'pallas').
            "token_mixer": "outlook",
            "token_mixer_kwargs": "",
            "outlook_impl": "auto",
        }
    )
    config.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (params stay float32)
    # jax_default_matmul_precision for the steps (None: JAX's default). 'bfloat16' keeps a
    # float32 model but gives its products bf16 operands, as TPUs do by default; on a CPU
    # with AMX it is the fastest setting (docs/performance.md).
    config.matmul_precision = config_dict.placeholder(str)
    # A weights directory (python -m volo_jax.convert ...) to start from, and regexes of
    # parameter paths not to load from it (e.g. "^params/(head|aux_head)/" for new classes).
    config.init_from = config_dict.placeholder(str)
    config.init_skip = ()
    config.requires_init = False  # fine-tuning configs set it: init_from is then required

    # Data: a TFDS name or a directory of <split>/<class>/<image> ('sklearn_digits' is built in).
    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "imagenet2012"
    config.dataset.data_dir = config_dict.placeholder(str)
    config.dataset.train_split = "train"
    config.dataset.eval_split = "validation"
    config.dataset.num_classes = 1000
    config.dataset.image_key = "image"
    config.dataset.label_key = "label"
    config.dataset.shuffle_buffer = 16_384
    config.dataset.num_eval_examples = config_dict.placeholder(int)  # None: the whole split

    # Train augmentation (timm's create_transform arguments of the official recipe): a random
    # resized crop, then each of flip, RandAugment and erasing (off with 0 / '').
    config.augment = ml_collections.ConfigDict()
    config.augment.crop_scale = (0.08, 1.0)
    config.augment.crop_ratio = (3 / 4, 4 / 3)
    config.augment.interpolation = "random"  # 'bilinear', 'bicubic' or 'random' (either)
    config.augment.hflip = 0.5
    config.augment.randaugment = "rand-m9-mstd0.5-inc1"  # '' disables it
    config.augment.erase_prob = 0.25  # random erasing, per-pixel normal noise

    # Pixel normalisation of training and evaluation inputs, in [0, 1] units.
    config.mean = (0.485, 0.456, 0.406)
    config.std = (0.229, 0.224, 0.225)

    # Evaluation preprocessing: None takes the model's pretrained_cfg.
    config.eval = ml_collections.ConfigDict()
    config.eval.crop_pct = config_dict.placeholder(float)
    config.eval.interpolation = config_dict.placeholder(str)
    config.eval.batch_size = 256

    # Optimisation: AdamW, lr = base_lr * batch_size / 1024, warmup then cosine, cooldown.
    config.batch_size = 1024
    config.grad_accum_steps = 1  # micro-batches per step (the batch is split, one update)
    config.num_epochs = 300
    config.cooldown_epochs = 10
    config.optim = ml_collections.ConfigDict()
    config.optim.base_lr = BASE_LR["d1"]
    config.optim.lr_batch_base = 1024
    config.optim.warmup_epochs = 20
    config.optim.warmup_lr = 1e-6
    config.optim.min_lr = 1e-5
    config.optim.weight_decay = 0.05
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.grad_clip_norm = 0.0  # 0: no clipping (the official default)
    config.ema_decay = 0.0  # 0: no EMA of the parameters (official: off; 0.99992 when on)
    config.label_smoothing = 0.1

    # Token labeling: loss = cls_weight * CE(class) + dense_weight * CE(aux tokens).
    config.token_label = ml_collections.ConfigDict()
    config.token_label.cls_weight = 1.0
    config.token_label.dense_weight = 0.5
    config.token_label.mix_token = True
    config.token_label.mix_beta = 1.0
    # MixToken pairs image b with the mirror image of its group of mix_group_size consecutive
    # images of the (micro-)batch, each group drawing its own box, as the official code, which
    # pairs within each GPU's 128 images; a (micro-)batch of at most this many images is one
    # group. It must divide a larger (micro-)batch. When it also divides each device's share
    # of the batch, mixing moves no data between devices.
    config.token_label.mix_group_size = 128
    # Directory of precomputed score maps (<data_dir>/<class>/<image stem>.pt as released,
    # or .npy: float [2, 5, H, W], top-5 values and class indices per location).
    config.token_label.data_dir = config_dict.placeholder(str)
    # Mix the annotator's class target with the label (no effect without an annotator).
    config.token_label.ground_truth = False
    config.token_label.roi_samples = 2  # ROI-align sampling points per bin and axis
    # Online teacher instead: a registered model and its weights directory.
    config.teacher = ml_collections.ConfigDict()
    config.teacher.model = config_dict.placeholder(str)
    config.teacher.init_from = config_dict.placeholder(str)

    # Devices: the mesh ('data', 'fsdp', 'model'; one -1 takes the remaining devices) and how
    # the train state is laid out on it (volo_jax/sharding/rules.py): 'auto' (the rules as
    # given), 'replicated' (data parallel), 'fsdp' (params and optimizer state split over
    # 'fsdp') or 'tensor' (heads and MLP split over 'model'). The batch is split over
    # data x fsdp.
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    config.sharding = "auto"
    config.sharding_rules = ml_collections.ConfigDict(dict(DEFAULT_RULES))
    # Multi-host: `enabled` calls jax.distributed.initialize(), which finds the cluster on
    # Cloud TPU, Slurm, Open MPI and k8s; elsewhere give all three of coordinator_address
    # (process 0's 'host:port'), num_processes and process_id (they imply enabled). On the
    # CPU, cross-process collectives use gloo.
    config.distributed = ml_collections.ConfigDict(
        {
            "enabled": False,
            "coordinator_address": config_dict.placeholder(str),
            "num_processes": config_dict.placeholder(int),
            "process_id": config_dict.placeholder(int),
            "initialization_timeout": 300,  # seconds to wait for all processes
        }
    )

    # Bookkeeping.
    config.log_every_steps = 100
    config.eval_every_steps = config_dict.placeholder(int)  # None: once per epoch
    config.checkpoint_every_steps = config_dict.placeholder(int)  # None: once per epoch
    config.keep_checkpoints = 3  # the last N, and the best by eval accuracy
    config.max_steps = config_dict.placeholder(int)  # stop early (the schedule is unchanged)
    return config


def variant_config(variant: str) -> ml_collections.ConfigDict:
    """The 224 training recipe of volo_{variant} ('d1' ... 'd5')."""
    config = get_base_config()
    config.model = f"volo_{variant}_224"
    config.model_overrides.drop_path_rate = DROP_PATH[variant]
    config.optim.base_lr = BASE_LR[variant]
    return config


def finetune_config(variant: str, img_size: int) -> ml_collections.ConfigDict:
    """Official fine-tuning of the 224 weights of volo_{variant} at `img_size`.

    lr 8e-6 -> 4e-6, weight decay 1e-8, 30 epochs (+10 cooldown), 5 warmup, class
    target mixed with the ground truth; `init_from` (the 224 weights) is required and
    the position embedding is resized when they are loaded.
    """
    config = variant_config(variant)
    config.model = f"volo_{variant}_{img_size}"
    config.img_size = img_size
    config.requires_init = True
    config.batch_size = 512
    config.optim.base_lr = 8e-6
    config.optim.lr_batch_base = 512  # the fine-tuning lr is for its own batch of 512
    config.optim.min_lr = 4e-6
    config.optim.weight_decay = 1e-8
    config.optim.warmup_epochs = 5
    config.num_epochs = 30
    config.token_label.ground_truth = True
    return config
