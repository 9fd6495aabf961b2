"""A seconds-long run for tests and smoke checks: a tiny VOLO, 2 epochs of the digits.

python main.py --config=configs/smoke.py --workdir=/tmp/smoke
"""

import ml_collections

from configs.default import get_config as get_default_config


def get_config() -> ml_collections.ConfigDict:
    config = get_default_config()
    config.model_overrides.update(
        {
            "embed_dims": (32, 64, 64, 64),
            "num_heads": (1, 2, 2, 2),
            "stem_hidden_dim": 16,
        }
    )
    config.train.batch_size = 32
    config.train.num_epochs = 2
    config.optim.warmup_epochs = 1
    config.optim.lr_batch_base = 32
    config.eval.batch_size = 120
    config.log_every_steps = 10
    config.eval_every_steps = 40
    config.checkpoint_every_steps = 10
    return config
