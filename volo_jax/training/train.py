"""VOLO training with token labeling: `train_and_evaluate(config, workdir)`.

One step (`train_step`, pure and jitted with the state donated): targets from the
batch (smoothed labels, precomputed score maps, or an online teacher run in the same
step), MixToken with one box per group of `token_label.mix_group_size` images drawn
from the step's RNG, the token-labeling loss, AdamW,
optional gradient accumulation over micro-batches and an EMA of the parameters.
The state is created, stepped and checkpointed in the shardings that the config's mesh
and sharding rules give it (`volo_jax.sharding`; one device is a mesh of one): there is one
way to make it, `create_train_state`. Batches are split over data x fsdp.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from flax.training import train_state
from jax.experimental import multihost_utils

from volo_jax import platforms
from volo_jax.cli import malloc_tunables_missing
from volo_jax.data.location import dataset_location
from volo_jax.models import create_model
from volo_jax.models.volo import MIX_GROUP_SIZE, mix_box_lam, mix_token_groups, sample_mix_box
from volo_jax.paths import join, makedirs, write_text
from volo_jax.progress import Progress
from volo_jax.sharding import (
    batch_sharding,
    create_mesh,
    logical_axes,
    maybe_initialize_distributed,
    replicated,
    rules_from_config,
    shard_batch,
    state_shardings,
    use_mesh,
    variables_shardings,
    with_shardings,
)
from volo_jax.training import evaluate as eval_lib
from volo_jax.training.checkpointing import Checkpointer
from volo_jax.training.config import (
    complete_config,
    matmul_precision,
    model_overrides,
    teacher_overrides,
    token_grid,
    validate_config,
    weights_overrides,
)
from volo_jax.training.losses import (
    ground_truth_mix,
    mix_class_targets,
    smooth_labels,
    smooth_targets,
    soft_cross_entropy,
    token_label_loss,
)
from volo_jax.training.metrics import MetricWriter, plot_curves
from volo_jax.training.optim import create_learning_rate_fn, create_optimizer
from volo_jax.training.preemption import PreemptionWatch, check_finite
from volo_jax.training.token_labels import targets_from_score_maps
from volo_jax.weights import load_weights_into, save_weights

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
CHECKPOINT_DIR = "checkpoints"
WEIGHTS_DIR = "weights"


class TrainState(train_state.TrainState):
    """Step, params, optimizer state, plus BatchNorm statistics, the EMA of the
    params and of the BatchNorm statistics (None when off; timm's ModelEmaV2 averages
    both) and the base RNG key (uint32 (2,); step keys fold in the step)."""

    batch_stats: Any
    ema_params: Any
    rng: jax.Array
    ema_batch_stats: Any = None


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The static hyper-parameters of `train_step`."""

    num_classes: int
    grid: int  # token grid side: img_size / (patch_size x pooling_scale); 0: none
    token_labeling: bool = True  # False: cross-entropy on the model's output alone
    label_smoothing: float = 0.1
    cls_weight: float = 1.0
    dense_weight: float = 0.5
    mix_token: bool = True
    mix_beta: float = 1.0
    mix_group_size: int = MIX_GROUP_SIZE
    ground_truth: bool = False
    roi_sampling_ratio: int = -1
    official_box_order: bool = True
    grad_accum_steps: int = 1
    ema_decay: float = 0.0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> StepOptions:
        tl, train = config.token_label, config.train
        return cls(
            num_classes=config.dataset.num_classes,
            grid=token_grid(config) if tl.enabled else 0,
            token_labeling=tl.enabled,
            label_smoothing=train.label_smoothing,
            cls_weight=tl.cls_weight,
            dense_weight=tl.dense_weight,
            mix_token=tl.enabled and tl.mix_token,
            mix_beta=tl.mix_beta,
            mix_group_size=tl.mix_group_size,
            ground_truth=tl.ground_truth,
            roi_sampling_ratio=tl.roi_sampling_ratio,
            official_box_order=tl.official_box_order,
            grad_accum_steps=train.grad_accum_steps,
            ema_decay=train.ema_decay,
        )


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


def compute_targets(
    batch: Batch,
    opts: StepOptions,
    teacher: nn.Module | None = None,
    teacher_variables: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """Class target (B, K) and dense target (B, N, K) of an un-mixed batch.

    'label_map' in the batch: the precomputed score maps (flipped and moved with their
    images), ROI-aligned to the crops (`volo_jax.training.token_labels`);
    a teacher: its softmaxed class output and aux logits; otherwise the smoothed label
    for the class and for every token. With `opts.ground_truth`, annotator class
    targets are mixed with the smoothed label.
    """
    labels = smooth_labels(batch["label"], opts.num_classes, opts.label_smoothing)
    n = opts.grid * opts.grid
    if not opts.token_labeling:  # no dense target: (B, 1, K), unused
        return labels, labels[:, None]
    if "label_map" in batch:
        cls, dense = targets_from_score_maps(
            batch["label_map"],
            batch["crop_box"],
            opts.num_classes,
            opts.grid,
            opts.label_smoothing,
            opts.roi_sampling_ratio,
            opts.official_box_order,
        )
    elif teacher is not None:
        logits, aux = teacher.apply(teacher_variables, batch["image"], return_dense=True)
        logits = logits.astype(jnp.float32) + 0.5 * aux.astype(jnp.float32).max(axis=1)
        cls = smooth_targets(jax.nn.softmax(logits, -1), opts.label_smoothing)
        dense = smooth_targets(jax.nn.softmax(aux.astype(jnp.float32), -1), opts.label_smoothing)
        cls, dense = jax.lax.stop_gradient((cls, dense))
    else:
        return labels, jnp.broadcast_to(labels[:, None], (labels.shape[0], n, opts.num_classes))
    if opts.ground_truth:
        cls = ground_truth_mix(cls, labels)
    return cls, dense


def _micro_batches(tree: Any, count: int) -> Any:
    """Splits every (B, ...) leaf into (count, B / count, ...)."""
    return jax.tree_util.tree_map(lambda x: x.reshape(count, -1, *x.shape[1:]), tree)


def train_step(
    state: TrainState,
    batch: Batch,
    teacher_variables: Any,
    *,
    model: nn.Module,
    teacher: nn.Module | None,
    opts: StepOptions,
) -> tuple[TrainState, Metrics]:
    """One optimizer step on a batch {'image' (B, H, W, 3), 'label' (B,), [score maps]}.

    The batch is split into `opts.grad_accum_steps` micro-batches whose gradients are
    averaged; each draws its own MixToken boxes (one per group of `opts.mix_group_size`
    consecutive images, or one for a smaller micro-batch, as the official code, which pairs
    within each GPU's batch) and dropout key from fold_in(rng, step).
    Returns the new state and {'loss', 'cls_loss', 'dense_loss', 'accuracy'} (batch means).
    """
    cls_target, dense_target = compute_targets(batch, opts, teacher, teacher_variables)
    micro = _micro_batches(
        {
            "image": batch["image"],
            "label": batch["label"],
            "cls": cls_target,
            "dense": dense_target,
        },
        opts.grad_accum_steps,
    )
    keys = jax.random.split(jax.random.fold_in(state.rng, state.step), opts.grad_accum_steps)

    def plain_loss_fn(params: Any, batch_stats: Any, mb: Batch, key: jax.Array) -> tuple[Any, Any]:
        """Cross-entropy on the model's output (VOLO's: head + 0.5 x max of the aux head),
        any model: what timm's train.py does."""
        logits, new_vars = model.apply(
            {"params": params, "batch_stats": batch_stats},
            mb["image"],
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        loss = soft_cross_entropy(logits, mb["cls"])
        parts = {"cls_loss": loss, "dense_loss": jnp.zeros_like(loss)}
        parts["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == mb["label"])
        return loss, (new_vars.get("batch_stats", {}), parts)

    def loss_fn(params: Any, batch_stats: Any, mb: Batch, key: jax.Array) -> tuple[Any, Any]:
        if not opts.token_labeling:
            return plain_loss_fn(params, batch_stats, mb, key)
        box_key, dropout_key = jax.random.split(key)
        grid = (opts.grid, opts.grid)
        box = None
        if opts.mix_token:  # (G, 4): one box per group of the micro-batch
            groups = mix_token_groups(mb["image"].shape[0], opts.mix_group_size)
            box = sample_mix_box(box_key, grid, opts.mix_beta, groups)
        (logits, aux), new_vars = model.apply(
            {"params": params, "batch_stats": batch_stats},
            mb["image"],
            train=True,
            return_dense=True,
            mix_box=box,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )
        cls = mb["cls"] if box is None else mix_class_targets(mb["cls"], mix_box_lam(box, grid))
        loss, parts = token_label_loss(
            logits, aux, cls, mb["dense"], opts.cls_weight, opts.dense_weight
        )
        prediction = logits.astype(jnp.float32) + 0.5 * aux.astype(jnp.float32).max(axis=1)
        parts["accuracy"] = jnp.mean(jnp.argmax(prediction, -1) == mb["label"])
        return loss, (new_vars["batch_stats"], parts)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry: tuple[Any, Any], xs: tuple[Batch, jax.Array]) -> tuple[Any, Metrics]:
        grads, batch_stats = carry
        (loss, (batch_stats, parts)), g = grad_fn(state.params, batch_stats, *xs)
        grads = jax.tree_util.tree_map(jnp.add, grads, g)
        return (grads, batch_stats), {"loss": loss, **parts}

    carry = (jax.tree_util.tree_map(jnp.zeros_like, state.params), state.batch_stats)
    if opts.grad_accum_steps == 1:  # no loop: XLA:CPU runs loop bodies many times slower
        first = jax.tree_util.tree_map(lambda x: x[0], (micro, keys))
        (grads, batch_stats), metrics = accumulate(carry, first)
    else:
        (grads, batch_stats), metrics = jax.lax.scan(accumulate, carry, (micro, keys))
        grads = jax.tree_util.tree_map(lambda g: g / opts.grad_accum_steps, grads)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if opts.ema_decay > 0:
        new_state = new_state.replace(
            ema_params=optax.incremental_update(
                new_state.params, state.ema_params, 1.0 - opts.ema_decay
            ),
            ema_batch_stats=optax.incremental_update(
                new_state.batch_stats, state.ema_batch_stats, 1.0 - opts.ema_decay
            ),
        )
    return new_state, jax.tree_util.tree_map(jnp.mean, metrics)


# ---------------------------------------------------------------------------------------------
# State, weights, teacher
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1))
def initial_variables(model: nn.Module, img_size: int, rng: jax.Array) -> dict[str, Any]:
    """Fresh {'params', 'batch_stats'} of `model` for (B, img_size, img_size, 3) inputs
    (jitted once per model: compiling the initializers takes seconds on the CPU)."""
    dummy = jnp.zeros((1, img_size, img_size, 3), jnp.float32)
    # The parameters come boxed with their logical axes; the state holds plain arrays.
    return dict(nn.unbox(model.init({"params": rng}, dummy, train=False)))


def load_init_weights(config: ml_collections.ConfigDict, model: nn.Module) -> dict[str, Any]:
    """config.init_from's variables for `model` (NumPy), without config.init_skip's paths
    and, if it has another number of classes than the dataset, without the classifier
    (initialised afresh, with a log line); a position embedding of another resolution
    resized bicubically, with antialias only if config.init_antialias (the official
    fine-tuning resizes without)."""
    return load_weights_into(
        config.init_from,
        model,
        config.model,
        skip=tuple(config.init_skip),
        antialias=config.init_antialias,
        new_classifier=True,
    )


def _fresh_train_state(
    config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation
) -> TrainState:
    """Step 0 from config.seed: initial variables, optimizer state, EMA copy, base RNG
    (traced inside `jax.jit` or `jax.eval_shape` by the functions below)."""
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    variables = initial_variables(model, config.img_size, init_rng)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    ema = config.train.ema_decay > 0
    state = TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=tx,
        batch_stats=batch_stats,
        # Copies: the step donates the state, and one buffer cannot be donated twice.
        ema_params=jax.tree_util.tree_map(jnp.copy, params) if ema else None,
        ema_batch_stats=jax.tree_util.tree_map(jnp.copy, batch_stats) if ema else None,
        rng=train_rng,
    )
    # An int32 array like the step's output (a Python 0 would trace weakly typed and make
    # the second step compile again).
    return state.replace(step=jnp.zeros((), jnp.int32))


def abstract_train_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    steps_per_epoch: int,
    tx: optax.GradientTransformation | None = None,
) -> tuple[TrainState, Any]:
    """The step-0 state as ShapeDtypeStructs (what a checkpoint is restored into), and a
    function () -> that state from config.seed (the config's weights not loaded) whose
    static fields (tx, apply_fn) are the template's. `tx`: default the config's AdamW."""
    tx = create_optimizer(config, steps_per_epoch) if tx is None else tx
    init = functools.partial(_fresh_train_state, config, model, tx)
    return jax.eval_shape(init), init


def create_train_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    steps_per_epoch: int,
    mesh: jax.sharding.Mesh | None = None,
    rules: dict[str, tuple[str, ...]] | None = None,
    tx: optax.GradientTransformation | None = None,
) -> tuple[TrainState, TrainState]:
    """Step 0 of a run, born in its shardings (`jax.jit(init, out_shardings=...)` after
    `jax.eval_shape`, so no device holds more than its shard), with the config.init_from
    weights (without config.init_skip's paths) put straight into their shardings and the
    EMA started from them.

    `mesh` (default `create_mesh(config.mesh)`; one device is a mesh of one), `rules`
    (default `rules_from_config(config)`), `tx` (default the config's AdamW).
    Returns (state, its NamedSharding tree).
    """
    mesh = create_mesh(config.get("mesh")) if mesh is None else mesh
    rules = rules_from_config(config) if rules is None else rules
    abstract, init = abstract_train_state(config, model, steps_per_epoch, tx)
    shardings = state_shardings(abstract, logical_axes(model), mesh, rules)
    with use_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    if config.init_from:
        state = _put_loaded(state, load_init_weights(config, model), shardings)
    return state, shardings


def jit_train_step(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    mesh: jax.sharding.Mesh,
    shardings: TrainState,
    teacher: nn.Module | None = None,
    teacher_shardings: Any = None,
    donate: bool = True,
) -> Any:
    """`train_step` for `config` and `model`, jitted for `mesh` as the trainer runs it:
    (state, batch, teacher variables) -> (state, metrics), the state in `shardings`
    (donated unless `donate=False`), the batch split over the batch axes; on CPUs with
    config.cpu_scheduler's XLA:CPU scheduler. `model` (and `teacher`) are built for the
    mesh's platform (`create_model(..., platform=mesh)`)."""
    step = functools.partial(
        train_step, model=model, teacher=teacher, opts=StepOptions.from_config(config)
    )
    platform = platforms.platform_of(mesh)
    return jax.jit(
        step,
        in_shardings=(shardings, batch_sharding(mesh), teacher_shardings or replicated(mesh)),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,) if donate else (),
        compiler_options=platforms.cpu.compiler_options(
            platform, config.get("cpu_scheduler", "default")
        ),
    )


def _put_loaded(state: TrainState, loaded: dict[str, Any], shardings: TrainState) -> TrainState:
    """`state` with the leaves of `loaded` ({'params', 'batch_stats'}, host arrays, a
    subset of the paths) put into their shardings in the state's dtypes, and the EMA
    restarted from the new params and statistics."""
    names = ("params", "batch_stats")
    flat = traverse_util.flatten_dict({n: getattr(state, n) for n in names})
    targets = traverse_util.flatten_dict({n: getattr(shardings, n) for n in names})
    for path, value in traverse_util.flatten_dict(loaded).items():
        flat[path] = jax.device_put(np.asarray(value, flat[path].dtype), targets[path])
    merged = traverse_util.unflatten_dict(flat)
    batch_stats = merged.get("batch_stats", {})
    if state.ema_params is None:
        return state.replace(params=merged["params"], batch_stats=batch_stats)
    return state.replace(
        params=merged["params"],
        batch_stats=batch_stats,
        ema_params=jax.tree_util.tree_map(jnp.copy, merged["params"]),
        ema_batch_stats=jax.tree_util.tree_map(jnp.copy, batch_stats),
    )


def load_teacher(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> tuple[nn.Module | None, Any]:
    """The online teacher, built for `mesh`'s platform, and its weights:
    config.teacher.model with the architecture overrides its weights record, at the
    student's resolution (the position embedding is resized) and compute dtype
    (`teacher_overrides`)."""
    if not config.teacher.model:
        return None, None
    teacher = create_model(config.teacher.model, platform=mesh, **teacher_overrides(config))
    return teacher, load_weights_into(config.teacher.init_from, teacher, config.teacher.model)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def create_train_input(config: ml_collections.ConfigDict, workdir: str) -> Any:
    """The training data of this process (see `input_pipeline.create_train_dataset`)."""
    from volo_jax.data.augment import TrainAugment
    from volo_jax.data.input_pipeline import create_train_dataset

    aug = config.augment
    augment = TrainAugment(
        size=config.img_size,
        crop_scale=tuple(aug.crop_scale),
        crop_ratio=tuple(aug.crop_ratio),
        interpolation=aug.interpolation,
        hflip=aug.hflip,
        randaugment=aug.randaugment,
        erase_prob=aug.erase_prob,
        mean=tuple(config.mean),
        std=tuple(config.std),
    )
    return create_train_dataset(
        dataset_location(config.dataset.name, config.dataset.data_dir, workdir),
        config.dataset.train_split,
        batch_size=config.train.batch_size // jax.process_count(),
        augment=augment,
        seed=config.seed,
        data_dir=config.dataset.data_dir,
        image_key=config.dataset.image_key,
        label_key=config.dataset.label_key,
        shuffle_buffer=config.dataset.shuffle_buffer,
        token_label_dir=config.token_label.data_dir,
    )


def _progress(start: int, total: int) -> Progress:
    """On process 0 (silent elsewhere): a bar on a terminal, otherwise a line at every
    log step (see `volo_jax.progress`)."""
    return Progress(total, initial=start, unit="step", enabled=jax.process_index() == 0)


def _progress_fields(means: dict[str, float]) -> dict[str, str]:
    return {
        "loss": f"{means['loss']:.4f}",
        "lr": f"{means['lr']:.2e}",
        "img/s": f"{means['images_per_sec']:.1f}",
    }


def _is_due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (resuming from WORKDIR/checkpoints if any), evaluates periodically, and
    leaves checkpoints, TensorBoard events, metrics.jsonl, curves.png and the final
    weights (weights/, a weights directory) in `workdir`.

    `workdir` may be local or gs:// (`volo_jax.paths`). On SIGTERM (or JAX's multi-host
    preemption notice) it saves a checkpoint at the step reached and returns early
    (no final weights); the same call resumes from there. A non-finite loss or parameter
    raises `TrainingDivergedError` before anything non-finite is saved.

    Returns the last eval metrics ({'top1', 'top5', 'loss', 'count'}; {} when stopped
    before the first eval).
    """
    maybe_initialize_distributed(config.get("distributed") or None)
    complete_config(config, workdir)
    validate_config(config)
    workdir = os.fspath(makedirs(workdir))
    if jax.process_index() == 0:
        write_text(join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    mesh = create_mesh(config.get("mesh"))
    rules = rules_from_config(config)
    train_data = create_train_input(config, workdir)
    eval_data, _ = eval_lib.create_eval_batches(config, workdir)
    steps_per_epoch = train_data.steps_per_epoch
    total_steps = config.train.num_steps or (
        (config.train.num_epochs + config.train.cooldown_epochs) * steps_per_epoch
    )
    last_step = min(total_steps, config.max_steps or total_steps)

    model = create_model(config.model, platform=mesh, **model_overrides(config))
    crash = platforms.known_compiler_crash(config.model, mesh)
    if crash is not None:
        logging.warning(
            "%s on %s with %s %s: %s (docs/performance.md). If this run dies with that "
            "signal, train it on another chip or with another %s.",
            config.model,
            crash.device_kind,
            crash.compiler,
            crash.version,
            crash.what,
            crash.compiler,
        )
    ckpt = Checkpointer(join(workdir, CHECKPOINT_DIR), config.keep_checkpoints)
    # Where the train state comes from: the first of these that applies (the order matters).
    # 1. The newest checkpoint in WORKDIR/checkpoints that restores: the same run resumed
    #    (after preemption, a kill or a crash; a fine-tuning run too: config.init_from is
    #    not read again). Restored straight into this run's shardings (the mesh may differ
    #    from the saver's).
    # 2. config.init_from: a new run from those weights (fine-tuning or new classes): the
    #    position embedding resized to img_size, config.init_skip's paths and the optimizer
    #    state fresh, the EMA started from the weights.
    # 3. A new run from config.seed.
    # 2 and 3 are `create_train_state`, born in the shardings as 1 is restored into them.
    restored = None
    if ckpt.latest_step is not None:
        abstract, _ = abstract_train_state(config, model, steps_per_epoch)
        shardings = state_shardings(abstract, logical_axes(model), mesh, rules)
        restored = ckpt.restore_latest(with_shardings(abstract, shardings))
    if restored is not None:  # 1.
        state, restored_step = restored
        logging.info("resuming from step %d of %s", restored_step, ckpt.directory)
    else:  # 2. or 3.
        state, shardings = create_train_state(config, model, steps_per_epoch, mesh, rules)
    teacher, teacher_variables = load_teacher(config, mesh)
    teacher_shardings = (
        None
        if teacher_variables is None
        else variables_shardings(teacher_variables, logical_axes(teacher), mesh, rules)
    )
    teacher_variables = jax.device_put(teacher_variables, teacher_shardings)

    step_fn = jit_train_step(config, model, mesh, shardings, teacher, teacher_shardings)
    variable_shardings = {"params": shardings.params, "batch_stats": shardings.batch_stats}
    loop = _Loop(
        step_fn=step_fn,
        eval_fn=eval_lib.make_eval_fn(model, mesh, variable_shardings),
        lr_fn=create_learning_rate_fn(config, steps_per_epoch),
        eval_data=eval_data,
        teacher_variables=teacher_variables,
        mesh=mesh,
        writer=MetricWriter(workdir),
        ckpt=ckpt,
        batch_size=config.train.batch_size,
        log_every=config.log_every_steps,
        eval_every=config.eval_every_steps or steps_per_epoch,
        checkpoint_every=config.checkpoint_every_steps or steps_per_epoch,
    )
    start = int(state.step)
    logging.info(
        "training %s: %d examples, %d steps/epoch, steps %d..%d, batch %d on %d devices",
        config.model,
        train_data.num_examples,
        steps_per_epoch,
        start,
        last_step,
        config.train.batch_size,
        jax.device_count(),
    )
    logging.info("mesh %s, sharding %r", dict(mesh.shape), config.get("sharding", "auto"))
    if jax.default_backend() == "cpu" and malloc_tunables_missing():
        logging.info(
            'on the CPU, steps are faster in a process started with GLIBC_TUNABLES="$(python '
            '-m volo_jax.cli glibc-tunables)" (scripts/train_default.sh does; '
            "docs/performance.md)"
        )
    try:
        with use_mesh(mesh), matmul_precision(config), PreemptionWatch(ckpt) as preemption:
            loop.preemption = preemption
            state, eval_metrics = loop.run(state, train_data.batches(start), start, last_step)
    finally:
        ckpt.close()
        loop.writer.close()
    if loop.stopped_at is not None:
        logging.warning(
            "preempted: stopped at step %d with its checkpoint written to %s; run the same "
            "command to resume",
            loop.stopped_at,
            ckpt.directory,
        )
        return eval_metrics
    export_weights(config, state, join(workdir, WEIGHTS_DIR))
    if jax.process_index() == 0:
        logging.info("curves written to %s", plot_curves(workdir))
    return eval_metrics


def export_weights(config: ml_collections.ConfigDict, state: TrainState, directory: str) -> None:
    """Writes the final params and BatchNorm statistics (their EMA when kept) as a weights
    directory, which `--config.mode=eval --config.init_from=DIR` and `predict --weights
    DIR` read."""
    variables = _ema_variables(state) or {
        "params": state.params,
        "batch_stats": state.batch_stats,
    }
    if jax.process_count() > 1:  # each process holds only its shards: gather whole arrays
        variables = multihost_utils.process_allgather(variables, tiled=True)
    save_weights(
        directory,
        variables,
        config.model,
        weights_overrides(config),
        source=f"volo_jax training, step {int(state.step)}",
        **({"class_names": list(names)} if (names := config.dataset.class_names) else {}),
    )
    logging.info("final weights written to %s", directory)


def _ema_variables(state: TrainState) -> dict[str, Any] | None:
    """{'params', 'batch_stats'} of the EMA, or None when it is off."""
    if state.ema_params is None:
        return None
    return {"params": state.ema_params, "batch_stats": state.ema_batch_stats}


@dataclasses.dataclass
class _Loop:
    """The training loop and what it runs with (fixed for the run)."""

    step_fn: Any  # jitted train_step: (state, batch, teacher_variables) -> (state, metrics)
    eval_fn: Any  # jitted eval_step
    lr_fn: Any
    eval_data: Any  # tf.data.Dataset of padded, masked eval batches
    teacher_variables: Any
    mesh: jax.sharding.Mesh
    writer: MetricWriter
    ckpt: Checkpointer
    batch_size: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    preemption: PreemptionWatch | None = None
    stopped_at: int | None = None  # the step a preemption notice stopped the run at

    def run(
        self,
        state: TrainState,
        batches: Iterator[dict[str, np.ndarray]],
        start: int,
        last_step: int,
    ) -> tuple[TrainState, dict[str, float]]:
        """Steps start+1 .. last_step; returns the final state and the last eval metrics."""
        pending: list[Metrics] = []
        eval_metrics: dict[str, float] = {}
        tick, tick_step = time.perf_counter(), start
        bar = _progress(start, last_step)
        say = bar.write if jax.process_index() == 0 else logging.debug
        # On XLA:CPU a queued step waiting for the previous one competes with it for the
        # same cores, so there the host waits for each step.
        wait_each_step = jax.default_backend() == "cpu"
        for step in range(start + 1, last_step + 1):
            self._report_saved(say)  # a failed save stops the run here, before the step
            state, metrics = self.step_fn(
                state, shard_batch(next(batches), self.mesh), self.teacher_variables
            )
            if wait_each_step:
                jax.block_until_ready(metrics)
            pending.append(metrics)
            bar.update(1)
            if _is_due(step, self.log_every, last_step):
                now = time.perf_counter()
                means = self._log_train(step, pending, (step - tick_step) / (now - tick))
                pending, tick, tick_step = [], now, step
                bar.log(_progress_fields(means))
            is_eval = _is_due(step, self.eval_every, last_step)
            preempted = (
                self.preemption is not None and self.preemption.reached(step) and step < last_step
            )
            is_save = preempted or _is_due(step, self.checkpoint_every, last_step)
            if is_eval or is_save:  # nothing non-finite is evaluated or saved
                self._check_finite(step, state, pending)
            if is_eval:
                eval_metrics = self.evaluate(state)
                self.writer.write(
                    step, {f"eval/{k}": v for k, v in eval_metrics.items() if k != "count"}
                )
                say(
                    f"step {step}: eval top-1 {100 * eval_metrics['top1']:.2f}% top-5 "
                    f"{100 * eval_metrics['top5']:.2f}% loss {eval_metrics['loss']:.4f}"
                )
            if is_eval or is_save:
                self.ckpt.save(step, state, {"top1": eval_metrics["top1"]} if is_eval else None)
            if preempted:
                self.stopped_at = step
                break
        self.ckpt.wait()
        self._report_saved(say)
        bar.close()
        return state, eval_metrics

    def _report_saved(self, say: Callable[[str], None]) -> None:
        """Says which checkpoints have been written completely since the last call; raises
        CheckpointSaveError (one line) if a save failed."""
        for saved in self.ckpt.completed():
            say(f"step {saved}: checkpoint saved to {self.ckpt.path / str(saved)}")

    def _log_train(self, step: int, pending: list[Metrics], steps_per_sec: float) -> dict:
        """Writes the means of the pending step metrics, images/s and the lr."""
        fetched = jax.device_get(pending)
        self._check_finite(step, None, fetched)
        means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        means["images_per_sec"] = self.batch_size * steps_per_sec
        means["lr"] = float(self.lr_fn(step - 1))  # the lr of this step's update
        self.writer.write(step, {f"train/{k}": v for k, v in means.items()})
        return means

    def _check_finite(self, step: int, state: TrainState | None, metrics: list) -> None:
        """Raises TrainingDivergedError if a loss in `metrics` (those of the steps up to
        `step`, fetched here if not yet) or, with `state`, a parameter is not finite."""
        losses = [float(m["loss"]) for m in jax.device_get(metrics)]
        params = None if state is None else (state.params, state.ema_params)

        def last_good() -> str:
            latest = self.ckpt.latest_step
            return "none" if latest is None else f"step {latest} in {self.ckpt.directory}"

        check_finite(step, losses, params, last_good)

    def evaluate(self, state: TrainState) -> dict[str, float]:
        """Top-1/top-5/loss of the params (and of their EMA, as ema_top1, when kept)."""
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        result = eval_lib.run_eval(
            self.eval_fn, variables, self.eval_data.as_numpy_iterator(), self.mesh
        )
        ema = _ema_variables(state)
        if ema is not None:
            result["ema_top1"] = eval_lib.run_eval(
                self.eval_fn, ema, self.eval_data.as_numpy_iterator(), self.mesh
            )["top1"]
        return result
