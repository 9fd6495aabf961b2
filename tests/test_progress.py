"""volo_jax.progress: a bar on a terminal (a real pseudo-terminal here), whole lines in a
file, nothing on processes other than 0."""

from __future__ import annotations

import os
import re
import select
import struct
import sys

import pytest

from volo_jax.progress import Progress


def _eval_like(stream, **kwargs) -> None:
    with Progress(10, unit="img", desc="eval", every=4, stream=stream, **kwargs) as progress:
        for n in (3, 3, 3, 1):
            progress.update(n)


def test_lines_in_a_file_at_every_period_without_carriage_returns(tmp_path):
    path = tmp_path / "log.txt"
    with open(path, "w") as f:
        _eval_like(f)
    text = path.read_text()
    assert "\r" not in text
    lines = text.splitlines()
    # Positions 3, 6, 9, 10: the period of 4 is passed at 6 and 9; then the summary.
    assert len(lines) == 3, text
    assert re.fullmatch(r"eval 6/10 img  [\d.]+ img/s  ETA \d+:\d\d:\d\d", lines[0]), lines
    assert re.fullmatch(r"eval 9/10 img  [\d.]+ img/s  ETA \d+:\d\d:\d\d", lines[1]), lines
    assert re.fullmatch(r"eval 10/10 img done in \d+:\d\d:\d\d \([\d.]+ img/s\)", lines[2]), lines


def test_logged_fields_make_a_line_with_the_eta(tmp_path):
    path = tmp_path / "log.txt"
    with open(path, "w") as f:
        progress = Progress(8, initial=2, stream=f)
        for step in range(3, 9):
            progress.update(1)
            if step % 3 == 0:
                progress.log({"loss": f"{1 / step:.4f}", "lr": "1.00e-03", "img/s": "12.5"})
        progress.write("step 8: checkpoint saved")
        progress.close()
    lines = path.read_text().splitlines()
    assert lines[0] == "step 3/8  loss 0.3333  lr 1.00e-03  img/s 12.5", lines  # no rate yet
    assert re.fullmatch(r"step 6/8  loss 0.1667  lr 1.00e-03  img/s 12.5  ETA \S+", lines[1])
    assert lines[2] == "step 8: checkpoint saved"
    assert lines[3].startswith("step 8/8 done in "), lines
    assert len(lines) == 4


def test_nothing_when_disabled(tmp_path):
    path = tmp_path / "log.txt"
    with open(path, "w") as f:
        _eval_like(f, enabled=False)
        Progress(5, stream=f, enabled=False).write("hello")
    assert path.read_text() == ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pseudo-terminal: Linux")
@pytest.mark.parametrize("size", [(24, 100), (0, 0)])  # (0, 0): no size, as under `script`
def test_a_bar_on_a_terminal(size, monkeypatch):
    import fcntl
    import termios

    main_fd, terminal_fd = os.openpty()
    fcntl.ioctl(terminal_fd, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
    try:
        with open(terminal_fd, "w", closefd=True) as terminal:
            assert terminal.isatty()
            # As the process's stderr: tqdm sizes its bar from the terminal only there.
            monkeypatch.setattr(sys, "stderr", terminal)
            _eval_like(None)
            monkeypatch.undo()
        chunks = []
        while select.select([main_fd], [], [], 0.5)[0]:
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:  # the terminal side is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(main_fd)
    text = b"".join(chunks).decode()
    assert "\r" in text and "10/10" in text and "img/s" in text, text
    assert "ETA" not in text and "done in" not in text  # tqdm's own layout, not the lines
