"""The state directory (issue 11, defects 5 and 7): only regular files are read, never past
their size limit and never through a link; start-up never blocks; disk is bounded by a
budget and a TTL; files are signed, so crafted ones are refused."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from tests.server.conftest import Handle, images, infer_input, running_server
from ttaserve.server.keys import SessionKey
from ttaserve.server.state_files import MAGIC, file_name


def _send(handle: Handle, sequence_id: object, policy: str = "unmix-tns", seed: int = 0) -> None:
    handle.client().infer("demo", [infer_input(images(4, seed))], sequence_id=sequence_id,
                          parameters={"tta_policy": policy})


def _path(root: Path, sequence_id: int | str) -> Path:
    return root / "demo" / file_name(SessionKey("anonymous", sequence_id))


def _metric(handle: Handle, text: str) -> float:
    page = urllib.request.urlopen(handle.metrics_url, timeout=10).read().decode()
    for line in page.splitlines():
        if line.startswith(text):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _one_good_file(root: Path, sequence_id: int = 1) -> bytes:
    with running_server(state_dir=str(root)) as handle:
        _send(handle, sequence_id)
    return _path(root, sequence_id).read_bytes()


def test_special_files_never_block_start_up_nor_get_read(tmp_path: Path) -> None:
    good = _one_good_file(tmp_path)
    demo = tmp_path / "demo"
    os.mkfifo(demo / ("f" * 64 + ".ttas"))                                  # a FIFO: open() would block
    (demo / ("z" * 64 + ".ttas")).symlink_to("/dev/zero")                   # a device, endless
    outside = tmp_path / "outside.ttas"
    outside.write_bytes(good)
    (demo / ("o" * 64 + ".ttas")).symlink_to(outside)                       # a valid file elsewhere
    (demo / ("d" * 64 + ".ttas")).symlink_to(tmp_path / "missing")         # dangling
    (demo / ("t" * 64 + ".ttas")).mkdir()                                  # a directory
    unix = socket.socket(socket.AF_UNIX)
    here = os.getcwd()
    os.chdir(demo)  # a socket path must be short: bind it relative to the directory
    try:
        unix.bind("s.ttas")                                                 # a socket
    finally:
        os.chdir(here)
    if os.geteuid() == 0:  # creating a device node needs root
        os.mknod(demo / ("c" * 64 + ".ttas"), 0o600 | 0o020000, os.makedev(1, 5))
    started = time.monotonic()
    with running_server(state_dir=str(tmp_path)) as handle:
        assert time.monotonic() - started < 60
        assert handle.session(1) is not None and len(handle.engine().sessions) == 1
        corrupt = _metric(handle, 'ttaserve_state_files_total{model="demo",outcome="corrupt"}')
        assert corrupt == (7 if os.geteuid() == 0 else 6)
    unix.close()
    assert outside.read_bytes() == good  # followed by nothing, moved by nothing
    assert not [p for p in demo.glob("*.ttas") if p.is_symlink()]


def test_oversized_files_are_set_aside_unread_and_not_written(tmp_path: Path) -> None:
    _one_good_file(tmp_path)
    big = tmp_path / "demo" / ("b" * 64 + ".ttas")
    with big.open("wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB of zeros without the disk space
    with running_server(state_dir=str(tmp_path), state_max_file_bytes=100_000) as handle:
        assert handle.session(1) is None  # the good file (~400 KB) is over this limit too
        assert _metric(handle, 'ttaserve_state_files_total{model="demo",outcome="corrupt"}') == 2
        _send(handle, 2)
        assert handle.server.repository.get("demo").state_store.flush() == 0  # type: ignore[union-attr]
        assert _metric(handle, 'ttaserve_state_files_total{model="demo",outcome="too_large"}') == 1
    assert not _path(tmp_path, 2).exists()


def test_disk_budget_bounds_what_one_client_writes(tmp_path: Path) -> None:
    size = len(_one_good_file(tmp_path / "probe"))
    budget = 3 * size + size // 2
    with running_server(state_dir=str(tmp_path), state_max_bytes=budget, max_sessions=1) as handle:
        for i in range(10):  # each new session evicts the previous one to disk
            _send(handle, 100 + i, seed=i)
            on_disk = sum(p.stat().st_size for p in (tmp_path / "demo").glob("*.ttas"))
            assert on_disk <= budget
        assert _metric(handle, 'ttaserve_state_files_total{model="demo",outcome="dropped_for_space"}') >= 5
        _send(handle, 109, seed=1)  # the newest evicted sessions are still revivable
        _send(handle, 108, seed=1)
        assert _metric(handle, 'ttaserve_state_files_total{model="demo",outcome="revived"}') == 1


def test_files_of_sessions_that_are_not_live_expire(tmp_path: Path) -> None:
    with running_server(state_dir=str(tmp_path), state_ttl_s=1.0, state_interval_s=0.2, max_sessions=1) as handle:
        _send(handle, 1)
        _send(handle, 2)  # evicts 1 to disk
        assert _path(tmp_path, 1).exists()
        deadline = time.monotonic() + 20
        while _path(tmp_path, 1).exists():
            assert time.monotonic() < deadline, "the expired file was not deleted"
            time.sleep(0.1)
        assert _path(tmp_path, 2).exists() or handle.session(2) is not None  # live: kept
    old = time.time() - 3600
    os.utime(_path(tmp_path, 2), (old, old))
    with running_server(state_dir=str(tmp_path), state_ttl_s=600) as handle:
        assert handle.session(2) is None and not _path(tmp_path, 2).exists()
        assert _metric(handle, 'ttaserve_state_files_total{model="demo",outcome="expired"}') == 1


def test_a_restart_restores_without_rewriting(tmp_path: Path) -> None:
    with running_server(state_dir=str(tmp_path), max_sessions=2) as handle:
        for i in range(6):
            _send(handle, i + 1, policy="tent", seed=i)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "demo").glob("*.ttas")}
    assert len(before) == 6
    with running_server(state_dir=str(tmp_path), max_sessions=2) as handle:
        assert _metric(handle, 'ttaserve_state_files_total{model="demo",outcome="restored"}') == 6
        assert _metric(handle, "ttaserve_state_writes_total") == 0
        assert handle.session(6) is not None and handle.session(5) is not None  # the newest stay live
        assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "demo").glob("*.ttas")} == before
        handle.client().infer("demo", [infer_input(images(4))], sequence_id=1)  # revived from disk
        assert handle.session(1).batches == 2


def test_crafted_files_are_refused(tmp_path: Path) -> None:
    good = _one_good_file(tmp_path, 1)
    demo = tmp_path / "demo"
    # the version 1 format: a plain sha256 anyone can recompute
    body = good[4 + 1 + 32:]
    _path(tmp_path, 2).write_bytes(MAGIC + bytes([1]) + hashlib.sha256(body).digest() + body)
    # signed with another server's secret
    other = tmp_path / "other"
    _path(other, 3).parent.mkdir(parents=True)
    foreign = _one_good_file(other, 3)
    _path(tmp_path, 3).write_bytes(foreign)
    # a genuine file copied over another session's name
    _path(tmp_path, 4).write_bytes(good)
    # a genuine body with one flipped bit
    flipped = bytearray(good)
    flipped[-7] ^= 1
    _path(tmp_path, 5).write_bytes(bytes(flipped))
    with running_server(state_dir=str(tmp_path)) as handle:
        assert [s for s in handle.engine().sessions.live()] == [handle.session(1)]
        assert len(list(demo.glob("*.corrupt"))) == 4


def test_a_linked_model_directory_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "demo").symlink_to(elsewhere)
    with pytest.raises(ValueError, match="not a directory"):
        with running_server(state_dir=str(tmp_path / "state")):
            pass
    assert not list(elsewhere.iterdir())


def test_state_files_hold_no_plain_secret(tmp_path: Path) -> None:
    good = _one_good_file(tmp_path)
    secret = (tmp_path / ".secret").read_bytes().strip()
    assert secret not in good
    size = int.from_bytes(good[37:41], "little")
    assert json.loads(good[41:41 + size]) == {"model": "demo", "key": "anonymous/n:1"}
