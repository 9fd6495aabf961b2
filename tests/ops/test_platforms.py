"""Choices made for the platform being lowered, not for the host that traces.

Exporting for a TPU or a GPU from this CPU host must give the program that platform's own
host would trace, with none of the CPU's kernels (`volo_jax.ops.cpu`) in it. A host of
another platform is imitated by patching `jax.default_backend`, which is what code that
(wrongly) chose by the tracing host would read.
"""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs.smoke import get_config
from volo_jax.models import create_model
from volo_jax.ops.cpu import cpu_kernels, for_platform
from volo_jax.training import train
from volo_jax.training.config import model_overrides

CPU_SCOPE = "/cpu_branch/"  # in the op names of `cpu_kernels`' CPU branch


def _module_text(fn, args, platform: str, host: str | None = None) -> str:
    """`jax.export` of `fn` for `platform` as StableHLO text, traced as if on `host`."""
    jitted = jax.jit(fn)  # a fresh function: jit's trace cache ignores the backend
    if host is None:
        return jax.export.export(jitted, platforms=[platform])(*args).mlir_module()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jax, "default_backend", lambda: host)
        return jax.export.export(jitted, platforms=[platform])(*args).mlir_module()


def _ops(text: str) -> list[str]:
    """The operations of a StableHLO module in order, locations and names dropped."""
    return re.findall(r"\b(?:stablehlo|chlo|func|sdy|mhlo)\.[\w.]+", text)


def _forward_case():
    model = create_model("volo_d1_224", dtype=jnp.bfloat16)
    variables = nn.unbox(
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    )
    images = jax.ShapeDtypeStruct((8, 224, 224, 3), jnp.float32)
    return cpu_kernels(model.apply), (variables, images)


def _train_step_case(outlook_impl: str = "auto"):
    """The smoke config's train step and abstract (state, batch, teacher) arguments."""
    config = get_config()
    config.dataset.num_classes = 10
    config.model_overrides.outlook_impl = outlook_impl
    model = create_model(config.model, **model_overrides(config))
    state, _ = train.abstract_train_state(config, model, steps_per_epoch=10)
    size = model.img_size
    batch = {
        "image": jax.ShapeDtypeStruct((8, size, size, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((8,), jnp.int32),
    }
    step = functools.partial(
        train.train_step, model=model, teacher=None, opts=train.StepOptions.from_config(config)
    )
    return step, (state, batch, None)


CASES = {"volo_d1_224 forward (bf16)": _forward_case, "train step": _train_step_case}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_export_for_an_accelerator_is_what_its_host_would_trace(case, platform):
    fn, args = CASES[case]()
    from_cpu = _module_text(fn, args, platform)
    as_its_host = _module_text(fn, args, platform, host="gpu" if platform == "cuda" else platform)
    assert CPU_SCOPE not in from_cpu, f"the CPU's kernels are in the {platform} program"
    assert _ops(from_cpu) == _ops(as_its_host)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_cpu_program_runs_the_cpu_kernels(case):
    """The same function lowered for the CPU does take the CPU branch: the check above
    can fail."""
    fn, args = CASES[case]()
    text = _module_text(fn, args, "cpu")
    assert CPU_SCOPE in text
    assert _ops(text) != _ops(_module_text(fn, args, "tpu"))


KERNEL_CALLS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_train_step_with_the_pallas_kernel_lowers(platform):
    """The whole train step with `outlook_impl="pallas"`, as the trainer builds it for
    devices of `platform`, lowers with the compiled kernel (not the interpreter)."""
    step, args = _train_step_case("pallas")
    checks = [jax.export.DisabledSafetyCheck.custom_call(KERNEL_CALLS["cuda"])]
    exported = jax.export.export(
        jax.jit(for_platform(step, platform)), platforms=[platform], disabled_checks=checks
    )(*args)
    text = exported.mlir_module()
    # One outlooker block: the forward kernel, and the forward again plus the backward
    # kernels in the gradient.
    assert text.count(KERNEL_CALLS[platform]) >= 2
    assert CPU_SCOPE not in text
