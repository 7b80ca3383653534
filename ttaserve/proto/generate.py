"""Regenerate the checked-in protobuf/gRPC stubs: ``python -m ttaserve.proto.generate``.

The generated modules import each other as ``ttaserve.proto.X_pb2``; a test compares a
fresh generation with the checked-in files.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = ("model_config.proto", "grpc_service.proto", "control.proto")


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    sources = [p for p in PROTOS if (PROTO_DIR / p).exists()]
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *sources]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    written = sorted(out_dir.glob("*_pb2*.py*"))
    for path in written:
        text = re.sub(r"^import (\w+_pb2)", r"from ttaserve.proto import \1", path.read_text(), flags=re.M)
        if path.name.endswith("_pb2.py"):  # register into the private pool (see _pool.py)
            text = text.replace("_descriptor_pool.Default()", "_pool.POOL").replace(
                "from google.protobuf.internal import builder as _builder",
                "from google.protobuf.internal import builder as _builder\nfrom ttaserve.proto import _pool",
            )
            # Messages name their real module, so that pickle (Ray Serve ships requests
            # between processes that way) can import them again.
            text = re.sub(r"BuildTopDescriptorsAndMessages\(DESCRIPTOR, '(\w+_pb2)'",
                          r"BuildTopDescriptorsAndMessages(DESCRIPTOR, 'ttaserve.proto.\1'", text)
        path.write_text(text)
    return written


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            (PROTO_DIR / path.name).write_text(path.read_text())
            print(f"wrote {PROTO_DIR / path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
