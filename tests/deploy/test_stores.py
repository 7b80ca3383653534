"""Both snapshot stores behind one interface: records, tokens, compare-and-set.
The Redis store runs against a real redis-server on a loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ttaserve.deploy.stores import ANY, DirectoryStore, RedisStore, SnapshotStore, open_store


@pytest.fixture(params=["directory", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SnapshotStore]:
    if request.param == "directory":
        s: SnapshotStore = open_store(f"file://{tmp_path / 'states'}")
        assert isinstance(s, DirectoryStore)
    else:
        url = request.getfixturevalue("redis_url")
        s = open_store(url)
        assert isinstance(s, RedisStore)
        s.client.flushdb()
    yield s
    s.close()


def test_write_read_delete(store: SnapshotStore) -> None:
    assert store.read("demo/a") is None and store.token("demo/a") is None
    token = store.write("demo/a", b"one")
    assert token is not None
    record = store.read("demo/a")
    assert record is not None and record.data == b"one" and record.token == token == store.token("demo/a")
    assert store.keys() == ["demo/a"] and store.keys("demo/") == ["demo/a"] and store.keys("other/") == []
    assert store.delete("demo/a")
    assert store.read("demo/a") is None and not store.delete("demo/a")


def test_every_write_changes_the_token(store: SnapshotStore) -> None:
    tokens = [store.write("demo/a", b"x" * n) for n in (1, 1, 2)]
    assert None not in tokens and len(set(tokens)) == 3


def test_compare_and_set(store: SnapshotStore) -> None:
    assert store.write("demo/a", b"new", expect="nope") is None  # expected a record: none there
    first = store.write("demo/a", b"first", expect=None)  # None: must not exist yet
    assert first is not None
    assert store.write("demo/a", b"again", expect=None) is None
    second = store.write("demo/a", b"second", expect=first)
    assert second is not None
    assert store.write("demo/a", b"stale", expect=first) is None  # a stale writer loses
    assert store.read("demo/a").data == b"second"  # type: ignore[union-attr]
    assert not store.delete("demo/a", expect=first)
    assert store.delete("demo/a", expect=second)
    assert store.write("demo/a", b"any", expect=ANY) is not None


def test_binary_data_round_trips(store: SnapshotStore) -> None:
    data = bytes(range(256)) * 1000
    store.write("m/k", data)
    assert store.read("m/k").data == data  # type: ignore[union-attr]


@pytest.mark.parametrize("key", ["nomodel", "a/b/c", "/x", "m/", "m/.lock", "../x/y"])
def test_bad_keys_are_refused(store: SnapshotStore, key: str) -> None:
    with pytest.raises(ValueError, match="bad store key"):
        store.write(key, b"x")


def test_directory_store_uses_the_state_dir_layout(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    store.write("demo/abc.ttas", b"data")
    assert (tmp_path / "demo" / "abc.ttas").read_bytes() == b"data"
    assert not list((tmp_path / "demo").glob(".*.tmp"))


def test_open_store_needs_a_location() -> None:
    with pytest.raises(ValueError, match="directory path or a redis"):
        open_store("file://")
