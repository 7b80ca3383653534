"""The options of ``ttaserve serve`` and the settings they make (``ttaserve ray-serve``
passes the same options to its replicas)."""

from __future__ import annotations

import argparse
from typing import Any

from ttaserve.cli_args import param_arg

SETTINGS_FIELDS = (
    "host", "grpc_port", "metrics_port", "policy", "model_repository", "demo", "max_message_bytes",
    "max_batch_size", "session_idle_s", "max_sessions", "strict_sequences", "grace_s", "torch_threads",
    "batch_delay_us", "auth_token_file", "tls_cert", "tls_key", "tls_client_ca", "max_concurrent_rpcs",
    "max_queue", "request_timeout_s", "outlier_divergence", "state_dir", "state_interval_s",
    "state_max_bytes", "state_max_file_bytes", "state_ttl_s", "max_session_memory", "secret_file", "safety_net",
    "keep_freed_memory",
)

_UNITS = {"": 1, "K": 1000, "KB": 1000, "KIB": 1 << 10, "M": 10**6, "MB": 10**6, "MIB": 1 << 20,
          "G": 10**9, "GB": 10**9, "GIB": 1 << 30}


def byte_count(text: str) -> int:
    """A byte count: 1073741824, 1GiB, 512MiB, 500MB ..."""
    number = text.rstrip("KMGBibkmg")
    unit = text[len(number):].upper()
    try:
        value = int(float(number) * _UNITS[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a byte count such as 1GiB or 512MiB, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a byte count cannot be negative")
    return value


def settings_from_args(args: argparse.Namespace) -> Any:
    """ServerSettings from ``serve``'s options (defaults, then TTASERVE_* variables, then flags)."""
    from ttaserve.server.settings import ServerSettings

    return ServerSettings.from_env(
        **{f: getattr(args, f, None) for f in SETTINGS_FIELDS}, policy_params=dict(args.params) or None,
        safety_params=dict(getattr(args, "safety", [])) or None,
    )


def add_server_options(p: argparse.ArgumentParser) -> None:
    """The options of ``ttaserve serve`` (``ttaserve ray-serve`` passes them to its replicas)."""
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus /metrics port (default 8002; 0 = any free port; -1 = off)")
    p.add_argument("--policy", default=None, help="default adaptation policy (default graded-bn, "
                   "with the safety net; 'source' turns adaptation off); see 'ttaserve policy list --local'")
    p.add_argument("--param", dest="params", action="append", type=param_arg, default=[],
                   metavar="KEY=VALUE", help="parameter of the default policy, e.g. alpha=0.1")
    p.add_argument("--model-repository", default=None, metavar="DIR",
                   help="directory of <model>/config.json entries to serve besides the demo")
    p.add_argument("--no-demo", dest="demo", action="store_false", default=None,
                   help="do not serve the embedded demo model")
    p.add_argument("--max-message-bytes", type=int, default=None,
                   help="largest gRPC message accepted (default 64 MiB)")
    p.add_argument("--max-batch-size", type=int, default=None, help="largest batch (default 256)")
    p.add_argument("--session-idle", dest="session_idle_s", type=float, default=None,
                   metavar="SECONDS", help="drop sessions idle this long (default 600)")
    p.add_argument("--max-sessions", type=int, default=None,
                   help="live sessions per model before the least recently used is evicted (default 10000)")
    p.add_argument("--strict-sequences", action="store_true", default=None,
                   help="like Triton: an unknown sequence id needs sequence_start")
    p.add_argument("--batch-delay-us", type=int, default=None, metavar="US",
                   help="dynamic batching: wait up to US microseconds to put requests of "
                   "several sessions into one forward pass (default 0 = off)")
    p.add_argument("--grace", dest="grace_s", type=float, default=None, metavar="SECONDS",
                   help="seconds to let in-flight requests finish on SIGTERM (default 10)")
    p.add_argument("--torch-threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads of the forward passes (default 0 = torch's own choice)")
    p.add_argument("--no-keep-freed-memory", dest="keep_freed_memory", action="store_false", default=None,
                   help="leave glibc malloc's thresholds as they are (default: raise them so freed "
                   "batch buffers are reused instead of returned to the OS)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=None,
                   help="in-flight RPCs (a stream counts once) before RESOURCE_EXHAUSTED (default 1000; 0 = no cap)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests waiting per model before RESOURCE_EXHAUSTED (default 256; 0 = no cap)")
    p.add_argument("--request-timeout", dest="request_timeout_s", type=float, default=None,
                   metavar="SECONDS", help="a request not started within this is answered "
                   "DEADLINE_EXCEEDED without running (default 30; 0 = only client deadlines)")
    p.add_argument("--outlier-divergence", type=float, default=None,
                   help="batches whose first-BN-layer divergence from source exceeds this do not "
                   "update their session (default 15; 0 = off)")
    p.add_argument("--no-safety-net", dest="safety_net", action="store_false", default=None,
                   help="never fall back to the source model when adapting seems to hurt")
    p.add_argument("--safety", action="append", type=param_arg, default=[], metavar="KEY=VALUE",
                   help="safety-net threshold, e.g. confident_entropy=0.2 (docs/OPERATIONS.md)")
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="persist sessions here and restore them at start")
    p.add_argument("--state-interval", dest="state_interval_s", type=float, default=None,
                   metavar="SECONDS", help="write changed sessions this often (default 30)")
    p.add_argument("--state-max-bytes", type=byte_count, default=None, metavar="BYTES",
                   help="all state files together (default 1GiB; 0 = unbounded)")
    p.add_argument("--state-max-file-bytes", type=byte_count, default=None, metavar="BYTES",
                   help="largest state file read or written (default 64MiB)")
    p.add_argument("--state-ttl", dest="state_ttl_s", type=float, default=None, metavar="SECONDS",
                   help="delete files of sessions that are not live past this age (default 86400; 0 = never)")
    p.add_argument("--max-session-memory", type=byte_count, default=None, metavar="BYTES",
                   help="session state per model before the least recently used sessions are "
                   "evicted (default 1GiB; 0 = no budget)")
    p.add_argument("--secret-file", default=None, metavar="FILE",
                   help="secret that signs snapshots and state files (default: DIR/.secret under "
                   "--state-dir, else per process); replicas exchanging snapshots need the same")
    p.add_argument("--auth-token-file", default=None, metavar="FILE",
                   help="lines '<inference|admin> <token> [name=<principal>]'; also "
                   "TTASERVE_INFERENCE_TOKENS / TTASERVE_ADMIN_TOKENS (comma-separated). With any "
                   "token, auth is on and sessions belong to the token's principal")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="serve TLS with this certificate")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, metavar="PEM",
                   help="require client certificates signed by this CA (mutual TLS)")
