"""Line files that several processes append to at once (handler journals, call records)."""

from __future__ import annotations

import os


def append_line(path: str, line: str) -> None:
    """Append ``line`` and a newline in one ``O_APPEND`` write: lines of concurrent
    processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
