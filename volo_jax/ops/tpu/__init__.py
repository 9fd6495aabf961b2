"""TPU kernels (Pallas on Mosaic), kept apart from the platform-neutral operators."""
