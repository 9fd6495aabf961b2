"""Shared test fixtures: JAX on the CPU in float32 at full matmul precision."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax

jax.config.update("jax_default_matmul_precision", "highest")
