"""Progress of the long loops (training steps, evaluation and prediction batches) that a
person can read wherever the output goes: a tqdm bar when the stream is a terminal,
otherwise whole lines (never a carriage return) at a fixed period, so that a log file,
`nohup` output or a pod's log holds one readable line per period:

  step 220/880  loss 2.1034  lr 9.51e-04  img/s 812.4  ETA 0:03:12
  eval 2560/50000 img  1210.7 img/s  ETA 0:00:39

Rates and ETAs are measured from the end of the first update on, so the first call's
compilation does not count; they cover what happened between two lines (evaluation and
checkpoints included, which the remaining steps will also pay for).
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class Progress:
    """Progress through `total` units (steps, images) from `initial`.

    On a terminal (`stream.isatty()`, or `bar=True`): a tqdm bar with rate and ETA, and
    `log` fields as its postfix. Otherwise: a line for every `log` call, and with `every`
    a line whenever the position passes a multiple of `every` short of the total; `close`
    ends with a summary line.
    Nothing at all when `enabled` is False (processes other than 0).
    """

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        unit: str = "step",
        desc: str = "step",
        every: int | None = None,
        enabled: bool = True,
        stream: TextIO | None = None,
        bar: bool | None = None,
    ) -> None:
        self.total, self.position, self.unit, self.desc = total, initial, unit, desc
        self.every = every
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.is_bar = enabled and (_isatty(self.stream) if bar is None else bar)
        self._start = time.perf_counter()
        self._first: tuple[float, int] | None = None  # (time, position) after the first update
        self._window: tuple[float, int] | None = None  # since the last line
        self._bar = None
        if self.is_bar:
            from tqdm import tqdm

            # A terminal of no size (`script`, `docker run -t`) would get a bar of no width.
            width = (
                {"dynamic_ncols": True} if _has_size(self.stream) else {"ncols": 100, "nrows": 24}
            )
            self._bar = tqdm(
                total=total,
                initial=initial,
                unit=unit,
                desc=None if desc == unit else desc,
                file=self.stream,
                **width,
            )

    def update(self, n: int = 1) -> None:
        """Advances by `n` units."""
        if not self.enabled:
            return
        before, self.position = self.position, self.position + n
        if self._first is None:
            self._first = self._window = (time.perf_counter(), self.position)
        if self._bar is not None:
            self._bar.update(n)
        elif (
            self.every
            and self.position < self.total  # the end is `close`'s summary
            and self.position // self.every > before // self.every
        ):
            self._line({})

    def log(self, fields: Mapping[str, str]) -> None:
        """Shows `fields` ({'loss': '2.3026', ...}, formatted): the bar's postfix, or a line."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(fields)
        else:
            self._line(fields)

    def write(self, message: str) -> None:
        """Prints a line of its own (above the bar on a terminal)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            return
        line = f"{self.desc} {self.position}/{self.total}" + (
            "" if self.desc == self.unit else f" {self.unit}"
        )
        line += f" done in {_duration(time.perf_counter() - self._start)}"
        rate = _rate(self._first, self.position)
        if rate:
            line += f" ({rate:.1f} {self.unit}/s)"
        print(line, file=self.stream, flush=True)

    def _line(self, fields: Mapping[str, str]) -> None:
        parts = [f"{self.desc} {self.position}/{self.total}" + ("" if fields else f" {self.unit}")]
        parts += [f"{name} {value}" for name, value in fields.items()]
        rate = _rate(self._window, self.position)
        if rate:
            if not fields:
                parts.append(f"{rate:.1f} {self.unit}/s")
            if self.position < self.total:
                parts.append(f"ETA {_duration((self.total - self.position) / rate)}")
        print("  ".join(parts), file=self.stream, flush=True)
        self._window = (time.perf_counter(), self.position)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _rate(since: tuple[float, int] | None, position: int) -> float:
    """Units per second from `since` (time, position) to now; 0 when nothing to measure."""
    if since is None:
        return 0.0
    elapsed, done = time.perf_counter() - since[0], position - since[1]
    return done / elapsed if elapsed > 0 and done > 0 else 0.0


def _has_size(stream: TextIO) -> bool:
    """Whether the terminal reports its size (columns and lines)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return size.columns > 0 and size.lines > 0


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False
