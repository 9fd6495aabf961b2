"""Quiet start-up for the command-line entry points: TensorFlow's native start-up lines
(oneDNN, cpu_feature_guard, TF-TRT, absl's "before absl::InitializeLog()") and other
libraries' INFO records stay out of a run's output; warnings and errors still show.

TensorFlow (used by the input pipeline, never by the model) reads TF_CPP_MIN_LOG_LEVEL
once, when it is first imported, so `quiet_native_logs` must run before that import:
first thing in an entry point. A value set in the environment is kept.

Some of TensorFlow's start-up lines ignore TF_CPP_MIN_LOG_LEVEL: they are written through
absl before its logging is initialised, straight to file descriptor 2. Which ones depends
on the CPU (cpu_feature_guard names the instructions the binary was not built for; oneDNN
is on by default on CPUs with AVX-512 VNNI/BF16 or AMX, or with TF_ENABLE_ONEDNN_OPTS=1)
and on the CUDA libraries installed. So TensorFlow is imported only through
`volo_jax.data.tf_quiet`, which holds file descriptor 2 while the import runs
(`native_startup_lines_held`) and passes on every line that is not one of those.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

#: TensorFlow's (and XLA's) native log threshold: 0 INFO, 1 WARNING, 2 ERROR, 3 FATAL.
NATIVE_LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL"
#: The default: errors only.
QUIET_NATIVE_LOG_LEVEL = "2"

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def quiet_native_logs() -> None:
    """Sets TF_CPP_MIN_LOG_LEVEL to errors only, unless the environment sets it."""
    os.environ.setdefault(NATIVE_LOG_LEVEL, QUIET_NATIVE_LOG_LEVEL)


#: TensorFlow's native start-up lines: absl's notice, INFO/WARNING records from the files
#: that report the CPU's features, oneDNN, TensorRT and the CUDA libraries, the second line
#: of cpu_feature_guard's message, and the CUDA factories' "Unable to register" errors (a
#: second CUDA library in the process, e.g. jax's plugin, registered them first).
STARTUP_LINE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:.]+ +\d+ (port|cpu_feature_guard|cudart_stub|py_utils|cuda_\w+)\.cc:\d+\] "
    r"|To enable the following instructions: .* rebuild TensorFlow"
    r"|E\d{4} [\d:.]+ +\d+ cuda_\w+\.cc:\d+\] Unable to register cu\w+ factory"
    r"|TF-TRT Warning: Could not find TensorRT"
)


def drop_startup_lines(text: str) -> str:
    """`text` without TensorFlow's native start-up lines (`STARTUP_LINE`)."""
    lines = text.splitlines(keepends=True)
    return "".join(line for line in lines if not STARTUP_LINE.match(line))


@contextlib.contextmanager
def native_startup_lines_held() -> Iterator[None]:
    """Holds what is written to file descriptor 2 in the block, then writes it back to
    stderr without TensorFlow's start-up lines (`drop_startup_lines`)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            rest = drop_startup_lines(held.read().decode(errors="replace"))
            if rest:
                sys.stderr.write(rest)
                sys.stderr.flush()


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
