"""Signed bytes: what the server wrote (a snapshot, a state file), checked on the way back in.

A plain checksum only detects accidents: whoever can write the bytes can recompute it. A
keyed MAC (HMAC-SHA256 under the server secret, server/secret.py) can only be produced by a
holder of the secret, so a snapshot or state file that was crafted or edited is refused
before any of it is parsed. ``purpose`` is part of the MAC, so bytes signed as one kind of
object are not accepted as another::

    magic (4 bytes) | version (1 byte) | HMAC-SHA256(secret, purpose | magic | version | body) | body
"""

from __future__ import annotations

import hashlib
import hmac

from ttaserve.errors import InvalidInput

MAC_BYTES = 32


class BadSeal(InvalidInput):
    """Bytes that were not signed by this server's secret (or were changed since)."""


def seal(secret: bytes, purpose: bytes, magic: bytes, version: int, body: bytes) -> bytes:
    head = magic + bytes([version])
    return head + _mac(secret, purpose, head, body) + body


def unseal(secret: bytes, purpose: bytes, magic: bytes, version: int, data: bytes, what: str) -> bytes:
    """The body of sealed bytes; raises BadSeal, saying what is wrong with them."""
    head = magic + bytes([version])
    if len(data) < len(head) + MAC_BYTES or not data.startswith(magic):
        raise BadSeal(f"not a ttaserve {what} (bad magic or truncated)")
    if data[len(magic)] != version:
        raise BadSeal(f"{what} format version {data[len(magic)]} is not supported (this server "
                      f"reads version {version}; older unsigned ones cannot be trusted)")
    mac, body = data[len(head):len(head) + MAC_BYTES], data[len(head) + MAC_BYTES:]
    if not hmac.compare_digest(mac, _mac(secret, purpose, head, body)):
        raise BadSeal(f"{what} signature mismatch: it is corrupt, was changed, or was made by a "
                      "server with another secret (replicas that exchange snapshots need the same "
                      "--secret-file)")
    return body


def _mac(secret: bytes, purpose: bytes, head: bytes, body: bytes) -> bytes:
    mac = hmac.new(secret, purpose + b"\0" + head, hashlib.sha256)
    mac.update(body)
    return mac.digest()
