"""Models (volo_jax/models): VOLO's forward, options and parity with timm's registered models;
HaloNet and RedNet; MixToken inside the model."""
