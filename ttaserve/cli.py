"""The ``ttaserve`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from ttaserve.cli_args import fill_defaults, logging_flags
from ttaserve.cli_options import add_server_options, settings_from_args

# A missing optional module -> the extra that installs it (pip install 'ttaserve[EXTRA]').
_EXTRAS = {"matplotlib": "bench", "tritonclient": "client", "onnx": "onnx", "onnxruntime": "onnx",
           "triton": "gpu", "ray": "ray", "redis": "redis"}


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the gRPC inference server", parents=[logging_flags()],
                       description="Serve the demo model (and a model repository) over the "
                       "Triton-compatible gRPC API with per-sequence test-time adaptation.")
    add_server_options(p)
    p.set_defaults(run=_serve)


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
    from ttaserve.cli_export import add_commands as add_export_commands
    from ttaserve.deploy.cli import add_command as add_ray_serve
    from ttaserve.prepare import add_command as add_prepare

    add_commands(sub)
    add_prepare(sub)
    add_ray_serve(sub)
    add_export_commands(sub)
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
