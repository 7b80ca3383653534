"""The server secret that signs snapshots and state files (server/sealing.py).

Where it comes from, first match wins:

1. ``--secret-file FILE``: its bytes (at least 32, surrounding whitespace ignored). Give
   replicas that move sessions between each other (Snapshot/Restore) the same file.
2. ``TTASERVE_SECRET`` / ``ServerSettings.secret``: hex (``ttaserve ray-serve`` passes its
   replicas one this way when it has no ``--secret-file``).
3. ``--state-dir DIR``: ``DIR/.secret``, created on first start (0600, 32 random bytes as
   hex), so state files written before a restart verify after it.
4. Otherwise 32 random bytes for this process: snapshots restore only into the process
   that took them.

Secret files are opened without following symbolic links and must be regular files; one
readable by other users is used but logged as a warning.
"""

from __future__ import annotations

import logging
import secrets
import stat
from pathlib import Path

from ttaserve.server.safe_files import create_exclusive, read_regular

log = logging.getLogger(__name__)

MIN_SECRET_BYTES = 32
SECRET_NAME = ".secret"


def load_secret(secret_file: str | None, state_dir: str | None, secret_hex: str | None = None) -> bytes:
    if secret_file:
        return _read(Path(secret_file))
    if secret_hex:
        try:
            secret = bytes.fromhex(secret_hex)
        except ValueError:
            raise ValueError("TTASERVE_SECRET must be hex") from None
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"TTASERVE_SECRET holds {len(secret)} bytes; it needs at least {MIN_SECRET_BYTES}")
        return secret
    if state_dir:
        path = Path(state_dir) / SECRET_NAME
        Path(state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        _create(path)
        return _read(path)
    log.info("no --secret-file or --state-dir: snapshots are signed with a per-process key")
    return secrets.token_bytes(MIN_SECRET_BYTES)


def _create(path: Path) -> None:
    try:
        create_exclusive(path, secrets.token_hex(MIN_SECRET_BYTES).encode() + b"\n")
    except FileExistsError:
        return
    log.info("created the server secret %s", path)


def _read(path: Path) -> bytes:
    data, mode = read_regular(path, 4096)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("secret file %s is accessible to other users (mode %o); chmod 600 it", path, mode & 0o777)
    secret = data.strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"secret file {path} holds {len(secret)} bytes; it needs at least {MIN_SECRET_BYTES}")
    return secret
