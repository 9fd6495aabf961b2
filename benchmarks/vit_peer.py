"""A plain Flax ViT-S/16 and its train step: the peer VOLO's compiled costs are read
beside (benchmarks/compile_table.py).

Nothing here is tuned: patch embedding as a strided convolution, 12 pre-norm blocks of
width 384 with 6 heads and an MLP of 1536, a class token, AdamW, softmax cross-entropy;
bf16 compute with float32 parameters, as the VOLO configs' `dtype='bfloat16'`. It is the
common baseline of a vision transformer in JAX at about VOLO-D1's size (22M parameters
against 27M).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from volo_jax.sharding import batch_sharding, create_mesh, replicated, use_mesh


class Block(nn.Module):
    dim: int
    heads: int
    mlp: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(dtype=self.dtype)(x)
        x = x + nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype)(y, y)
        y = nn.LayerNorm(dtype=self.dtype)(x)
        y = nn.Dense(self.mlp, dtype=self.dtype)(y)
        return x + nn.Dense(self.dim, dtype=self.dtype)(nn.gelu(y))


class ViT(nn.Module):
    """(B, 224, 224, 3) -> (B, classes)."""

    patch: int = 16
    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp: int = 1536
    classes: int = 1000
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch
        x = nn.Conv(self.dim, (p, p), (p, p), dtype=self.dtype)(images)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c)).astype(x.dtype), x], axis=1)
        x = x + self.param("pos", nn.initializers.normal(0.02), (1, h * w + 1, c))
        for _ in range(self.depth):
            x = Block(self.dim, self.heads, self.mlp, self.dtype)(x)
        x = nn.LayerNorm(dtype=self.dtype)(x[:, 0])
        return nn.Dense(self.classes, dtype=self.dtype)(x)


def compile_train_step(
    devices: Sequence[jax.Device], global_batch: int, image_size: int = 224
) -> jax.stages.Compiled:
    """The ViT-S/16 AdamW step on `devices` (data parallel, parameters replicated, state
    donated), compiled from abstract inputs."""
    model = ViT()
    tx = optax.adamw(1e-3, weight_decay=0.05)
    mesh = create_mesh({"data": -1}, devices)

    def init():
        params = model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
        return params, tx.init(params)

    def step(state, images, labels):
        params, opt_state = state

        def loss_fn(params):
            logits = model.apply(params, images).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    state = jax.eval_shape(init)
    rep = replicated(mesh)
    state = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state
    )
    data = batch_sharding(mesh)
    images = jax.ShapeDtypeStruct(
        (global_batch, image_size, image_size, 3), jnp.float32, sharding=data
    )
    labels = jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=data)
    jitted = jax.jit(
        step,
        out_shardings=(
            jax.tree_util.tree_map(lambda x: x.sharding, state),
            NamedSharding(mesh, P()),
        ),
        donate_argnums=(0,),
    )
    with use_mesh(mesh):
        return jitted.lower(state, images, labels).compile()
