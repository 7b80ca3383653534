"""The checked-in stubs are exactly what `python -m ttaserve.proto.generate` produces."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ttaserve.proto.generate import PROTO_DIR, generate


def test_generated_stubs_are_up_to_date() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for fresh in generate(Path(tmp)):
            checked_in = PROTO_DIR / fresh.name
            assert checked_in.exists(), f"{fresh.name} missing: run python -m ttaserve.proto.generate"
            assert checked_in.read_text() == fresh.read_text(), (
                f"{fresh.name} is stale: run python -m ttaserve.proto.generate"
            )
