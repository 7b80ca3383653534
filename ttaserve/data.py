"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (idx files, gzip).

The data directory is ``--data``, else ``$TTASERVE_DATA``, else the Debian path. Nothing is
downloaded at run time.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

DEBIAN_PATH = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


class DataMissing(FileNotFoundError):
    """Raised with install instructions when the idx files cannot be found."""


def data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    chosen = Path(path or os.environ.get("TTASERVE_DATA") or DEBIAN_PATH)
    if not chosen.is_dir():
        raise DataMissing(
            f"Fashion-MNIST not found at {chosen}. On Debian/Ubuntu run "
            "'apt-get install dataset-fashion-mnist'; elsewhere put the four idx(.gz) files "
            "in a folder and pass --data DIR or set TTASERVE_DATA."
        )
    return chosen


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.exists():
            return candidate
    raise DataMissing(f"{stem}(.gz) missing in {folder}")


def load_split(split: str, path: str | os.PathLike[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (images float32 [N,1,28,28] in [0,1], labels int64 [N]) for 'train' or 'test'."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    folder = data_dir(path)
    images = _read_idx(_find(folder, _FILES[(split, "images")]))
    labels = _read_idx(_find(folder, _FILES[(split, "labels")]))
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y
