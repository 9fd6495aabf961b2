"""The geometry of a sliding window: kernel, stride, padding and dilation, as (h, w)
pairs, and the window grid they give on an input. Shared by every window primitive
(`patches`, `slices`, `planes`) and by the Pallas kernels of outlook attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

IntOrPair = int | Sequence[int]


def pair(value: IntOrPair, name: str) -> tuple[int, int]:
    """(value, value) for an int, else the pair checked: two ints."""
    values = (value, value) if isinstance(value, int) else tuple(value)
    if len(values) != 2 or any(not isinstance(v, int) for v in values):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return values  # type: ignore[return-value]


class PatchGeometry:
    """Kernel, stride, padding and dilation of a sliding window, as (h, w) pairs."""

    def __init__(
        self,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
    ) -> None:
        self.kernel = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
        self.dilation = pair(dilation, "dilation")
        if min(self.kernel + self.stride + self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(
                f"kernel {self.kernel}, stride {self.stride} and dilation {self.dilation} must "
                f"be >= 1 and padding {self.padding} >= 0"
            )

    def key(self) -> tuple[tuple[int, int], ...]:
        return (self.kernel, self.stride, self.padding, self.dilation)

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        """Number of window positions (h, w) on an (height, width) input."""
        sizes = []
        for n, k, s, p, d in zip(
            (height, width), self.kernel, self.stride, self.padding, self.dilation, strict=True
        ):
            span = d * (k - 1) + 1
            if n + 2 * p < span:
                raise ValueError(
                    f"input of size {(height, width)} with padding {self.padding} is smaller "
                    f"than the dilated kernel {self.kernel} (dilation {self.dilation})"
                )
            sizes.append((n + 2 * p - span) // s + 1)
        return sizes[0], sizes[1]


def check_parts(
    parts: Sequence[jax.Array],
    caller: str,
    output_size: tuple[int, int],
    grid: tuple[int, int],
    count: int,
) -> None:
    """Raises ValueError unless `parts` are `count` arrays (B, *grid, ...)."""
    if len(parts) != count or any(tuple(p.shape[1:3]) != grid for p in parts):
        raise ValueError(
            f"{caller} to {output_size} expects {count} parts (B, {grid[0]}, {grid[1]}, ...), "
            f"got {[tuple(p.shape) for p in parts]}"
        )
