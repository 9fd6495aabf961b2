"""Token-labeling losses and targets (official `loss/cross_entropy.py`).

loss = cls_weight * CE(class logits, class target)
     + dense_weight * CE(aux logits of every token, its dense target),
with soft-target cross-entropy. MixToken mixes the class target by the fraction of
tokens kept, lam = 1 - box_area / N (one lam per group of the batch, each group with
its own box); the dense targets are not mixed because the model un-mixes its aux logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """int (B,) -> (B, K): 1 - smoothing + smoothing / K on the label, smoothing / K off."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def smooth_targets(targets: jax.Array, smoothing: float) -> jax.Array:
    """Soft targets (..., K) -> (1 - smoothing) * targets + smoothing / K."""
    return targets * (1.0 - smoothing) + smoothing / targets.shape[-1]


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over all leading dims of -sum_k targets * log_softmax(logits); (..., K) each."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(targets * logp, axis=-1).mean()


def mix_class_targets(targets: jax.Array, lam: jax.Array) -> jax.Array:
    """MixToken class target (B, K): lam * t + (1 - lam) * t of the group's mirror image.

    As the model pairs (`volo_jax.models.volo.mix_tokens`): `lam` a scalar, one group (image
    b mixes with image B - 1 - b); `lam` (G,), one per group of B / G consecutive images,
    image b of group g mixing with the group's image B / G - 1 - b at that group's lam.
    """
    lam = jnp.reshape(lam, (-1,)).astype(targets.dtype)
    groups, batch = lam.shape[0], targets.shape[0]
    if batch % groups:
        raise ValueError(
            f"mix_class_targets: {groups} lams (one per group) do not split the batch of "
            f"{batch} into equal groups"
        )
    grouped = targets.reshape(groups, batch // groups, *targets.shape[1:])
    lam = lam[:, None, None]
    return (lam * grouped + (1.0 - lam) * grouped[:, ::-1]).reshape(targets.shape)


def ground_truth_mix(annotator: jax.Array, ground_truth: jax.Array) -> jax.Array:
    """Fine-tuning class target (official `TokenLabelGTCrossEntropy`), (B, K) each:
    r * annotator + (1 - r) * ground truth, r = 0.5 where their argmaxes agree, else 0.9."""
    agree = jnp.argmax(annotator, -1) == jnp.argmax(ground_truth, -1)
    ratio = jnp.where(agree, 0.5, 0.9)[:, None]
    return ratio * annotator + (1.0 - ratio) * ground_truth


def token_label_loss(
    cls_logits: jax.Array,
    aux_logits: jax.Array,
    cls_target: jax.Array,
    dense_target: jax.Array,
    cls_weight: float = 1.0,
    dense_weight: float = 0.5,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """cls_logits (B, K), aux_logits (B, N, K), cls_target (B, K), dense_target (B, N, K)
    -> (total loss, {'cls_loss', 'dense_loss'})."""
    cls_loss = soft_cross_entropy(cls_logits, cls_target)
    dense_loss = soft_cross_entropy(aux_logits, dense_target)
    total = cls_weight * cls_loss + dense_weight * dense_loss
    return total, {"cls_loss": cls_loss, "dense_loss": dense_loss}
