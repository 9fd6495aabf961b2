"""GPU kernels (Pallas on Triton), kept apart from the platform-neutral operators."""
