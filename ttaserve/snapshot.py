"""The byte format of a session snapshot (Snapshot/Restore RPCs and the state directory).

    b"TTAS" | format version (1 byte) | sha256 of the payload (32 bytes) | payload

The payload is a safetensors file of the state tensors whose metadata holds a JSON
description (model, policy, parameters, counters). Anything that does not match — wrong
magic, unknown version, checksum mismatch, truncation — raises :class:`SnapshotError`.
"""

from __future__ import annotations

import hashlib
import json
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
    tensors = load(payload)
    meta_json = _metadata(payload)
    return json.loads(meta_json), tensors


def _metadata(payload: bytes) -> str:
    # safetensors: 8-byte little-endian header length, then a JSON header with __metadata__
    size = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + size])
    return str(header.get("__metadata__", {}).get("ttaserve", "{}"))
