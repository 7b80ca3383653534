"""TorchServe custom handler serving the demo model (archived with torch-model-archiver).

A request's ``data`` entry is the raw little-endian float32 bytes of images [B, 1, 28, 28];
the answer is the raw float32 bytes of logits [B, 10]. Raw bytes are TorchServe's cheapest
wire form (JSON lists of 50k floats would measure JSON, not the server).
"""

from __future__ import annotations

from typing import Any

import demo_model
import numpy as np


class DemoHandler:
    def __init__(self) -> None:
        self._model: Any = None

    def initialize(self, context: Any) -> None:
        self._model = demo_model.load()

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        answers = []
        for request in data:  # one entry per request; TorchServe batching is off (batch_size 1)
            payload = request.get("data") or request["body"]
            images = np.frombuffer(bytes(payload), dtype="<f4").reshape(-1, 1, 28, 28)
            answers.append(demo_model.predict(self._model, images.copy()).tobytes())
        return answers
