"""The live page on the metrics port, and the JSON it polls.

- ``GET /``: one self-contained HTML page (inline CSS/JS, SVG charts; nothing is fetched
  from elsewhere, and its Content-Security-Policy forbids it).
- ``GET /api/summary``: per model/policy live sessions, mean drift/entropy/label shift,
  requests by code, resets by reason, plus the server-side history of the last minutes.
- ``GET /api/sessions?limit=N``: the N sessions that drift most (default 20) among those the
  caller may see: an inference token sees only its own principal's, an admin token (and
  everyone when no tokens are configured) every principal's, with the owner.
- ``POST /api/sessions/<model>/<sequence>/reset?owner=NAME&kind=text|number``: what
  ``ResetSession`` does over gRPC. ``owner`` defaults to the caller's own principal; a
  sequence made of ASCII digits is the number (as tritonclient sends it) unless
  ``kind=text``, else the text.

Who may read: with tokens configured, any valid token (``Authorization: Bearer <token>``,
the same tokens as gRPC), else 401; without tokens, anyone (``/metrics`` and the page itself
are always open: they show no sequence ids). Who may reset: with tokens, an admin token;
without tokens, anyone who can reach a loopback-bound server, and nobody when the server
binds another address. Cross-origin browser requests (an ``Origin`` that is not this host)
and, on a loopback-bound server without tokens, a ``Host`` that is not a loopback name (DNS
rebinding) are refused, so a web page in the operator's browser can neither read nor reset
sessions behind their back."""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ttaserve.errors import (
    InvalidInput,
    NotFound,
    PermissionDenied,
    TTAServeError,
    Unauthenticated,
    Unavailable,
    shown,
)
from ttaserve.server.auth import Principal, Tokens, acting_for
from ttaserve.server.dashboard_data import (
    History,
    history_point,
    session_rows,
    summarize,
    top_by_drift,
)
from ttaserve.server.keys import SessionKey, check_sequence_id
from ttaserve.server.metrics import ServerMetrics
from ttaserve.server.repository import Repository

log = logging.getLogger(__name__)
_HTTP_STATUS = {InvalidInput: "400 Bad Request", Unauthenticated: "401 Unauthorized",
                PermissionDenied: "403 Forbidden", NotFound: "404 Not Found",
                Unavailable: "503 Service Unavailable"}
_NUMBER = re.compile(r"-?[0-9]{1,20}")  # ASCII only: int() would also accept '٣' or '²'
_LIMIT = re.compile(r"[0-9]{1,4}")
_PAGE_HEADERS = [
    ("Content-Type", "text/html; charset=utf-8"),
    ("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; "
     "style-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
]
_RESET_PREFIX, _RESET_SUFFIX = "/api/sessions/", "/reset"

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class _MethodNotAllowed(Exception):
    def __init__(self, allowed: str) -> None:
        super().__init__(f"use {allowed}")
        self.allowed = allowed


class Dashboard:
    """WSGI app for every path of the metrics port but ``/metrics``; call :meth:`close`
    to stop its history sampler."""

    def __init__(self, repository: Repository, metrics: ServerMetrics, tokens: Tokens, host: str,
                 sample_every_s: float = 1.0, draining: Callable[[], bool] = lambda: False) -> None:
        self.repository = repository
        self.draining = draining
        self.metrics = metrics
        self.tokens = tokens
        self.host = host
        self._page = resources.files("ttaserve.server").joinpath("static/dashboard.html").read_bytes()
        self.history = History(lambda: history_point(summarize(repository, metrics)), sample_every_s)

    def close(self) -> None:
        self.history.close()

    @property
    def reset_mode(self) -> str:
        """How resets are authorised: 'admin-token', 'loopback' or 'off'."""
        return "admin-token" if self.tokens.enabled else "loopback" if is_loopback(self.host) else "off"

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO") or "/"
        try:
            if path in ("/", "/index.html"):
                _allow(method, "GET")
                start_response("200 OK", _PAGE_HEADERS + [("Cache-Control", "no-store")])
                return [self._page]
            return _json(start_response, "200 OK", self._api(method, path, environ))
        except _MethodNotAllowed as exc:
            return _json(start_response, "405 Method Not Allowed", {"error": str(exc)},
                         [("Allow", exc.allowed)])
        except TTAServeError as exc:
            status = next((s for kind, s in _HTTP_STATUS.items() if isinstance(exc, kind)), "400 Bad Request")
            return _json(start_response, status, {"error": str(exc)})
        except Exception:  # a bug: logged here, never a traceback to the client
            log.exception("dashboard request %s %s failed", method, shown(path))
            return _json(start_response, "500 Internal Server Error", {"error": "internal error (logged)"})

    def _api(self, method: str, path: str, environ: dict[str, Any]) -> dict[str, Any]:
        if path == "/api/summary":
            _allow(method, "GET")
            self._reader(environ)
            return {"reset": self.reset_mode, "models": summarize(self.repository, self.metrics),
                    "history": self.history.samples()}
        if path == "/api/sessions":
            _allow(method, "GET")
            caller = self._reader(environ)
            rows = session_rows(self.repository, None if caller.admin else caller.name)
            return {"total": len(rows), "sessions": top_by_drift(rows, _limit(environ))}
        if path.startswith(_RESET_PREFIX) and path.endswith(_RESET_SUFFIX):
            _allow(method, "POST")
            caller = refuse_reset(self.tokens, self.host, _headers(environ))
            if self.draining():
                raise Unavailable("the server is shutting down; changes are no longer applied")
            model, _, sequence = path[len(_RESET_PREFIX):-len(_RESET_SUFFIX)].partition("/")
            query = parse_qs(environ.get("QUERY_STRING", ""))
            key = SessionKey(acting_for(caller, query.get("owner", [""])[0]),
                             _sequence(_url_text(sequence), query.get("kind", [""])[0]))
            return {"session": self._reset(model, key)}
        raise NotFound(f"no page {shown(path)}; try / (dashboard), /metrics, /api/summary or /api/sessions")

    def _reader(self, environ: dict[str, Any]) -> Principal:
        """Who reads: any valid token when tokens are on; refuses cross-site reads."""
        headers = _headers(environ)
        refuse_foreign(self.tokens, self.host, headers)
        return self.tokens.caller(headers.get("authorization"))

    def _reset(self, model_name: str, key: SessionKey) -> dict[str, Any]:
        model = self.repository.get(model_name)
        session = model.reset_session(key)
        rows = (r for r in session_rows(self.repository, key.owner)
                if r["model"] == model.name and r["sequence_id"] == key.sequence_id)
        return next(rows, {"model": model.name, "owner": key.owner, "sequence_id": key.sequence_id,
                           "policy": session.policy})  # ended since


def refuse_reset(tokens: Tokens, bind_host: str, headers: Mapping[str, str]) -> Principal:
    """The caller, or raise unless a request with these (lower-case) headers may reset."""
    refuse_foreign(tokens, bind_host, headers)
    if tokens.enabled:
        caller = tokens.caller(headers.get("authorization"))
        if not caller.admin:
            raise PermissionDenied("resetting a session needs an admin token")
        return caller
    if not is_loopback(bind_host):
        raise PermissionDenied(f"the server listens on {bind_host} without tokens: configure an admin "
                               "token (--auth-token-file or TTASERVE_ADMIN_TOKENS) to reset over HTTP")
    return tokens.caller(None)


def refuse_foreign(tokens: Tokens, bind_host: str, headers: Mapping[str, str]) -> None:
    """Refuse a cross-origin request, and on a loopback-bound server without tokens a Host
    that is not a loopback name (another site's page rebinding its name to 127.0.0.1)."""
    host = headers.get("host", "")
    origin = headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != host:
        raise PermissionDenied(f"cross-origin request from {shown(origin)} refused")
    if not tokens.enabled and is_loopback(bind_host) and not is_loopback(_hostname(host)):
        raise PermissionDenied(f"Host {shown(host)} is not a loopback name; use http://127.0.0.1:<port>/")


def _hostname(host: str) -> str:
    try:
        return urlsplit(f"//{host}").hostname or ""
    except ValueError:  # e.g. an unbalanced '[' in the Host header
        return ""


def _sequence(text: str, kind: str) -> int | str:
    """The sequence id of a reset path: ASCII digits are a number unless kind=text."""
    if kind not in ("", "text", "number"):
        raise InvalidInput("kind must be 'text' or 'number'")
    number = _NUMBER.fullmatch(text) is not None
    if kind == "number" and not number:
        raise InvalidInput("kind=number needs a sequence made of ASCII digits")
    value = check_sequence_id(int(text) if number and kind != "text" else text)
    if value is None:
        raise InvalidInput("the path is /api/sessions/<model>/<sequence>/reset with a non-empty, non-zero sequence")
    return value


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _allow(method: str, allowed: str) -> None:
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise _MethodNotAllowed(allowed)


def _headers(environ: dict[str, Any]) -> dict[str, str]:
    headers = {k[5:].replace("_", "-").lower(): str(v) for k, v in environ.items() if k.startswith("HTTP_")}
    if "host" not in headers and "SERVER_NAME" in environ:
        headers["host"] = f"{environ['SERVER_NAME']}:{environ.get('SERVER_PORT', '')}"
    return headers


def _url_text(raw: str) -> str:
    """wsgiref hands PATH_INFO over percent-decoded as latin-1; ids are UTF-8."""
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError as exc:
        raise InvalidInput("the sequence id in the path is not UTF-8") from exc


def _limit(environ: dict[str, Any]) -> int:
    raw = parse_qs(environ.get("QUERY_STRING", "")).get("limit", ["20"])[0]
    if not _LIMIT.fullmatch(raw) or not 1 <= int(raw) <= 1000:
        raise InvalidInput("limit must be a whole number from 1 to 1000")
    return int(raw)


def _json(start_response: StartResponse, status: str, body: dict[str, Any],
          extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    data = json.dumps(body, allow_nan=False).encode()
    start_response(status, [("Content-Type", "application/json"), ("Cache-Control", "no-store"),
                            ("X-Content-Type-Options", "nosniff"), *(extra or [])])
    return [data]
