"""TPU kernels (Pallas on Mosaic), kept apart from the platform-neutral operators."""

from __future__ import annotations

from jax.experimental.pallas import tpu as pltpu

#: `pl.pallas_call`'s `interpret=` for the kernels' `interpret` argument: False compiles
#: for TPU; True or "generic" runs Pallas' generic interpreter (the CPU tests); "tpu"
#: Pallas' TPU interpreter (memory spaces, DMAs and strided accesses as on the chip;
#: slower).
MOSAIC_INTERPRETERS = {False: False, True: True, "generic": True, "tpu": pltpu.InterpretParams()}
