"""The ``ttaserve`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from ttaserve.cli_args import fill_defaults, logging_flags, param_arg

# A missing optional module -> the extra that installs it (pip install 'ttaserve[EXTRA]').
_EXTRAS = {"matplotlib": "bench", "tritonclient": "client", "onnx": "onnx", "onnxruntime": "onnx",
           "triton": "gpu"}


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the gRPC inference server", parents=[logging_flags()],
                       description="Serve the demo model (and a model repository) over the "
                       "Triton-compatible gRPC API with per-sequence test-time adaptation.")
    add_server_options(p)
    p.set_defaults(run=_serve)


SETTINGS_FIELDS = (
    "host", "grpc_port", "metrics_port", "policy", "model_repository", "demo", "max_message_bytes",
    "max_batch_size", "session_idle_s", "max_sessions", "strict_sequences", "grace_s", "torch_threads",
    "batch_delay_us", "auth_token_file", "tls_cert", "tls_key", "tls_client_ca", "max_concurrent_rpcs",
    "max_queue", "request_timeout_s", "outlier_divergence", "state_dir", "state_interval_s",
)


def settings_from_args(args: argparse.Namespace) -> Any:
    """ServerSettings from ``serve``'s options (defaults, then TTASERVE_* variables, then flags)."""
    from ttaserve.server.settings import ServerSettings

    return ServerSettings.from_env(
        **{f: getattr(args, f, None) for f in SETTINGS_FIELDS}, policy_params=dict(args.params) or None
    )


def add_server_options(p: argparse.ArgumentParser) -> None:
    """The options of ``ttaserve serve`` (``ttaserve ray-serve`` passes them to its replicas)."""
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus /metrics port (default 8002; 0 = any free port; -1 = off)")
    p.add_argument("--policy", default=None, help="default adaptation policy (default source); "
                   "see 'ttaserve policy list --local'")
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
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="persist sessions here and restore them at start")
    p.add_argument("--state-interval", dest="state_interval_s", type=float, default=None,
                   metavar="SECONDS", help="write changed sessions this often (default 30)")
    p.add_argument("--auth-token-file", default=None, metavar="FILE",
                   help="lines '<inference|admin> <token>'; also TTASERVE_INFERENCE_TOKENS / "
                   "TTASERVE_ADMIN_TOKENS (comma-separated). With any token, auth is on")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="serve TLS with this certificate")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, metavar="PEM",
                   help="require client certificates signed by this CA (mutual TLS)")


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    import torch

    from ttaserve.server.app import serve

    settings = settings_from_args(args)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    asyncio.run(serve(settings))
    return 0


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train-demo", help="retrain the embedded demo weights (deterministic)",
                       parents=[logging_flags()])
    p.add_argument("--kind", choices=("expert", "generalist"), default="expert",
                   help="expert: the demo model, from scratch on clean data (train it first); "
                   "generalist: the expert fine-tuned with augmentations (for T3)")
    p.add_argument("--epochs", type=int, default=None, help="default 4 (expert), 2 (generalist)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (0.1 / 0.03)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="Fashion-MNIST idx directory")
    p.add_argument("--out", default=None, help="weights file (default: the packaged one)")
    p.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ttaserve.models import weights_path
    from ttaserve.models.train import save, train

    torch.set_num_threads(2)  # the shipped weights were made with 2 threads
    expert = args.kind == "expert"
    model, err = train(
        args.kind,
        epochs=args.epochs or (4 if expert else 2),
        lr=args.lr or (0.1 if expert else 0.03),
        seed=args.seed,
        data=args.data,
        init=None if expert else weights_path("expert"),
    )
    out = Path(args.out or weights_path(args.kind))
    save(model, out)
    print(f"{args.kind}: clean test error {err:.2f} %, weights written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttaserve", description=__doc__, parents=[logging_flags()],
                                     epilog="Shared flags (--log-level; --url, --token, --json where "
                                     "they apply) go before or after the subcommand.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_serve, _add_train):
        add(sub)
    from ttaserve.bench.cli import add_bench_commands
    from ttaserve.cli_control import add_commands
    from ttaserve.deploy.cli import add_command as add_ray_serve
    from ttaserve.prepare import add_command as add_prepare

    add_commands(sub)
    add_prepare(sub)
    add_ray_serve(sub)
    add_bench_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = fill_defaults(build_parser().parse_args(argv))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:  # an optional extra that is not installed
        package = (exc.name or "").partition(".")[0]
        if package not in _EXTRAS:
            raise
        logging.getLogger("ttaserve").error("this command needs %r, which is not installed: "
                                            "pip install 'ttaserve[%s]'", package, _EXTRAS[package])
        return 2
    except (ValueError, OSError) as exc:
        logging.getLogger("ttaserve").error("%s", exc)
        return 2
    except grpc.RpcError as exc:  # a control command refused by the server
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
