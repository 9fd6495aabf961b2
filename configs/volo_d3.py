"""volo_d3 at 224 on ImageNet-1k, the official recipe (see configs/common.py)."""

import ml_collections

from configs.common import variant_config


def get_config() -> ml_collections.ConfigDict:
    return variant_config("d3")
