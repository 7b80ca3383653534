"""``ttaserve export-onnx`` and ``ttaserve package-mar``: a model for another runtime."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ttaserve.cli_args import logging_flags, param_arg

log = logging.getLogger(__name__)


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "export-onnx", help="write a model as an adaptable ONNX file (BatchNorm kept)", parents=[logging_flags()],
        description="Export the demo model, or a model repository entry (--model-dir), to ONNX "
        "with its BatchNormalization nodes kept, check it against torch (1e-4), and write a "
        "config.json beside it so the directory can be served as a model repository entry.")
    p.add_argument("--model-dir", default=None, help="model repository entry (default: the demo model)")
    p.add_argument("--out", required=True, help="the .onnx file to write (its directory is created)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--no-config", dest="config", action="store_false",
                   help="write only the .onnx file, no config.json or artifacts")
    p.set_defaults(run=_export_onnx)
    m = sub.add_parser(
        "package-mar", help="build a TorchServe model archive that adapts per sequence", parents=[logging_flags()],
        description="Build a .mar with torch-model-archiver whose handler runs ttaserve's engine "
        "inside the TorchServe worker, one adaptation session per TorchServe sequence id.")
    m.add_argument("--model-dir", default=None, help="model repository entry (default: the demo model)")
    m.add_argument("--out", required=True, help="the .mar file to write")
    m.add_argument("--policy", default=None, help="default policy of the archive (default: the model's, else source)")
    m.add_argument("--param", dest="params", action="append", type=param_arg, default=[], metavar="KEY=VALUE",
                   help="parameter of --policy, e.g. alpha=0.1")
    m.add_argument("--batch-size", type=int, default=8,
                   help="TorchServe batchSize: requests of several sequences per forward, and the most "
                   "sequences one worker serves at once (default 8)")
    m.add_argument("--no-bundle", dest="bundle", action="store_false",
                   help="do not put the ttaserve package into the archive (install it in the worker's environment)")
    m.add_argument("--archiver", default=None, metavar="PATH", help="torch-model-archiver to run")
    m.set_defaults(run=_package_mar)


def _export_onnx(args: argparse.Namespace) -> int:
    from ttaserve.handlers.onnx_export import DEFAULT_OPSET, export_onnx, write_entry

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec, module, extra, artifacts = _source_model(args.model_dir)
    model = export_onnx(module, spec, out, args.opset or DEFAULT_OPSET)
    print(f"{out}: {len(model.bn_layers)} adaptable BatchNorm layers, features {model.info.features!r}, "
          "logits within 1e-4 of torch")
    if args.config:
        config = write_entry(out.parent, out.name, spec, model.info.features, extra, artifacts)
        print(f"{config}: serve with `ttaserve serve --model-repository {out.parent.parent}` "
              f"(model {out.parent.name!r})")
    return 0


def _source_model(model_dir: str | None) -> tuple[Any, Any, dict[str, Any], dict[str, Path]]:
    """(spec, plain torch module, config fields to keep, artifacts ONNX models can use)."""
    if model_dir is None:
        from ttaserve.handlers.loader import demo_model
        from ttaserve.models import demo, weights_path

        return demo_model().spec, demo(), {}, {"adanpc.memory": Path(weights_path("adanpc_memory"))}
    from ttaserve.handlers.loader import load_torch_module

    directory = Path(model_dir)
    spec, module = load_torch_module(directory)
    raw = json.loads((directory / "config.json").read_text())
    extra = {k: raw[k] for k in ("policy", "params") if k in raw}
    memory = raw.get("artifacts", {}).get("adanpc.memory")
    return spec, module, extra, ({"adanpc.memory": directory / memory} if memory else {})


def _package_mar(args: argparse.Namespace) -> int:
    from ttaserve.handlers.mar import package_mar

    path = package_mar(args.model_dir, Path(args.out), policy=args.policy, params=dict(args.params),
                       bundle=args.bundle, archiver=args.archiver, batch_size=args.batch_size)
    print(f"{path}: TorchServe archive (sequence batching on); serve with `torchserve --start "
          f"--model-store {path.parent} --models {path.stem}={path.name}` (see docs/TORCHSERVE.md)")
    return 0
