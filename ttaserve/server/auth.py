"""Bearer tokens, the principals they stand for, and what each may call.

Each configured token belongs to a **principal** (a name). Sessions belong to the principal
that created them (server/keys.py), so a principal can only ever reach its own. Two scopes:

- ``inference`` tokens may infer, read the model metadata, and read their own sessions
  through the control plane (ListPolicies, GetPolicy, ListSessions, DescribeSession);
- ``admin`` tokens may call everything, on every principal's sessions.

Without any token there is one principal, ``anonymous``, which may call everything (bind
to loopback). Health ``Check`` and ``ServerLive`` stay open for probes.

Token file lines: ``<inference|admin> <token> [name=<principal>]``. Without a name the
principal is ``token-`` plus the first 12 hex digits of the token's sha256 (stable across
restarts, so restored sessions keep their owner); name two tokens alike to rotate a token
without orphaning its sessions. Tokens are looked up by an HMAC under a per-process random
key, so the lookup time does not depend on how much of a guess matches a real token.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from ttaserve.errors import InvalidInput, PermissionDenied, Unauthenticated
from ttaserve.server.errors import status_of

ANONYMOUS = "anonymous"
PRINCIPAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Probes: open to anyone. Health's Watch is a stream that stays open, so it needs a token
# like any other call (an open one would let anyone pin server resources indefinitely).
OPEN_METHODS = frozenset({"/inference.GRPCInferenceService/ServerLive", "/grpc.health.v1.Health/Check"})
ADMIN_PREFIXES = ("/ttaserve.v1.",)
# Control-plane reads an inference token may make; they only ever show its own sessions.
READ_METHODS = frozenset(f"/ttaserve.v1.AdaptationService/{m}"
                         for m in ("ListPolicies", "GetPolicy", "ListSessions", "DescribeSession"))
_LOOKUP_KEY = os.urandom(32)


@dataclass(frozen=True)
class Principal:
    """Who a call comes from; ``admin`` principals may act on every principal's sessions."""

    name: str
    admin: bool


ANONYMOUS_PRINCIPAL = Principal(ANONYMOUS, admin=True)


def default_name(token: bytes) -> str:
    return "token-" + hashlib.sha256(token).hexdigest()[:12]


@dataclass(frozen=True)
class Tokens:
    inference: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()
    names: tuple[tuple[bytes, str], ...] = ()  # token -> principal name where one is configured
    _table: dict[bytes, Principal] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        named = dict(self.names)
        scopes: dict[str, bool] = {}
        for tokens, admin in ((self.inference, False), (self.admin, True)):
            for token in tokens:
                name = named.get(token) or default_name(token)
                if scopes.setdefault(name, admin) != admin:
                    raise ValueError(f"principal {name!r} is named by both an inference and an admin "
                                     "token; give them different names")
                self._table[_digest(token)] = Principal(name, admin)

    @property
    def enabled(self) -> bool:
        return bool(self.inference or self.admin)

    @classmethod
    def load(cls, path: str | None = None, environ: dict[str, str] | None = None) -> Tokens:
        """From a file of ``<scope> <token> [name=<principal>]`` lines (``#`` comments)
        and/or the comma-separated ``TTASERVE_INFERENCE_TOKENS`` / ``TTASERVE_ADMIN_TOKENS``."""
        env = os.environ if environ is None else environ
        scopes: dict[str, list[bytes]] = {
            "inference": [t.encode() for t in _split(env.get("TTASERVE_INFERENCE_TOKENS", ""))],
            "admin": [t.encode() for t in _split(env.get("TTASERVE_ADMIN_TOKENS", ""))],
        }
        names: list[tuple[bytes, str]] = []
        if path:
            for number, line in enumerate(Path(path).read_text().splitlines(), 1):
                entry = _token_line(line, f"{path}:{number}")
                if entry is not None:
                    scopes[entry[0]].append(entry[1])
                    if entry[2] is not None:
                        names.append((entry[1], entry[2]))
        return cls(tuple(scopes["inference"]), tuple(scopes["admin"]), tuple(names))

    def principal_of(self, token: bytes) -> Principal | None:
        return self._table.get(_digest(token))

    def caller(self, header: str | None) -> Principal:
        """The principal of an ``authorization`` header value; raises Unauthenticated."""
        if not self.enabled:
            return ANONYMOUS_PRINCIPAL
        if header is None or not header.startswith("Bearer "):
            raise Unauthenticated("missing credentials: send metadata 'authorization: Bearer <token>'")
        principal = self.principal_of(header[len("Bearer "):].strip().encode())
        if principal is None:
            raise Unauthenticated("invalid token")
        return principal


def _digest(token: bytes) -> bytes:
    return hmac.new(_LOOKUP_KEY, token, hashlib.sha256).digest()


def _split(raw: str) -> list[str]:
    return [t.strip() for t in raw.split(",") if t.strip()]


def _token_line(line: str, where: str) -> tuple[str, bytes, str | None] | None:
    fields = line.split("#", 1)[0].split()
    if not fields:
        return None
    if len(fields) not in (2, 3) or fields[0] not in ("inference", "admin"):
        raise ValueError(f"{where}: expected '<inference|admin> <token> [name=<principal>]' "
                         "(tokens cannot contain spaces)")
    name = None
    if len(fields) == 3:
        name = fields[2].removeprefix("name=")
        if not fields[2].startswith("name=") or not PRINCIPAL_NAME.fullmatch(name):
            raise ValueError(f"{where}: the third field must be name=<principal>, the name made of "
                             "letters, digits, '.', '_' and '-' (at most 64)")
        if name == ANONYMOUS or name.startswith("token-"):
            raise ValueError(f"{where}: principal names 'anonymous' and 'token-*' are reserved")
    return fields[0], fields[1].encode(), name


def required_scope(method: str) -> str | None:
    if method in OPEN_METHODS:
        return None
    if method in READ_METHODS:
        return "inference"
    return "admin" if method.startswith(ADMIN_PREFIXES) else "inference"


def header_of(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The first ``authorization`` value; every check of a call reads this same one."""
    return next((str(v) for k, v in metadata or () if k == "authorization"), None)


def check(tokens: Tokens, method: str, metadata: Iterable[tuple[str, Any]] | None
          ) -> tuple[grpc.StatusCode, str] | None:
    """None if the call may proceed, else the (code, message) to refuse it with."""
    needed = required_scope(method)
    if needed is None or not tokens.enabled:
        return None
    try:
        principal = tokens.caller(header_of(metadata))
    except Unauthenticated as exc:
        return status_of(exc)
    if needed == "admin" and not principal.admin:
        return status_of(PermissionDenied(f"{method} needs an admin token"))
    return None


def acting_for(caller: Principal, owner: str) -> str:
    """The namespace a control call acts on: the caller's own unless an admin names another."""
    if not owner or owner == caller.name:
        return caller.name
    if not caller.admin:
        raise PermissionDenied("only admin tokens may name another owner; leave owner empty")
    if not PRINCIPAL_NAME.fullmatch(owner):
        raise InvalidInput("owner must be a principal name (letters, digits, '.', '_', '-'; at most 64)")
    return owner
