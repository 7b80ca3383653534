"""The byte format of a session snapshot (Snapshot/Restore RPCs and the state directory).

    b"TTAS" | format version (1 byte) | sha256 of the payload (32 bytes) | payload

The payload is a safetensors file of the state tensors whose metadata holds a JSON
description (model, policy, parameters, counters). Anything that does not match — wrong
magic, unknown version, checksum mismatch, truncation, a payload safetensors cannot read,
a description with missing fields or fields of the wrong type or range — raises
:class:`SnapshotError` (an InvalidInput). The checksum only detects accidents; the server
signs snapshots and state files with a keyed MAC on top (ttaserve/server/sealing.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch

from ttaserve.errors import InvalidInput

MAGIC = b"TTAS"
VERSION = 1
_HEADER = len(MAGIC) + 1 + 32


class SnapshotError(InvalidInput):
    """A snapshot that cannot be trusted (corrupt, truncated, other format)."""


def encode(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    payload = save(plain, metadata={"ttaserve": json.dumps(meta, sort_keys=True)})
    return MAGIC + bytes([VERSION]) + hashlib.sha256(payload).digest() + payload


def decode(data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load

    if len(data) < _HEADER or not data.startswith(MAGIC):
        raise SnapshotError("not a ttaserve snapshot (bad magic or truncated header)")
    if data[len(MAGIC)] != VERSION:
        raise SnapshotError(f"snapshot format version {data[len(MAGIC)]} is not supported "
                            f"(this server reads version {VERSION})")
    digest, payload = data[len(MAGIC) + 1 : _HEADER], data[_HEADER:]
    if hashlib.sha256(payload).digest() != digest:
        raise SnapshotError("snapshot checksum mismatch: the data is corrupt or truncated")
    try:
        tensors = load(payload)
        meta = json.loads(_metadata(payload))
    except Exception as exc:  # safetensors and json raise their own error types
        raise SnapshotError(f"snapshot payload is malformed ({type(exc).__name__})") from exc
    return check_meta(meta), tensors


_MAX_ENTRIES = 256  # keys in each mapping of the description (parameters, counters, signals)


def check_meta(meta: Any) -> dict[str, Any]:
    """The snapshot description, or SnapshotError if any field is missing or malformed."""
    if not isinstance(meta, dict):
        raise SnapshotError("snapshot description is not a JSON object")
    for name in ("model", "policy"):
        if not isinstance(meta.get(name), str):
            raise SnapshotError(f"snapshot field {name!r} must be a string")
    for name in ("batches", "samples"):
        _count(meta.get(name), name)
    _mapping(meta.get("params", {}), "params", lambda v: isinstance(v, (bool, int, float, str)))
    for name in ("resets", "skipped", "fallbacks"):
        _mapping(meta.get(name, {}), name, _is_count)
    _mapping(meta.get("signals", {}), "signals", _finite)
    if not _finite(meta.get("created", 0.0)):
        raise SnapshotError("snapshot field 'created' must be a finite number")
    return meta


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _count(value: Any, name: str) -> None:
    if not _is_count(value):
        raise SnapshotError(f"snapshot field {name!r} must be a whole number >= 0")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mapping(value: Any, name: str, valid: Any) -> None:
    if not isinstance(value, dict) or len(value) > _MAX_ENTRIES:
        raise SnapshotError(f"snapshot field {name!r} must be an object of at most {_MAX_ENTRIES} entries")
    for key, item in value.items():
        if not isinstance(key, str) or len(key) > 128 or not valid(item):
            raise SnapshotError(f"snapshot field {name!r} has a malformed entry")


def _metadata(payload: bytes) -> str:
    # safetensors: 8-byte little-endian header length, then a JSON header with __metadata__
    size = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + size])
    return str(header.get("__metadata__", {}).get("ttaserve", "{}"))
