"""Benchmarks: volo-jax against timm's PyTorch VOLO (not part of the package or CI)."""
