"""Where replicas keep session snapshots: one small interface, two stores.

A record is opaque bytes (ttaserve writes the state-file format of
ttaserve/server/persistence.py: a checksummed envelope around ``Engine.snapshot`` bytes)
plus a *token* that changes on every write. Writes and deletes are compare-and-set on the
token, so a replica can tell that another replica has written a sequence since it last
looked (its own copy is stale) and never overwrites the newer record.

- :class:`DirectoryStore` (``file:///path`` or a plain path): one file per record in the
  ``--state-dir`` layout, written atomically; compare-and-set under ``flock`` on a lock file
  per directory, so all replicas must see one POSIX file system (one host, or a network file
  system with working ``flock``).
- :class:`RedisStore` (``redis://host:port/db``): one hash per record, compare-and-set in a
  server-side script (atomic in Redis).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from ttaserve.server.state_files import atomic_write


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY: Final = _Any()  # ``expect=ANY``: write or delete whatever is there
Expect = str | None | _Any  # a token, None (there must be no record) or ANY


@dataclass(frozen=True)
class Record:
    data: bytes
    token: str


class SnapshotStore(Protocol):
    """Keys are ``"<model>/<name>"``; names never contain ``/``."""

    def read(self, key: str) -> Record | None: ...

    def token(self, key: str) -> str | None:
        """The current token (cheap: no data is read), or None when there is no record."""
        ...

    def write(self, key: str, data: bytes, expect: Expect = ANY) -> str | None:
        """Store ``data`` if the current token is ``expect``; the new token, or None if not."""
        ...

    def delete(self, key: str, expect: Expect = ANY) -> bool:
        """Remove the record if the current token is ``expect``; whether it was removed."""
        ...

    def keys(self, prefix: str = "") -> list[str]: ...

    def close(self) -> None: ...


def open_store(url: str) -> SnapshotStore:
    """``redis://…``/``rediss://…`` or ``file://…``/a path."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url)
    path = url[len("file://"):] if url.startswith("file://") else url
    if not path:
        raise ValueError(f"state store {url!r}: give a directory path or a redis:// URL")
    return DirectoryStore(path)


def _check_key(key: str) -> tuple[str, str]:
    model, sep, name = key.partition("/")
    if not sep or not model or not name or "/" in name or name.startswith(".") or ".." in model:
        raise ValueError(f"bad store key {key!r}: expected '<model>/<name>'")
    return model, name


class DirectoryStore:
    """Records as files ``<root>/<model>/<name>``; the token is the file's identity
    (inode, modification time, size), which every atomic rename changes."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        model, name = _check_key(key)
        return self.root / model / name

    @staticmethod
    def _token_of(path: Path) -> str | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"

    @contextlib.contextmanager
    def _locked(self, directory: Path) -> Iterator[None]:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read(self, key: str) -> Record | None:
        path = self._path(key)
        with self._locked(path.parent):  # data and token from the same write
            token = self._token_of(path)
            if token is None:
                return None
            return Record(path.read_bytes(), token)

    def token(self, key: str) -> str | None:
        return self._token_of(self._path(key))

    def write(self, key: str, data: bytes, expect: Expect = ANY) -> str | None:
        path = self._path(key)
        with self._locked(path.parent):
            if expect is not ANY and self._token_of(path) != expect:
                return None
            atomic_write(path, data)
            return self._token_of(path)

    def delete(self, key: str, expect: Expect = ANY) -> bool:
        path = self._path(key)
        with self._locked(path.parent):
            current = self._token_of(path)
            if current is None or (expect is not ANY and current != expect):
                return False
            path.unlink()
            return True

    def keys(self, prefix: str = "") -> list[str]:
        found = [f"{p.parent.name}/{p.name}" for p in self.root.glob("*/*")
                 if p.is_file() and not p.name.startswith(".")]
        return sorted(k for k in found if k.startswith(prefix))

    def close(self) -> None:
        pass


# KEYS[1] the record; ARGV: expected token ("" = must not exist, "*" = any), new token, data.
_WRITE = """
local cur = redis.call('HGET', KEYS[1], 't')
if ARGV[1] ~= '*' and ((ARGV[1] == '' and cur) or (ARGV[1] ~= '' and cur ~= ARGV[1])) then
  return 0
end
redis.call('HSET', KEYS[1], 't', ARGV[2], 'd', ARGV[3])
return 1
"""
_DELETE = """
local cur = redis.call('HGET', KEYS[1], 't')
if not cur or (ARGV[1] ~= '*' and cur ~= ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


class RedisStore:
    """Records as Redis hashes ``<prefix><model>/<name>`` with fields ``t`` (token) and
    ``d`` (data)."""

    def __init__(self, url: str, prefix: str = "ttaserve:", client: Any = None) -> None:
        try:
            import redis
        except ImportError as exc:  # the client library comes with the ray/redis extras
            raise ValueError("the Redis state store needs the redis package: "
                             "pip install 'ttaserve[redis]'") from exc
        self.prefix = prefix
        self.client: Any = client if client is not None else redis.Redis.from_url(url, socket_timeout=10)
        self._write = self.client.register_script(_WRITE)
        self._delete = self.client.register_script(_DELETE)

    def _key(self, key: str) -> str:
        _check_key(key)
        return self.prefix + key

    def read(self, key: str) -> Record | None:
        token, data = self.client.hmget(self._key(key), ["t", "d"])
        return None if token is None or data is None else Record(bytes(data), token.decode())

    def token(self, key: str) -> str | None:
        token = self.client.hget(self._key(key), "t")
        return None if token is None else token.decode()

    def write(self, key: str, data: bytes, expect: Expect = ANY) -> str | None:
        token = uuid.uuid4().hex
        done = self._write(keys=[self._key(key)], args=[_expected(expect), token, data])
        return token if int(done) else None

    def delete(self, key: str, expect: Expect = ANY) -> bool:
        return bool(int(self._delete(keys=[self._key(key)], args=[_expected(expect)])))

    def keys(self, prefix: str = "") -> list[str]:
        pattern = self.prefix + prefix.replace("*", r"\*") + "*"
        return sorted(k.decode()[len(self.prefix):] for k in self.client.scan_iter(match=pattern, count=500))

    def close(self) -> None:
        self.client.close()


def _expected(expect: Expect) -> str:
    if expect is ANY:
        return "*"
    if expect is None:
        return ""
    assert isinstance(expect, str)
    return expect
