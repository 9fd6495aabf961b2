"""Quiet start-up for the command-line entry points: TensorFlow's native start-up lines
(oneDNN, cpu_feature_guard, TF-TRT, absl's "before absl::InitializeLog()") and other
libraries' INFO records stay out of a run's output; warnings and errors still show.

TensorFlow (used by the input pipeline, never by the model) reads TF_CPP_MIN_LOG_LEVEL
once, when it is first imported, so `quiet_native_logs` must run before that import:
first thing in an entry point. A value set in the environment is kept.
"""

from __future__ import annotations

import logging
import os
import sys

#: TensorFlow's (and XLA's) native log threshold: 0 INFO, 1 WARNING, 2 ERROR, 3 FATAL.
NATIVE_LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL"
#: The default: errors only.
QUIET_NATIVE_LOG_LEVEL = "2"

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def quiet_native_logs() -> None:
    """Sets TF_CPP_MIN_LOG_LEVEL to errors only, unless the environment sets it."""
    os.environ.setdefault(NATIVE_LOG_LEVEL, QUIET_NATIVE_LOG_LEVEL)


class OwnInfoOnly(logging.Filter):
    """Passes WARNING and above from everyone, INFO and below only from volo_jax and the
    running script (JAX's backend probing, matplotlib's font cache and orbax's per-file
    records are dropped)."""

    def __init__(self, script: str | None = None) -> None:
        super().__init__()
        script = script if script is not None else (sys.argv[0] if sys.argv else "")
        self._script = os.path.abspath(script) if script else None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        path = os.path.abspath(record.pathname)
        return path.startswith(_PACKAGE_DIR + os.sep) or path == self._script
