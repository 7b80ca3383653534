"""MLServer custom runtime serving the demo model (``implementation: mlserver_peer.DemoRuntime``).

MLServer decodes the request with its NumPy codec and encodes the logits the same way;
which wire form (raw bytes or typed contents) goes back is MLServer's choice: it answers
raw when the request came raw, as tritonclient sends it.
"""

from __future__ import annotations

import demo_model
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class DemoRuntime(MLModel):
    async def load(self) -> bool:
        self._model = demo_model.load()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        images = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        logits = demo_model.predict(self._model, images.reshape(-1, 1, 28, 28))
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output("logits", logits)],
        )
