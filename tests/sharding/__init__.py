"""Sharding (volo_jax/sharding): logical axes of every parameter, the same train step on 8 CPU
devices, several processes through jax.distributed."""
