"""``ttaserve prepare``: build the policy artifacts a model needs from its source data.

- ``adanpc``: the source kNN memory (features of the source set and their labels).
- ``ecotta``: meta networks warmed up on the source set beside the frozen model.

For the demo model (default) the source data is the Fashion-MNIST training split and the
files go where the package loads them from. For your model, pass ``--model-dir`` (a model
repository entry with config.json) and ``--source-npz`` (arrays ``x`` float32 [N, ...] in
the model's input range and ``y`` int64 [N]); then name the written file under
``artifacts`` in config.json.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def add_command(sub: Any) -> None:
    p = sub.add_parser("prepare", help="build policy artifacts (AdaNPC memory, EcoTTA meta networks)",
                       description=__doc__)
    p.add_argument("artifact", choices=("adanpc", "ecotta"))
    p.add_argument("--model-dir", default=None, help="model repository entry (default: the demo model)")
    p.add_argument("--source-npz", default=None, help="source data: .npz with x and y (default: Fashion-MNIST train)")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder for the demo model")
    p.add_argument("--out", default=None, help="output .safetensors (default for the demo: the packaged file)")
    p.add_argument("--per-class", type=int, default=1000, help="adanpc: source samples per class (0 = all)")
    p.add_argument("--steps", type=int, default=600, help="ecotta: warm-up steps")
    p.add_argument("--partitions", type=int, default=4, help="ecotta: number of partitions")
    p.set_defaults(run=run)


def _source(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    if args.source_npz:
        with np.load(args.source_npz) as data:
            return torch.from_numpy(data["x"].astype(np.float32)), torch.from_numpy(data["y"].astype(np.int64))
    from ttaserve.data import load_split

    return load_split("train", args.data)


def _module(args: argparse.Namespace) -> torch.nn.Module:
    if args.model_dir is None:
        from ttaserve.models import demo

        return demo()
    from ttaserve.handlers.loader import load_model_dir

    return load_model_dir(Path(args.model_dir)).model.module


def run(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from ttaserve.models import weights_path

    if args.model_dir is not None and (args.out is None or args.source_npz is None):
        raise ValueError("with --model-dir, pass --source-npz and --out")
    x, y = _source(args)
    module = _module(args)
    if args.artifact == "adanpc":
        from ttaserve.adapters.adanpc import build_source_memory
        from ttaserve.adapters.model import prepare
        from ttaserve.models.build_artifacts import balanced_indices

        if args.per_class:
            keep = balanced_indices(y, args.per_class)
            x, y = x[keep], y[keep]
        memory = build_source_memory(prepare(module), x, y)
        out = args.out or weights_path("adanpc_memory")
        save_file({"features": memory["features"].half(), "labels": memory["labels"]}, out)
        print(f"adanpc: {len(y)} source entries written to {out}")
    else:
        from ttaserve.adapters.ecotta import build_meta_artifact

        out = args.out or weights_path("ecotta_meta")
        build_meta_artifact(module, (x, y), out, partitions=args.partitions, steps=args.steps)
        print(f"ecotta: meta networks ({args.partitions} partitions, {args.steps} steps) written to {out}")
    return 0
