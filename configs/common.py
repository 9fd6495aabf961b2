"""The shared base of all configs: the official VOLO ImageNet recipe at 224.

Every field can be overridden on the command line (`--config.train.batch_size=256`);
`volo_jax.training.config.validate_config` checks the result. The sections follow what
reads them: `train` (the step, the schedule's length, the train input), `optim` (AdamW and
the lr schedule), `eval`, `augment`, `token_label` and `teacher` (the targets), `dataset`,
`mesh` / `sharding` / `distributed` (devices); the model and the run's bookkeeping sit at
the top level.

Where the numbers come from: "README" is sail-sg/volo's README (its training commands for
D1-D3), "main.py" the defaults of sail-sg/volo's main.py, "tlt" its token-labeling package
(TokenLabeling), "timm 0.4.5" the timm version VOLO pins, "paper" the VOLO paper (arXiv
2106.13112), and "our choice" a value no official source gives. docs/training.md lists
what still differs from the official training and what each difference is expected to do.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from volo_jax.sharding.rules import DEFAULT_RULES

# The per-variant learning rate (for a total batch of 1024) and stochastic depth at 224:
# D1-D3 from the README's commands (8 GPUs x 128 images); D4 and D5 from the paper's
# hyper-parameter table (base lr 1e-3 and 8e-4 per 1024 images, drop path 0.5 and 0.75;
# the README has no D4/D5 commands). The rest of the 224 recipe (epochs, warmup,
# augmentation, ...) is main.py's defaults for every variant.
BASE_LR = {"d1": 1.6e-3, "d2": 1e-3, "d3": 1e-3, "d4": 1e-3, "d5": 8e-4}
DROP_PATH = {"d1": 0.1, "d2": 0.2, "d3": 0.5, "d4": 0.5, "d5": 0.75}

# Fine-tuning (total batch, MixToken group = images per GPU): the README's commands
# for D1 at 384 (8 x 64), D2 at 384 (8 x 48) and D3 at 448 (8 x 30), all at lr 8e-6
# whatever the batch. D4 (448) and D5 (448, 512) have no official fine-tuning command:
# our choice is the README's D3-at-448 recipe (8 x 30 images, lr 8e-6); the paper's text
# gives batch 512 and lr 5e-6 for fine-tuning instead.
FINETUNE_BATCH = {
    "d1": (512, 64),
    "d2": (384, 48),
    "d3": (240, 30),
    "d4": (240, 30),
    "d5": (240, 30),
}


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
            # The outlooker stage's token mixer (the paper's ablation), how outlook
            # attention runs ('auto', 'reference', 'slices', 'planes', 'pallas') and how
            # the transformer stages' self-attention does ('auto', 'xla', 'explicit',
            # 'cudnn', 'pallas'; 'auto': the platform's, volo_jax.platforms.RULES).
            "token_mixer": "outlook",
            "outlook_impl": "auto",
            "attention_impl": "auto",
        }
    )
    # The token mixer's keyword arguments (e.g. block_size=2 for halo on a small grid; on
    # the command line as a whole: --config.model_overrides.token_mixer_kwargs='{"block_size": 2}').
    config.model_overrides.token_mixer_kwargs = ml_collections.ConfigDict()
    config.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (params stay float32)
    # jax_default_matmul_precision for the steps (None: JAX's default). 'bfloat16' keeps a
    # float32 model but gives its products bf16 operands, as TPUs do by default; on a CPU
    # with AMX it is the fastest setting (docs/performance.md).
    config.matmul_precision = config_dict.placeholder(str)
    # XLA:CPU's instruction scheduler for the train step on a CPU ('default': XLA's choice,
    # 'memory' or 'concurrency'; volo_jax.platforms.cpu.CPU_SCHEDULERS, docs/performance.md);
    # other platforms ignore it.
    config.cpu_scheduler = "default"
    # Weights to start from (a .safetensors file or a weights directory, as volo-jax-convert
    # writes them), and regexes of parameter paths not to load from them (e.g.
    # "^params/(head|aux_head)/" for new classes).
    config.init_from = config_dict.placeholder(str)
    config.init_skip = ()
    # Resizing init_from's position embedding to img_size (fine-tuning): bicubic without
    # antialias as the official fine-tuning (tlt's load_pretrained_weights), or True: with
    # it, as timm.
    config.init_antialias = False
    config.requires_init = False  # fine-tuning configs set it: init_from is then required

    # Data: a TFDS name or a directory of <split>/<class>/<image> ('sklearn_digits' is built in).
    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "imagenet2012"
    config.dataset.data_dir = config_dict.placeholder(str)
    config.dataset.train_split = "train"
    config.dataset.eval_split = "validation"
    config.dataset.num_classes = 1000
    # The classes' names, stored with the final weights (volo-jax-predict prints them). None:
    # an image folder's class folder names, or a TFDS dataset's label names.
    config.dataset.class_names = config_dict.placeholder(tuple)
    config.dataset.image_key = "image"
    config.dataset.label_key = "label"
    config.dataset.shuffle_buffer = 16_384
    config.dataset.num_eval_examples = config_dict.placeholder(int)  # None: the whole split

    # Train augmentation (main.py's defaults): a random resized crop, flip, RandAugment and
    # erasing (each off with 0 / ''). With token labels in the official order: flip,
    # RandAugment on the whole image (moving the score map too), then the crop (tlt);
    # without, timm's: crop, flip, RandAugment (volo_jax/data/augment.py).
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

    # Evaluation preprocessing: None takes the model's pretrained_cfg (timm's crop_pct; the
    # official default_cfg uses 1.15 for D4/D5 at 224 too, see docs/training.md).
    config.eval = ml_collections.ConfigDict()
    config.eval.crop_pct = config_dict.placeholder(float)
    config.eval.interpolation = config_dict.placeholder(str)
    config.eval.batch_size = 256

    # Training (main.py's defaults), read by the train step, the schedule and the train
    # input: the global batch, micro-batches per step (the batch is split, one update),
    # epochs of the schedule and of the cooldown after it at min_lr, the targets' label
    # smoothing, and the EMA decay (0: no EMA; official: off, 0.99992 when on). The EMA
    # covers the parameters and the BatchNorm statistics, as timm's ModelEmaV2.
    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 1024  # README: 8 GPUs x 128
    config.train.grad_accum_steps = 1
    config.train.num_epochs = 300
    config.train.cooldown_epochs = 10
    config.train.label_smoothing = 0.1
    config.train.ema_decay = 0.0
    # The schedule's length in steps instead of epochs (with optim.warmup_steps; no
    # cooldown): what a short fine-tuning on a small dataset is set in. None: epochs.
    config.train.num_steps = config_dict.placeholder(int)

    # Optimisation (main.py's defaults): AdamW, lr = base_lr * train.batch_size /
    # lr_batch_base, warmup then cosine. name 'sgd': SGD with momentum, weight decay added
    # to the gradient as torch.optim.SGD's (the other common choice for fine-tuning).
    config.optim = ml_collections.ConfigDict()
    config.optim.name = "adamw"
    config.optim.momentum = 0.9  # SGD only
    config.optim.base_lr = BASE_LR["d1"]
    config.optim.lr_batch_base = 1024
    config.optim.warmup_epochs = 20
    config.optim.warmup_steps = config_dict.placeholder(int)  # with train.num_steps
    config.optim.warmup_lr = 1e-6
    config.optim.min_lr = 1e-5
    config.optim.weight_decay = 0.05
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    # timm 0.4.5's scheduler (t_in_epochs): the lr holds for a whole epoch, the value of
    # its start; False: evaluated at every step's fractional epoch (a smooth curve).
    config.optim.per_epoch_schedule = True
    config.optim.grad_clip_norm = 0.0  # 0: no clipping (the official default)

    # Token labeling: loss = cls_weight * CE(class) + dense_weight * CE(aux tokens).
    # enabled=False: cross-entropy on the model's output alone, no MixToken (timm's
    # train.py; any registered model, VOLO or not).
    config.token_label = ml_collections.ConfigDict()
    config.token_label.enabled = True
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
    # Mix the annotator's class target with the label (the official --ground-truth of the
    # fine-tuning commands: 0.5 each where their top classes agree, else 0.9 annotator; no
    # effect without an annotator).
    config.token_label.ground_truth = False
    # roi_align samples per bin and axis; -1: ceil(bin length), torchvision's default, as
    # the official code.
    config.token_label.roi_sampling_ratio = -1
    # Crop the score map with the official code's transposed box (roi_align reads its
    # (top, left, bottom, right) as (x1, y1, x2, y2)), as the published models were
    # trained; False: the geometrically right box (volo_jax/training/token_labels.py).
    config.token_label.official_box_order = True
    # Online teacher instead: a registered model and its weights (file or directory).
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
    """The README's fine-tuning of the 224 weights of volo_{variant} at `img_size`.

    lr 8e-6 -> 4e-6 for the variant's batch (FINETUNE_BATCH), weight decay 1e-8, 30 epochs
    (+10 cooldown), 5 warmup, class target mixed with the ground truth, MixToken paired
    within each GPU's share; `init_from` (the 224 weights) is required and the position
    embedding is resized when they are loaded.
    """
    config = variant_config(variant)
    config.model = f"volo_{variant}_{img_size}"
    config.img_size = img_size
    config.requires_init = True
    config.train.batch_size, config.token_label.mix_group_size = FINETUNE_BATCH[variant]
    config.optim.base_lr = 8e-6
    # The fine-tuning lr is for the variant's own batch (a larger batch scales it).
    config.optim.lr_batch_base = config.train.batch_size
    config.optim.min_lr = 4e-6
    config.optim.weight_decay = 1e-8
    config.optim.warmup_epochs = 5
    config.train.num_epochs = 30
    config.token_label.ground_truth = True
    return config
