"""The byte format and the atomic writes of session state files (``--state-dir``).

One file per session, ``<state-dir>/<model>/<sha256 of the session key>.ttas``::

    b"TTSF" | version 2 (1 byte) | HMAC-SHA256 under the server secret (32 bytes) | body
    body = header length (4 bytes, little endian) | JSON {"model", "key"} | snapshot

``key`` is the session's key (owner and sequence id, server/keys.py); the snapshot is
:meth:`Engine.snapshot_of`'s bytes. The MAC (server/sealing.py) means a file that was
edited, planted or copied from a server with another secret is refused before any of it is
parsed; version 1 files (plain sha256) are refused for the same reason. Every write is
atomic: a new temporary file in the same directory (``O_EXCL``, never through a link),
``fsync``, ``rename`` over the old file, ``fsync`` of the directory; a crash leaves either
the old or the new file, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path

from ttaserve.server.keys import SessionKey, parse_key
from ttaserve.server.safe_files import create_exclusive
from ttaserve.server.sealing import BadSeal, seal, unseal
from ttaserve.sessions import SequenceId

MAGIC = b"TTSF"
VERSION = 2
SUFFIX = ".ttas"
_PURPOSE = b"state-file"


class CorruptStateFile(ValueError):
    """A state file that fails its MAC, cannot be parsed or is not where it belongs."""


def file_name(sequence_id: SequenceId) -> str:
    """The file of a session key (int 5 and string "5" would be different files)."""
    kind = "int" if isinstance(sequence_id, int) else "str"
    return hashlib.sha256(f"{kind}:{sequence_id}".encode()).hexdigest() + SUFFIX


def encode_file(secret: bytes, model: str, key: SessionKey, snapshot: bytes) -> bytes:
    header = json.dumps({"model": model, "key": str(key)}).encode()
    body = len(header).to_bytes(4, "little") + header + snapshot
    return seal(secret, _PURPOSE, MAGIC, VERSION, body)


def decode_file(secret: bytes, data: bytes) -> tuple[str, SessionKey, bytes]:
    """(model, session key, snapshot bytes); raises CorruptStateFile."""
    try:
        body = unseal(secret, _PURPOSE, MAGIC, VERSION, data, "state file")
    except BadSeal as exc:
        raise CorruptStateFile(str(exc)) from exc
    size = int.from_bytes(body[:4], "little")
    try:
        header = json.loads(body[4:4 + size])
        model, key = header["model"], parse_key(header["key"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptStateFile(f"malformed state file header ({type(exc).__name__})") from exc
    if not isinstance(model, str) or key.scoped:
        raise CorruptStateFile("malformed state file header")
    return model, key, body[4 + size:]


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new content."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        create_exclusive(tmp, data)
    except FileExistsError:  # left by a crash of a process with the same pid: ours to remove
        tmp.unlink()
        create_exclusive(tmp, data)
    try:
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
