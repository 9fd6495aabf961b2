"""Prints the pip requirements of volo-jax extras for the runtime it runs on, one a line,
for a machine that comes with its own TensorFlow and JAX (Colab):

  pip install -e . $(python scripts/runtime_requirements.py train)

- Where TensorFlow is installed already (any distribution: tensorflow, tensorflow-cpu,
  tf-nightly), the extras' `tensorflow-cpu` is left out: pip would put a second
  TensorFlow beside it, since it counts them as different packages.
- Where libtpu is installed (a TPU runtime), `jax[tpu]` is added, so that jax and libtpu
  move to matching versions together.

Reads pyproject.toml only (no volo-jax import, no JAX in this process).
"""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
#: Distributions that stand for TensorFlow in the extras.
TENSORFLOW_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu")


def _name(requirement: str) -> str:
    """'tensorflow-cpu>=2.21.0' -> 'tensorflow-cpu' (PEP 503 normalised)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def runtime_requirements(
    extras: Sequence[str],
    has_module: Callable[[str], bool] = lambda m: importlib.util.find_spec(m) is not None,
    pyproject: Path = PYPROJECT,
) -> list[str]:
    """The requirements of `extras` (in pyproject order, without duplicates), adapted to
    the runtime that `has_module` describes (see the module docstring)."""
    with pyproject.open("rb") as f:
        optional = tomllib.load(f)["project"]["optional-dependencies"]
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"error: unknown extra {unknown[0]!r}; known: {', '.join(optional)}")
    keep_tensorflow = has_module("tensorflow")
    out: list[str] = []
    for extra in extras:
        for requirement in optional[extra]:
            if keep_tensorflow and _name(requirement) in TENSORFLOW_DISTRIBUTIONS:
                continue
            if requirement not in out:
                out.append(requirement)
    if has_module("libtpu"):
        out.append("jax[tpu]")
    return out


if __name__ == "__main__":
    print("\n".join(runtime_requirements(sys.argv[1:] or ["train"])))
