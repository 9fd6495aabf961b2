"""A model is built for one platform, explicitly, and traces that platform's program.

A model built on this CPU host for a TPU or a GPU (`create_model(..., platform=...)`)
must give the program that platform's own host would build by default, with none of
the CPU's rules (`volo_jax.platforms.cpu`) in it. A host of another platform is
imitated by patching `jax.default_backend`, which `create_model(platform=None)` reads.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.smoke import get_config
from volo_jax import platforms
from volo_jax.models import create_model
from volo_jax.platforms import cpu
from volo_jax.training import train
from volo_jax.training.config import model_overrides

CPU_SCOPE = f"/{cpu.SCOPE}/"  # in the op names of the CPU's rules


@contextlib.contextmanager
def _host(backend: str | None) -> Iterator[None]:
    """As if on a host whose default backend is `backend` (None: this host)."""
    with pytest.MonkeyPatch.context() as patch:
        if backend is not None:
            patch.setattr(jax, "default_backend", lambda: backend)
        yield


KERNEL_CALLS = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
#: The GPU's custom calls (the Triton outlook kernel, cuDNN's flash attention) have no
#: export compatibility guarantee; allowed here.
CUDNN_ATTENTION = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")
GPU_CALLS = [
    jax.export.DisabledSafetyCheck.custom_call(name)
    for name in (KERNEL_CALLS["cuda"], *CUDNN_ATTENTION)
]


def _module_text(fn, args, platform: str) -> str:
    """`jax.export` of `fn` for `platform` as StableHLO text."""
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=GPU_CALLS)
    return exported(*args).mlir_module()


def _ops(text: str) -> list[str]:
    """The operations of a StableHLO module in order, locations and names dropped."""
    return re.findall(r"\b(?:stablehlo|chlo|func|sdy|mhlo)\.[\w.]+", text)


def _forward_case(platform: str | None):
    model = create_model("volo_d1_224", platform=platform, dtype=jnp.bfloat16)
    variables = nn.unbox(
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    )
    images = jax.ShapeDtypeStruct((8, 224, 224, 3), jnp.float32)
    return model.apply, (variables, images)


def _train_step_case(platform: str | None, outlook_impl: str = "auto"):
    """The smoke config's train step and abstract (state, batch, teacher) arguments."""
    config = get_config()
    config.dataset.num_classes = 10
    config.model_overrides.outlook_impl = outlook_impl
    model = create_model(config.model, platform=platform, **model_overrides(config))
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
def test_a_model_built_here_for_an_accelerator_is_what_its_host_builds(case, platform):
    from_cpu = _module_text(*CASES[case](platform), platform)
    with _host("gpu" if platform == "cuda" else platform):
        as_its_host = _module_text(*CASES[case](None), platform)
    assert CPU_SCOPE not in from_cpu, f"the CPU's rules are in the {platform} program"
    assert _ops(from_cpu) == _ops(as_its_host)
    if platform == "cuda" and "bf16" in case:  # cuDNN takes bf16 self-attention only
        assert from_cpu.count(CUDNN_ATTENTION[0]) == 14  # D1's transformer layers


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_model_built_for_the_cpu_runs_the_cpu_rules(case):
    """The same model built for the CPU (this host's default) does hold the CPU's rules:
    the check above can fail."""
    text = _module_text(*CASES[case](None), "cpu")
    assert CPU_SCOPE in text
    assert _ops(text) != _ops(_module_text(*CASES[case]("tpu"), "tpu"))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_train_step_with_the_pallas_kernel_lowers(platform):
    """The whole train step with `outlook_impl="pallas"`, as the trainer builds it for
    devices of `platform`, lowers with the compiled kernel (not the interpreter)."""
    text = _module_text(*_train_step_case(platform, "pallas"), platform)
    # One outlooker block: the forward kernel, and the forward again plus the backward
    # kernels in the gradient.
    assert text.count(KERNEL_CALLS[platform]) >= 2
    assert CPU_SCOPE not in text


def test_platform_of_reads_names_devices_and_meshes():
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",))
    for where in (None, "cpu", "CPU", devices[0], devices, np.asarray(devices), mesh):
        assert platforms.platform_of(where) == "cpu", where
    assert platforms.platform_of("cuda") == platforms.platform_of("rocm") == "gpu"
    assert platforms.device_kind_of(mesh) == devices[0].device_kind
    assert platforms.device_kind_of("tpu") is None
    assert create_model("volo_d1_224", platform=mesh).platform == "cpu"
    with pytest.raises(ValueError, match="unknown platform 'metal'"):
        platforms.platform_of("metal")
    with pytest.raises(ValueError, match="unknown platform"):
        platforms.rules("metal")
