"""``ttaserve package-mar``: a TorchServe model archive whose handler is ttaserve's.

The archive holds (besides TorchServe's MAR-INF/MANIFEST.json):

* ``ttaserve_torchserve.py``: the handler file, which only imports
  :func:`ttaserve.handlers.torchserve.handle`;
* ``ttaserve.json``: which model (the demo, or ``model/``), its default policy and limits;
* ``model/``: a copy of the model repository entry (config.json and the files it names),
  unless the model is the demo, which ships inside the package;
* ``ttaserve/``: the ttaserve package itself (``--no-bundle`` leaves it out; then install
  ttaserve in the worker's environment). Its dependencies (torch, numpy, safetensors,
  and onnx + onnxruntime for an ONNX model) must be installed there either way;
* ``model-config.yaml`` (TorchServe's): sequence batching on, one worker.

TorchServe's sequence batching keeps one polling thread per active sequence (its pool has
``batchSize + 1`` threads), so a worker serves at most ``batchSize`` sequences at once; a
sequence's slot is freed after ``sequenceMaxIdleMSec`` without a request (5 s here). The
ttaserve session itself lives on for ``session_idle_s`` (600 s), so a sequence that pauses
longer keeps its adaptation when it comes back with the same id.

The archive is written by ``torch-model-archiver`` (``pip install torch-model-archiver``),
looked up beside this Python, then on PATH, unless ``archiver`` names it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import ttaserve

SHIM = '''"""TorchServe handler of a ttaserve archive (built by `ttaserve package-mar`)."""
from ttaserve.handlers.torchserve import handle  # noqa: F401
'''
MODEL_CONFIG = """# TorchServe settings written by `ttaserve package-mar`
minWorkers: 1
maxWorkers: 1
batchSize: {batch_size}
maxBatchDelay: {batch_delay_ms}
responseTimeout: 120
sequenceBatching: true
sequenceMaxIdleMSec: {slot_idle_ms}
maxNumSequence: {batch_size}
maxSequenceJobQueueSize: 16
"""


def archiver_command(archiver: str | None = None) -> list[str]:
    """How to run torch-model-archiver; raises FileNotFoundError saying how to get it."""
    candidates = [archiver] if archiver else [str(Path(sys.executable).with_name("torch-model-archiver")),
                                              shutil.which("torch-model-archiver")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return [candidate]
    raise FileNotFoundError("torch-model-archiver not found: pip install torch-model-archiver "
                            "(or pass --archiver PATH)")


def package_mar(model_dir: str | Path | None, out: Path, *, policy: str | None = None,
                params: dict[str, Any] | None = None, bundle: bool = True, archiver: str | None = None,
                batch_size: int = 8, batch_delay_ms: int = 5, slot_idle_ms: int = 5000,
                session_idle_s: float = 600.0) -> Path:
    """Build ``out`` (its name without ``.mar`` becomes TorchServe's model name)."""
    if out.suffix != ".mar":
        raise ValueError(f"--out must end in .mar, got {out}")
    command = archiver_command(archiver)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ttaserve-mar-") as tmp:
        staging = Path(tmp)
        payload = staging / "payload"
        payload.mkdir()
        if bundle:
            shutil.copytree(Path(ttaserve.__file__).parent, payload / "ttaserve",
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        if model_dir is not None:
            shutil.copytree(Path(model_dir), payload / "model")
        config = {"model": "model" if model_dir is not None else None, "policy": policy,
                  "params": params or {}, "session_idle_s": session_idle_s}
        (payload / "ttaserve.json").write_text(json.dumps(config, indent=2))
        handler = staging / "ttaserve_torchserve.py"
        handler.write_text(SHIM)
        yaml = staging / "model-config.yaml"
        yaml.write_text(MODEL_CONFIG.format(batch_size=batch_size, batch_delay_ms=batch_delay_ms,
                                            slot_idle_ms=slot_idle_ms))
        subprocess.run([*command, "--model-name", out.stem, "--version", ttaserve.__version__,
                        "--handler", str(handler), "--extra-files", str(payload), "--config-file", str(yaml),
                        "--export-path", str(out.parent), "--force"], check=True)
    return out
