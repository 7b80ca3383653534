"""--state-dir: atomic state files, restore at start, eviction without loss, corrupt files
skipped, and a real SIGKILL of a `ttaserve serve` process."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.server.conftest import Handle, images, infer_input, running_server, start_process
from ttaserve import snapshot
from ttaserve.server.keys import SessionKey
from ttaserve.server.state_files import CorruptStateFile, decode_file, encode_file, file_name


def _send(handle_or_url: Handle | str, sequence_id: object, x: np.ndarray, policy: str = "tent",
          adapt: bool = True) -> bytes:
    from tritonclient.grpc import InferenceServerClient

    url = handle_or_url if isinstance(handle_or_url, str) else handle_or_url.url
    params = {"tta_policy": policy, "tta_adapt": adapt}
    result = InferenceServerClient(url).infer("demo", [infer_input(x)], sequence_id=sequence_id,
                                              parameters=params)
    return result.as_numpy("logits").tobytes()


def _path(directory: Path, sequence_id: int | str) -> Path:
    return directory / "demo" / file_name(key(sequence_id))


def _batches_on_disk(directory: Path, sequence_id: int | str) -> int | None:
    path = _path(directory, sequence_id)
    if not path.exists():
        return None
    _, _, snap = decode_file((directory / ".secret").read_bytes().strip(), path.read_bytes())
    return int(snapshot.decode(snap)[0]["batches"])


def _wait_for(condition, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_file_format_detects_corruption_and_truncation() -> None:
    secret = b"s" * 32
    data = encode_file(secret, "demo", key("cam-1"), b"snapshot bytes")
    assert decode_file(secret, data) == ("demo", key("cam-1"), b"snapshot bytes")
    flipped = bytearray(data)
    flipped[-3] ^= 0x01
    for bad in (bytes(flipped), data[:-5], data[:10], b"", b"TTSF\x09" + data[5:]):
        with pytest.raises(CorruptStateFile):
            decode_file(secret, bad)
    with pytest.raises(CorruptStateFile, match="signature"):  # another server's secret
        decode_file(b"t" * 32, data)
    assert file_name(key(5)) != file_name(key("5"))


def test_sessions_survive_a_graceful_restart(tmp_path: Path) -> None:
    probe = images(8, 2)
    with running_server(state_dir=str(tmp_path), state_interval_s=60) as handle:
        for seed in range(3):
            _send(handle, 7, images(8, 10 + seed))
            _send(handle, "cam/é", images(8, 20 + seed), policy="unmix-tns")
        expected = {7: _send(handle, 7, probe, adapt=False),
                    "cam/é": _send(handle, "cam/é", probe, "unmix-tns", adapt=False)}
        handle.call(handle.server.stop(1.0))  # SIGTERM path: drain, then write everything
    assert _batches_on_disk(tmp_path, 7) == 4  # adapt=False requests count as batches too
    with running_server(state_dir=str(tmp_path)) as handle:
        sessions = handle.engine().sessions
        assert sessions.get(key(7)).batches == 4 and sessions.get(key("cam/é")).policy == "unmix-tns"
        assert _send(handle, 7, probe) == expected[7]
        assert _send(handle, "cam/é", probe, "unmix-tns") == expected["cam/é"]


def test_evicted_session_comes_back_from_disk(tmp_path: Path) -> None:
    probe = images(8, 3)
    with running_server(state_dir=str(tmp_path), max_sessions=2) as handle:
        _send(handle, 1, images(8, 1))
        _send(handle, 1, images(8, 2))
        expected = _send(handle, 1, probe, adapt=False)
        _send(handle, 2, images(8, 4))
        _send(handle, 3, images(8, 5))  # evicts 1 (least recently used): written to disk
        assert handle.session(1) is None
        assert _batches_on_disk(tmp_path, 1) == 3
        assert _send(handle, 1, probe) == expected  # revived with its state, not fresh
        assert handle.session(1).batches == 4


def test_ended_sequence_leaves_no_file(tmp_path: Path) -> None:
    with running_server(state_dir=str(tmp_path), state_interval_s=0.1) as handle:
        _send(handle, 9, images(4))
        _wait_for(lambda: _batches_on_disk(tmp_path, 9) == 1)
        handle.client().infer("demo", [infer_input(images(4))], sequence_id=9, sequence_end=True)
        assert _batches_on_disk(tmp_path, 9) is None
        assert not list((tmp_path / "demo").glob("*.ttas"))


def test_corrupt_and_truncated_files_are_skipped(tmp_path: Path) -> None:
    with running_server(state_dir=str(tmp_path)) as handle:
        _send(handle, 11, images(4))
        _send(handle, 12, images(4))
        handle.call(handle.server.stop(1.0))
    good, bad = (_path(tmp_path, i) for i in (11, 12))
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    truncated = _path(tmp_path, 13)
    truncated.write_bytes(good.read_bytes()[:50])
    with running_server(state_dir=str(tmp_path)) as handle:
        sessions = handle.engine().sessions
        assert sessions.get(key(11)).batches == 1 and sessions.get(key(12)) is None and sessions.get(key(13)) is None
        assert sorted(p.name for p in (tmp_path / "demo").glob("*.corrupt")) == sorted(
            [bad.name + ".corrupt", truncated.name + ".corrupt"])
        text = urllib.request.urlopen(handle.metrics_url, timeout=10).read().decode()
        assert 'ttaserve_state_files_total{model="demo",outcome="corrupt"} 2.0' in text
        assert 'ttaserve_state_files_total{model="demo",outcome="restored"} 1.0' in text
        _send(handle, 12, images(4))  # the id simply starts fresh


def _start(state_dir: Path) -> tuple[subprocess.Popen, str, str]:
    return start_process("--state-dir", str(state_dir), "--state-interval", "0.3", "--torch-threads", "1")


def test_sigkill_mid_stream_loses_at_most_the_last_interval(tmp_path: Path) -> None:
    probe = images(8, 99)
    proc, url, _ = _start(tmp_path)
    try:
        for seed in range(4):
            _send(url, 21, images(8, seed))
            _send(url, "cam-b", images(8, 50 + seed), policy="unmix-tns")
        expected = {21: _send(url, 21, probe, adapt=False),
                    "cam-b": _send(url, "cam-b", probe, "unmix-tns", adapt=False)}
        # The periodic writer catches up within an interval or two.
        _wait_for(lambda: _batches_on_disk(tmp_path, 21) == 5 and _batches_on_disk(tmp_path, "cam-b") == 5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc, url, metrics_url = _start(tmp_path)
    try:
        assert _send(url, 21, probe) == expected[21]  # continues exactly where it was written
        assert _send(url, "cam-b", probe, "unmix-tns") == expected["cam-b"]
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        assert 'ttaserve_state_files_total{model="demo",outcome="restored"} 2.0' in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert _batches_on_disk(tmp_path, 21) == 6  # the graceful stop wrote the last batch
    finally:
        if proc.poll() is None:
            proc.kill()


def key(sequence_id: int | str) -> SessionKey:
    """The engine key of an unauthenticated client's sequence (server/keys.py)."""
    return SessionKey("anonymous", sequence_id)
