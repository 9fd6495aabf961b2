"""Where files go: local paths and gs:// URLs through one layer, `etils.epath`.

Every directory and file that training, evaluation, `predict` and `convert` read or write
(workdir, checkpoints, weights directories, score maps, the config copy, metrics.jsonl,
curves.png, TensorBoard events) goes through `as_path`, so `--workdir=gs://bucket/run`
works like a local folder and no local `gs:` folder is ever made.

gs:// is served by gcsfs (fsspec), in the `gcs` and `train` extras. etils would
otherwise pick TensorFlow's gfile whenever TensorFlow is importable; importing this module
sets EPATH_USE_TF=0 unless the environment already sets it, so gcsfs serves gs:// in every
process of a run (TensorFlow's own GCS support varies by build and Python version).
On a Cloud TPU VM gcsfs finds the VM's credentials by itself.
"""

from __future__ import annotations

import os
import re

os.environ.setdefault("EPATH_USE_TF", "0")

from etils import epath

from volo_jax.errors import ConfigError
from volo_jax.extras import require_extra

Path = epath.Path
PathLike = str | os.PathLike

# A URL that lost a slash ('gs:/b/x', e.g. after os.path.normpath): as a local path it
# would make a folder named 'gs:'.
_MANGLED_URL = re.compile(r"^[a-z][a-z0-9+.-]*:/(?!/)", re.IGNORECASE)


def is_remote(path: PathLike) -> bool:
    """True for a URL such as gs://bucket/dir (anything with '://')."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """An `epath.Path` for a local path (made absolute, ~ expanded) or a URL (as given).

    Raises:
      ConfigError: a URL with a single slash after its scheme ('gs:/bucket/run').
      MissingExtraError: a gs:// URL without gcsfs installed.
    """
    text = os.fspath(path)
    if is_remote(text):
        if text.lower().startswith("gs://"):
            require_extra("gcs", f"the gs:// path {text}")
        return epath.Path(text)
    if _MANGLED_URL.match(text):
        raise ConfigError(
            f"{text!r} looks like a URL missing a slash; write "
            f"{text.split(':', 1)[0]}://{text.split(':/', 1)[1]} (two slashes)"
        )
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def join(directory: PathLike, *names: str) -> str:
    """`directory`/names as a string (a URL stays a URL)."""
    return os.fspath(as_path(directory).joinpath(*names))


def makedirs(path: PathLike) -> epath.Path:
    """Creates a local directory and its parents; a no-op for a URL (cloud storage has no
    directories, and gcsfs would create a missing bucket). Returns the path."""
    target = as_path(path)
    if not is_remote(target):
        target.mkdir(parents=True, exist_ok=True)
    return target


def read_bytes(path: PathLike) -> bytes:
    return as_path(path).read_bytes()


def write_text(path: PathLike, text: str) -> None:
    """Writes (replaces) a text file; a local directory is created if missing."""
    target = as_path(path)
    makedirs(target.parent)
    target.write_text(text)
