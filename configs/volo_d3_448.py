"""Fine-tunes volo_d3 224 weights at 448 (--config.init_from=DIR is required)."""

import ml_collections

from configs.common import finetune_config


def get_config() -> ml_collections.ConfigDict:
    return finetune_config("d3", 448)
