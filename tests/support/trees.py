"""Comparing two training states leaf by leaf, each leaf against its own size.

A tolerance relative to the largest parameter (|w| ~ 1 for a norm scale) is larger than a
whole update at a small learning rate, so a zeroed or doubled gradient would pass it; the
gradients (Adam's first moment) and the updates (new - start) are compared instead.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def adam_mu(opt_state: Any) -> Any:
    """Adam's first moment in an optax state (a params-like tree): (1 - b1) x the gradient
    after the first step, a running mean of the gradients after more."""
    found = [
        s.mu
        for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu"))
        if hasattr(s, "mu")
    ]
    assert len(found) == 1, f"{len(found)} Adam states in {type(opt_state)}"
    return found[0]


def worst_leaf(
    got: Any, want: Any, rtol: float, start: Any = None, floor: float = 0.0
) -> tuple[float, str]:
    """max|got - want| / (rtol * max|want|) over the leaves of two trees (<= 1 passes): the
    worst ratio and the path of its leaf.

    With `start`, the updates (got - start, want - start) are compared, with 2 float32
    ulps of |start| more for the rounding of each new value. `floor` (a fraction of the
    largest leaf's max|want|) is a least tolerance, for leaves whose reference is only
    rounding noise (an analytically zero gradient).
    """
    flat = jax.tree_util.tree_flatten_with_path(got)[0]
    wants = [np.asarray(w, np.float64) for w in jax.tree_util.tree_leaves(want)]
    starts = jax.tree_util.tree_leaves(start) if start is not None else [None] * len(wants)
    if len(flat) != len(wants) or len(starts) != len(wants):
        raise ValueError(f"trees differ: {len(flat)}, {len(wants)} and {len(starts)} leaves")
    deltas = []
    for (path, g), w, s in zip(flat, wants, starts, strict=True):
        g = np.asarray(g, np.float64)
        slack = 0.0
        if s is not None:
            s32 = np.asarray(s, np.float32)
            g, w = g - s32, w - s32
            slack = 2 * float(np.max(np.spacing(np.abs(s32)), initial=0.0))
        deltas.append((jax.tree_util.keystr(path), g, w, slack))
    largest = max(float(np.max(np.abs(w), initial=0.0)) for _, _, w, _ in deltas)
    worst, where = 0.0, ""
    for path, g, w, slack in deltas:
        allowed = rtol * max(float(np.max(np.abs(w), initial=0.0)), floor * largest) + slack
        diff = float(np.max(np.abs(g - w), initial=0.0))
        ratio = diff / allowed if allowed > 0 else (np.inf if diff > 0 else 0.0)
        if ratio > worst:
            worst, where = ratio, path
    return worst, where
