"""What every command-line entry point shares: one clear line for user errors."""

from __future__ import annotations

import sys
from collections.abc import Callable

from volo_jax.errors import VoloJaxError


def run_cli(main: Callable[[], int | None]) -> None:
    """Runs `main`, turning a `VoloJaxError` into 'error: ...' and exit status 2."""
    try:
        status = main()
    except VoloJaxError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status or 0)
