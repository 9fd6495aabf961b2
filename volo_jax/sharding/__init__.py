"""Device meshes (`mesh.py`) and how variables are laid out on them (`rules.py`: the
logical -> mesh axis rules, in one table, and the shardings of a train state). The
logical axes themselves are declared where each parameter is made (`volo_jax.layers`)."""

from volo_jax.sharding.distributed import maybe_initialize_distributed
from volo_jax.sharding.mesh import (
    BATCH_AXES,
    DATA_AXIS,
    FSDP_AXIS,
    MESH_AXES,
    MODEL_AXIS,
    batch_sharding,
    create_mesh,
    mesh_shape,
    replicated,
    shard_batch,
    use_mesh,
)
from volo_jax.sharding.rules import (
    DEFAULT_RULES,
    PRESETS,
    axes_of,
    logical_axes,
    param_specs,
    preset_rules,
    rules_from_config,
    state_shardings,
    state_specs,
    variables_shardings,
    with_shardings,
)

__all__ = [
    "BATCH_AXES",
    "DATA_AXIS",
    "DEFAULT_RULES",
    "FSDP_AXIS",
    "MESH_AXES",
    "MODEL_AXIS",
    "PRESETS",
    "axes_of",
    "batch_sharding",
    "create_mesh",
    "logical_axes",
    "maybe_initialize_distributed",
    "mesh_shape",
    "param_specs",
    "preset_rules",
    "replicated",
    "rules_from_config",
    "shard_batch",
    "state_shardings",
    "state_specs",
    "use_mesh",
    "variables_shardings",
    "with_shardings",
]
