"""One typed settings object for the server; CLI flags and TTASERVE_* env vars map onto it."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ttaserve.adapters import DEFAULT_POLICY


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    metrics_port: int = 8002  # 0 picks a free port, -1 disables the HTTP endpoint
    policy: str = DEFAULT_POLICY  # default policy of every model without its own (graded-bn)
    policy_params: dict[str, Any] = field(default_factory=dict)
    model_repository: str | None = None  # directory of <model>/config.json
    demo: bool = True  # serve the embedded demo model as "demo"
    max_message_bytes: int = 64 * 1024 * 1024
    max_batch_size: int = 256
    session_idle_s: float = 600.0
    max_sessions: int = 10_000
    strict_sequences: bool = False
    workers_per_model: int = 1
    batch_delay_us: int = 0  # >0: gather requests this long and batch across sessions
    grace_s: float = 10.0
    auth_token_file: str | None = None  # lines '<inference|admin> <token>'; env tokens too
    tls_cert: str | None = None  # PEM certificate chain: serve TLS instead of plaintext
    tls_key: str | None = None
    tls_client_ca: str | None = None  # PEM CA bundle: require client certificates (mTLS)
    torch_threads: int = 0  # 0: leave torch's default
    keep_freed_memory: bool = True  # raise glibc malloc's mmap/trim thresholds (server/memory.py)
    # Reliability caps and durability (docs/OPERATIONS.md "Reliability and limits").
    max_concurrent_rpcs: int = 1000  # in-flight RPCs (a stream counts once); 0: no cap
    max_queue: int = 256  # requests waiting for or running on one model's worker; 0: no cap
    request_timeout_s: float = 30.0  # a request not started within this is not run; 0: none
    outlier_divergence: float = 15.0  # poisoning gate threshold (ttaserve/outliers.py); 0: off
    safety_net: bool = True  # watch adaptive sessions, fall back to source when adapting hurts
    safety_params: dict[str, Any] = field(default_factory=dict)  # SafetyConfig thresholds
    state_dir: str | None = None  # persist sessions here (server/persistence.py)
    state_interval_s: float = 30.0  # periodic write of changed sessions
    # Hardening (docs/OPERATIONS.md "Security and threat model").
    max_session_memory: int = 1 << 30  # bytes of session state per model before LRU eviction; 0: none
    state_max_bytes: int = 1 << 30  # all state files together; 0: unbounded
    state_max_file_bytes: int = 64 << 20  # one state file, read or written
    state_ttl_s: float = 86400.0  # files of sessions that are not live are deleted past this age; 0: never
    secret_file: str | None = None  # signs snapshots and state files (server/secret.py)
    # The secret itself, hex (how `ttaserve ray-serve` hands its replicas one); never printed.
    secret: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, **overrides: Any) -> ServerSettings:
        """Defaults, then TTASERVE_<FIELD> environment variables, then explicit overrides."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = os.environ.get(f"TTASERVE_{f.name.upper()}")
            if raw is not None and f.name not in ("policy_params", "safety_params"):
                values[f.name] = _parse(f.type, raw, f.name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _parse(kind: Any, raw: str, name: str) -> Any:
    kind = str(kind)
    try:
        if kind.startswith("bool"):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError as exc:
        raise ValueError(f"TTASERVE_{name.upper()}={raw!r} is not a valid {kind}") from exc
    return raw
