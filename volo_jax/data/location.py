"""Where a dataset is read from: `dataset_location(name, data_dir, workdir)`.

A TFDS name or a folder of <split>/<class>/<image> is read where it is; the built-in
dataset ('sklearn_digits', scikit-learn's handwritten digits) is first written as such a
folder (`volo_jax.data.digits`). Training, evaluation and their tests find the data here.
"""

from __future__ import annotations

import os

import jax
from jax.experimental import multihost_utils

from volo_jax.data.digits import prepare_digits_folder
from volo_jax.paths import is_remote

#: The name of the built-in dataset (configs/default.py).
DIGITS = "sklearn_digits"
#: Where the digits go without a data_dir and without a local workdir (a gs:// workdir
#: keeps them on the local disk).
DIGITS_CACHE = "~/.cache/volo_jax"


def dataset_location(name: str, data_dir: str | None, workdir: str | None) -> str:
    """`name` itself (a TFDS name or a folder), or for the built-in digits the local
    folder they are written to: <data_dir>/sklearn_digits, with data_dir defaulting to
    WORKDIR/data (or ~/.cache/volo_jax without a local workdir).

    `data_dir` must be local for the digits (`validate_config` checks it). On several
    processes, process 0 writes the folder and the others wait for it.
    """
    if name != DIGITS:
        return name
    local_workdir = workdir and not is_remote(workdir)
    default = os.path.join(workdir, "data") if local_workdir else os.path.expanduser(DIGITS_CACHE)
    folder = os.path.join(data_dir or default, DIGITS)
    if jax.process_count() > 1:
        if jax.process_index() == 0:
            prepare_digits_folder(folder)
        multihost_utils.sync_global_devices("volo_jax: digits folder written")
    return prepare_digits_folder(folder)
