"""timm VOLOs with random, non-trivial weights, for parity tests.

`timm_registered(name)` is timm's own model of that name (`timm.create_model`: the
architecture comes from timm's registry, so it checks ours). `timm_volo(name, **overrides)`
is timm's `VOLO` class built from *our* registry's arguments, shrunk (timm's named
constructors do not take `layers` or `embed_dims`): for checking an implementation detail on
a small model, never the variant's configuration.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from volo_jax.models import create_model, model_kwargs
from volo_jax.models.volo import JAX_ONLY_FIELDS


def shrunk_overrides(name: str, factor: int = 4) -> dict[str, Any]:
    """A small version of `name`: one or two blocks a stage, widths / factor, the
    same heads (so head_dim keeps its ratio between variants), mlp ratio and grid."""
    kw = model_kwargs(name)
    return dict(
        layers=(2, 1, 2, 1),
        embed_dims=tuple(d // factor for d in kw["embed_dims"]),
        stem_hidden_dim=kw.get("stem_hidden_dim", 64) // factor,
        num_classes=17,
    )


def randomize_(torch_model: Any, seed: int = 0, vectors_only: bool = False) -> None:
    """Perturbs every parameter and BatchNorm statistic so no weight is trivial.
    `vectors_only`: new draws only for the 1-D parameters (norm scales, biases: constants in
    timm's init) and the statistics; the matrices and kernels, already drawn at random by
    timm's init (std 0.02 for most), are scaled by 2.5, about the spread the perturbation
    gives them (drawing them again takes seconds at full size)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in torch_model.named_parameters():
            if param.ndim <= 1 or not vectors_only:
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
            else:
                param.mul_(2.5)
        for name, buf in torch_model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)


def timm_registered(name: str, seed: int = 0, **kwargs: Any) -> Any:
    """timm's own `name` (`timm.create_model`), with only `kwargs` that its constructor
    takes besides the architecture (img_size, num_classes, ...), weights randomized."""
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    randomize_(model, seed, vectors_only=True)  # full-size models: one random draw is enough
    return model


def timm_volo(name: str, seed: int = 0, **overrides: Any) -> Any:
    """timm's `VOLO` class with the arguments our registry gives `name` (and `overrides`),
    weights randomized; see the module docstring for what it cannot check."""
    from timm.models.volo import VOLO

    kw = {k: v for k, v in model_kwargs(name, **overrides).items() if k not in JAX_ONLY_FIELDS}
    model = VOLO(**kw).eval()
    randomize_(model, seed)
    return model


def state_dict_numpy(torch_model: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}


def timm_logits(torch_model: Any, images_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(eval logits (B, K), aux logits (B, N, K)) of a timm VOLO."""
    import torch

    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits = torch_model(x).numpy()
        aux = torch_model.aux_head(torch_model.forward_features(x)[:, 1:]).numpy()
    return logits, aux


def jax_volo(name: str, **overrides: Any) -> Any:
    return create_model(name, **overrides)
