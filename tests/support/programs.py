"""Reading traced programs (jaxprs): what our code asks XLA for, before XLA's own passes,
which change between jax releases."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax


def equations(fn: Callable[..., Any], *args: Any) -> Iterator[Any]:
    """Every equation of `fn`'s traced program on `args`, nested programs (jit, custom
    VJPs, scans, conds) included."""

    def walk(jaxpr: Any) -> Iterator[Any]:
        for eqn in jaxpr.eqns:
            yield eqn
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple | list) else (param,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        yield from walk(sub)

    yield from walk(jax.make_jaxpr(fn)(*args).jaxpr)


def count(fn: Callable[..., Any], *args: Any, primitive: str) -> int:
    """How many `primitive` equations (e.g. 'conv_general_dilated') `fn`'s program has."""
    return sum(eqn.primitive.name == primitive for eqn in equations(fn, *args))
