"""TensorFlow and TensorFlow Datasets, imported once, the way the input pipeline needs them:
the project imports them only from here (`from volo_jax.data.tf_quiet import tf, tfds`).

- TF_CPP_MIN_LOG_LEVEL at errors, unless the environment sets it (`logs.quiet_native_logs`).
- The native start-up lines that ignore it (oneDNN, cpu_feature_guard, the CUDA stubs:
  which ones depends on the CPU and on the CUDA libraries installed) are held back while
  the import runs; anything else written then still reaches stderr
  (`logs.native_startup_lines_held`).
- TensorFlow's CPU allocator is a BFC pool that keeps freed buffers for reuse. With the
  default (malloc), every batch of float32 images (38 MB at 64 x 224 x 224 x 3, above
  glibc's largest mmap threshold) is a fresh mapping whose pages fault in one by one:
  150 page faults per image against 3 with the pool (docs/performance.md). Read when
  TensorFlow first allocates; a value in the environment is kept.
"""

from __future__ import annotations

import os

from volo_jax.logs import native_startup_lines_held, quiet_native_logs

quiet_native_logs()
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
with native_startup_lines_held():
    import tensorflow as tf
    import tensorflow_datasets as tfds

__all__ = ["tf", "tfds"]
