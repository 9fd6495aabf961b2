"""timm VOLOs with random, non-trivial weights, for parity tests.

`timm_registered(name)` is timm's own model of that name (`timm.create_model`: the
architecture comes from timm's registry, so it checks ours). `timm_volo(name, **overrides)`
is timm's `VOLO` class built from *our* registry's arguments, shrunk (timm's named
constructors do not take `layers` or `embed_dims`): for checking an implementation detail on
a small model, never the variant's configuration. `timm_blocks` and `jax_blocks` list the
blocks of a built model on either side, to compare architectures without weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from volo_jax.models import create_model, model_kwargs
from volo_jax.models.volo import JAX_ONLY_FIELDS

#: timm 1.0.31: sum(p.numel() for p in timm.create_model(name).parameters()).
TIMM_PARAM_COUNTS = {
    "volo_d1_224": 26_632_040,
    "volo_d1_384": 26_777_960,
    "volo_d2_224": 58_678_336,
    "volo_d2_384": 58_872_896,
    "volo_d3_224": 86_325_072,
    "volo_d3_448": 86_626_128,
    "volo_d4_224": 192_961_520,
    "volo_d4_448": 193_413_104,
    "volo_d5_224": 295_455_584,
    "volo_d5_448": 295_907_168,
    "volo_d5_512": 296_091_488,
}


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


#: A block as both sides are summarized, in forward order: its kind, width, attention heads
#: and head width, the outlooker's window (kernel, padding, stride; None for the others) and
#: the MLP's hidden width.
Block = tuple[str, int, int, int, "tuple[int, int, int] | None", int]
BLOCK_KINDS = ("Outlooker", "Transformer", "ClassBlock")


def timm_blocks(torch_model: Any) -> list[Block]:
    """The blocks of a timm VOLO (its network's stages, then its class-attention blocks),
    read from the built modules."""
    import torch

    blocks = []
    for module in [*torch_model.network, *(torch_model.post_network or [])]:
        for block in module if isinstance(module, torch.nn.Sequential) else [module]:
            kind = type(block).__name__
            if kind not in BLOCK_KINDS:  # a Downsample
                continue
            attn, dim = block.attn, block.norm1.normalized_shape[0]
            window = (attn.kernel_size, attn.padding, attn.stride) if kind == "Outlooker" else None
            head_dim = getattr(attn, "head_dim", dim // attn.num_heads)
            blocks.append((kind, dim, attn.num_heads, head_dim, window, block.mlp.fc1.out_features))
    return blocks


def jax_blocks(model: Any) -> tuple[list[Block], int]:
    """The blocks of our VOLO, read from the modules its (abstract) init calls and their
    parameters' shapes; and its parameter count."""
    import flax.linen as nn
    import jax

    from volo_jax.convert.mapping import abstract_variables

    called: dict[tuple[str, ...], Any] = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            called.setdefault(context.module.path, context.module)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        params = abstract_variables(model)["params"]
    blocks = []
    for path, block in called.items():
        kind = type(block).__name__
        if kind not in BLOCK_KINDS:
            continue
        attn = called[(*path, "attn")]
        window = (attn.kernel_size, attn.padding, attn.stride) if kind == "Outlooker" else None
        head_dim = getattr(attn, "head_dim", None) or block.dim // attn.num_heads
        hidden = params[path[-1]]["mlp"]["fc1"]["kernel"].shape[-1]
        blocks.append((kind, block.dim, attn.num_heads, head_dim, window, hidden))
    return blocks, sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
