"""Progress output: a bar that redraws cleanly on a (pseudo-)terminal, plain lines when piped,
nothing when quiet; metrics labelled by where they come from."""

import fcntl
import io
import os
import pty
import re
import select
import struct
import termios

from cotune.progress import Progress, eval_fields

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def screen(raw: str) -> list[str]:
    """What a terminal shows: carriage returns overwrite the line from its start."""
    shown = []
    for line in ANSI.sub("", raw).replace("\r\n", "\n").split("\n"):
        buf: list[str] = []
        pos = 0
        for ch in line:
            if ch == "\r":
                pos = 0
                continue
            if pos < len(buf):
                buf[pos] = ch
            else:
                buf.append(ch)
            pos += 1
        shown.append("".join(buf).rstrip())
    return [s for s in shown if s]


def drain(fd: int) -> str:
    """Everything written to the terminal so far (a pty hands it over in pieces)."""
    out = b""
    while select.select([fd], [], [], 0.5)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
    return out.decode()


def test_a_terminal_bar_redraws_without_leftovers_and_labels_its_metrics():
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 160 columns
    with os.fdopen(slave, "w") as term:
        bar = Progress(4, "central demo", stream=term)
        assert bar.tty
        bar.update(1, train_loss=0.8555123)
        bar.update(1, train_loss=0.85)
        bar.phase("evaluating")
        bar.update(0, **eval_fields({"accuracy": 0.85, "examples": 200}))
        bar.phase("training")
        bar.update(2, train_loss=0.5)
        bar.close()
        term.flush()
        raw = drain(master)
    os.close(master)
    last = screen(raw)[-1]
    assert "central demo · training" in last and "4/4" in last
    assert "train_loss=0.5" in last and "eval_accuracy=0.85" in last
    assert "0.8555" not in last and "examples" not in last  # nothing left over, headline only


def test_piped_output_gets_plain_lines_and_a_last_one():
    out = io.StringIO()
    bar = Progress(3, "fedavg demo", stream=out, unit="round", every_s=0.0)
    bar.phase("round 1/3: devices training")
    bar.update(1, train_loss=1.25)
    bar.update(2, eval_accuracy=0.7)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("fedavg demo: round 1/3: devices training, 1/3 rounds")
    assert "train_loss=1.25" in lines[0]
    assert (
        lines[-1].startswith("fedavg demo: done, 3/3 rounds") and "eval_accuracy=0.7" in lines[-1]
    )
    assert "\r" not in out.getvalue()


def test_quiet_prints_nothing():
    out = io.StringIO()
    with Progress(2, "x", stream=out, quiet=True, every_s=0.0) as bar:
        bar.update(2, train_loss=1.0)
    assert out.getvalue() == ""
