"""The checkpoint converter (volo_jax/convert): official and timm checkpoints to our variables,
strict errors, position-embedding resizing."""
