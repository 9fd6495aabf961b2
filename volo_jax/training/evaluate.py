"""Top-1 / top-5 evaluation with timm's eval preprocessing.

`python main.py --config=configs/volo_d1.py --config.mode=eval --config.init_from=DIR`
runs `evaluate(config)`: the config's dataset and eval split (TFDS or a folder of
<split>/<class>/<image>), resized and center-cropped with the model's crop_pct and
interpolation, padded to full batches whose padding is masked out, so that every
example counts exactly once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from volo_jax.data.location import dataset_location
from volo_jax.models import create_model, pretrained_cfg
from volo_jax.progress import Progress
from volo_jax.sharding import (
    batch_sharding,
    create_mesh,
    logical_axes,
    maybe_initialize_distributed,
    replicated,
    rules_from_config,
    shard_batch,
    use_mesh,
    variables_shardings,
)
from volo_jax.training.config import (
    complete_config,
    matmul_precision,
    model_overrides,
    validate_config,
)
from volo_jax.weights import load_weights_into

SUMS = ("top1", "top5", "loss", "count")


def eval_step(variables: Any, batch: dict[str, jax.Array], *, model: nn.Module) -> dict:
    """Sums over the real (mask True) examples of a batch {'image' (B, H, W, 3),
    'label' (B,), 'mask' (B,)}: correct top-1, correct top-5, cross-entropy, count."""
    logits = model.apply(variables, batch["image"]).astype(jnp.float32)
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
    _, top = jax.lax.top_k(logits, min(5, logits.shape[-1]))
    hits = top == labels[:, None]
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    return {
        "top1": jnp.sum(hits[:, 0] * mask),
        "top5": jnp.sum(hits.any(axis=-1) * mask),
        "loss": jnp.sum(loss * mask),
        "count": jnp.sum(mask),
    }


def make_eval_fn(model: nn.Module, mesh: jax.sharding.Mesh, shardings: Any = None) -> Any:
    """The jitted `eval_step` of `model`: variables in `shardings` (a NamedSharding tree;
    None: as they come), the batch split over data x fsdp, the sums replicated."""
    in_shardings = None if shardings is None else (shardings, batch_sharding(mesh))
    step = functools.partial(eval_step, model=model)
    return jax.jit(
        step,
        in_shardings=in_shardings,
        out_shardings=replicated(mesh),
    )


def run_eval(
    eval_fn: Any,
    variables: Any,
    batches: Iterable[dict[str, np.ndarray]],
    mesh: Any,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Top-1, top-5 (fractions), mean loss and example count over all batches; `progress`
    advances by the examples of each batch as it completes (one batch stays in flight)."""
    totals = {name: 0.0 for name in SUMS}
    pending: list[Any] = []

    def collect(sums: Any) -> None:
        sums = jax.device_get(sums)
        for name in SUMS:
            totals[name] += float(sums[name])
        if progress is not None:
            progress.update(int(sums["count"]))

    for batch in batches:
        pending.append(eval_fn(variables, shard_batch(batch, mesh)))
        if len(pending) > 1:
            collect(pending.pop(0))
    for sums in pending:
        collect(sums)
    count = max(totals["count"], 1.0)
    return {
        "top1": totals["top1"] / count,
        "top5": totals["top5"] / count,
        "loss": totals["loss"] / count,
        "count": totals["count"],
    }


def eval_preprocessing(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """create_eval_dataset's preprocessing arguments: the model's pretrained_cfg unless
    the config's eval section overrides crop_pct or interpolation."""
    cfg = pretrained_cfg(config.model)
    return {
        "input_size": config.img_size,
        "crop_pct": cfg.crop_pct if config.eval.crop_pct is None else config.eval.crop_pct,
        "interpolation": config.eval.interpolation or cfg.interpolation,
        "mean": tuple(config.mean),
        "std": tuple(config.std),
    }


def create_eval_batches(config: ml_collections.ConfigDict, workdir: str | None) -> Any:
    """The eval split as padded, masked batches of config.eval.batch_size (global)."""
    from volo_jax.data.input_pipeline import create_eval_dataset

    ds, num_examples = create_eval_dataset(
        dataset_location(config.dataset.name, config.dataset.data_dir, workdir),
        config.dataset.eval_split,
        batch_size=config.eval.batch_size // jax.process_count(),
        data_dir=config.dataset.data_dir,
        image_key=config.dataset.image_key,
        label_key=config.dataset.label_key,
        num_examples=config.dataset.num_eval_examples,
        **eval_preprocessing(config),
    )
    return ds, num_examples


def evaluate(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict[str, float]:
    """Evaluates the weights in config.init_from; returns and logs top-1 / top-5."""
    maybe_initialize_distributed(config.get("distributed") or None)
    complete_config(config, workdir)
    validate_config(config)
    ds, num_examples = create_eval_batches(config, workdir)
    mesh = create_mesh(config.get("mesh"))
    model = create_model(config.model, platform=mesh, **model_overrides(config))
    variables = load_weights_into(
        config.init_from, model, config.model, skip=tuple(config.init_skip)
    )
    rules = rules_from_config(config)
    shardings = variables_shardings(variables, logical_axes(model), mesh, rules)
    variables = jax.device_put(variables, shardings)
    logging.info(
        "evaluating %s on %s/%s: %d examples",
        config.init_from,
        config.dataset.name,
        config.dataset.eval_split,
        num_examples,
    )
    progress = Progress(
        num_examples,
        unit="img",
        desc="eval",
        every=config.log_every_steps * config.eval.batch_size,
        enabled=jax.process_index() == 0,
    )
    with use_mesh(mesh), matmul_precision(config), progress:
        result = run_eval(
            make_eval_fn(model, mesh, shardings), variables, ds.as_numpy_iterator(), mesh, progress
        )
    print(
        f"{config.model} on {config.dataset.name}/{config.dataset.eval_split}: "
        f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
        f"loss {result['loss']:.4f}  ({int(result['count'])} images)"
    )
    return result
