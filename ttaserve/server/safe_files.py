"""Reading and writing the server's own files without trusting what is at their paths.

Whoever can create entries in the state directory must not be able to make the server
hang (a FIFO blocks a plain ``open``/``read`` forever), read elsewhere (a symbolic link to
another file), or grow without bound (a link to /dev/zero, a huge file). So files are
opened with ``O_NOFOLLOW | O_NONBLOCK``, checked with ``fstat`` on the open descriptor to
be regular files (no FIFOs, sockets or devices; no race between check and use), and read
only up to a size limit. New files are created with ``O_EXCL | O_NOFOLLOW`` and mode 0600,
so a planted link at a temporary name is never written through.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class UnsafeFile(ValueError):
    """A path that is not a regular file of acceptable size."""


def read_regular(path: Path, max_bytes: int) -> tuple[bytes, int]:
    """(contents, mode) of the regular file at ``path``, at most ``max_bytes`` long."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(f"{path} is a symbolic link; only regular files are read") from exc
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile(f"{path} is not a regular file (FIFO, socket or device)")
        if info.st_size > max_bytes:
            raise UnsafeFile(f"{path} is {info.st_size} bytes, over the limit of {max_bytes}")
        chunks, total = [], 0
        while total <= max_bytes:  # the file may grow while it is read
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise UnsafeFile(f"{path} grew past the limit of {max_bytes} bytes while being read")
        return b"".join(chunks), info.st_mode
    finally:
        os.close(fd)


def create_exclusive(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file at ``path`` (0600) and fsync it; fails if anything,
    a link included, is already there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
