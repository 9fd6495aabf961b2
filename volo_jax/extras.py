"""What each optional part of volo-jax needs beyond the core install, and the one error
that names the extra to install when it is missing.

  pip install volo-jax              models, operators, weights, convert from .safetensors,
                                    predict
  pip install 'volo-jax[torch]'     + reading PyTorch .pth / .pth.tar / .bin files
  pip install 'volo-jax[gcs]'       + gs:// paths
  pip install 'volo-jax[train]'     + training and evaluation (main.py), gs:// paths
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from volo_jax.errors import VoloJaxError

#: extra -> the modules it brings that volo-jax imports (module name, distribution name).
EXTRA_MODULES: dict[str, tuple[tuple[str, str], ...]] = {
    "torch": (("torch", "torch"),),
    "gcs": (("gcsfs", "gcsfs"),),
    "train": (
        ("absl", "absl-py"),
        ("ml_collections", "ml_collections"),
        ("optax", "optax"),
        ("tensorflow", "tensorflow-cpu"),
        ("tensorflow_datasets", "tensorflow-datasets"),
        ("importlib_resources", "importlib_resources"),
        ("sklearn", "scikit-learn"),
        ("matplotlib", "matplotlib"),
        ("tensorboard", "tensorboard"),
        ("gcsfs", "gcsfs"),
    ),
}


class MissingExtraError(VoloJaxError, ImportError):
    """A command needs packages of an extra that is not installed."""


def install_hint(extra: str) -> str:
    return f"pip install 'volo-jax[{extra}]'"


def is_installed(module: str) -> bool:
    """Whether the top-level `module` can be imported (found, not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it
        return False


def require_extra(extra: str, purpose: str) -> None:
    """Raises MissingExtraError unless every module of `extra` can be imported.

    Args:
      purpose: what needs them, for the message ('training', 'the gs:// path ...').
    """
    missing = [dist for module, dist in EXTRA_MODULES[extra] if not is_installed(module)]
    if missing:
        raise MissingExtraError(
            f"{purpose} needs {', '.join(missing)}, which the core install leaves out: "
            f"{install_hint(extra)}"
        )


def import_extra(module: str, extra: str, purpose: str, note: str = "") -> ModuleType:
    """Imports `module`, or raises MissingExtraError naming `extra` ('reading x.pth.tar
    needs PyTorch: pip install 'volo-jax[torch]'' + `note`)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        names = dict(EXTRA_MODULES[extra])
        package = {"torch": "PyTorch"}.get(module, names.get(module, module))
        raise MissingExtraError(f"{purpose} needs {package}: {install_hint(extra)}{note}") from err
