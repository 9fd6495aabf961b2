"""The official optimiser: AdamW with a warmup + cosine + cooldown schedule and no
weight decay on 1-D parameters (biases, norms), `pos_embed` and `cls_token`.

The schedule is timm 0.4.5's `CosineLRScheduler` as the official `create_scheduler`
makes it (t_initial = train.num_epochs, warmup_t = optim.warmup_epochs, warmup_prefix
False, then min_lr during train.cooldown_epochs, t_in_epochs): with
`optim.per_epoch_schedule` the lr changes only at epoch boundaries, as the official run;
without, it is evaluated at every step's fractional epoch (step / steps_per_epoch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

NO_DECAY_NAMES = ("pos_embed", "cls_token")


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
    """base_lr scaled linearly with the batch: base_lr * train.batch_size / lr_batch_base."""
    return config.optim.base_lr * config.train.batch_size / config.optim.lr_batch_base


def create_learning_rate_fn(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> Callable[[jax.Array], jax.Array]:
    """step (updates done before this one) -> lr. With t = step / steps_per_epoch (rounded
    down to whole epochs with optim.per_epoch_schedule), W warmup and T train.num_epochs:
    t < W: warmup_lr + (peak - warmup_lr) * t / W;
    W <= t < T: min_lr + (peak - min_lr) * (1 + cos(pi * t / T)) / 2;
    t >= T (cooldown): min_lr."""
    peak = peak_learning_rate(config)
    opt = config.optim
    warmup, total = float(opt.warmup_epochs), float(config.train.num_epochs)
    per_epoch = bool(opt.per_epoch_schedule)
    in_steps = bool(config.train.get("num_steps"))
    if in_steps:  # t counts steps: W = optim.warmup_steps, T = train.num_steps
        warmup, total = float(opt.get("warmup_steps") or 0), float(config.train.num_steps)

    def schedule(step: jax.Array) -> jax.Array:
        if in_steps:
            t = jnp.asarray(step, jnp.float32)
        elif per_epoch:  # whole epochs, in integers (exact at any step count)
            t = (jnp.asarray(step, jnp.int32) // steps_per_epoch).astype(jnp.float32)
        else:
            t = jnp.asarray(step, jnp.float32) / steps_per_epoch
        warm = opt.warmup_lr + (peak - opt.warmup_lr) * t / max(warmup, 1e-12)
        cosine = opt.min_lr + 0.5 * (peak - opt.min_lr) * (1 + jnp.cos(jnp.pi * t / total))
        return jnp.where(t < warmup, warm, jnp.where(t < total, cosine, opt.min_lr))

    return schedule


def weight_decay_mask(params: Any) -> Any:
    """True where weight decay applies: parameters with >= 2 dims, except the position
    embedding and the class token (the official `add_weight_decay`)."""

    def decays(path: tuple[Any, ...], leaf: jax.Array) -> bool:
        name = getattr(path[-1], "key", str(path[-1]))
        return leaf.ndim > 1 and name not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def create_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay) or SGD with momentum (weight decay added to the
    gradient, as torch.optim.SGD's), per optim.name, decaying `weight_decay_mask`'s
    parameters, + optional global-norm clipping, on the config's schedule."""
    opt = config.optim
    lr = create_learning_rate_fn(config, steps_per_epoch)
    if opt.get("name", "adamw") == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(opt.weight_decay, mask=weight_decay_mask),
            optax.sgd(lr, momentum=opt.momentum or None),
        )
    else:
        tx = optax.adamw(
            lr,
            b1=opt.b1,
            b2=opt.b2,
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            mask=weight_decay_mask,
        )
    if opt.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
    return tx
