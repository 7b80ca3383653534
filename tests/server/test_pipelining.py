"""Decoding and encoding overlap the forward: the event loop decodes the next request and
encodes the last answer while the model's worker thread computes.

The forward is slowed down (a real forward plus 0.3 s) only so that the overlap is
visible in wall-clock time on a busy 2-core machine; decoding, encoding and the worker
are the server's own."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import ttaserve.server.inference as inference
from tests.server.conftest import images, infer_input, running_server

SLOW_S = 0.3


def test_the_next_request_is_decoded_and_the_last_encoded_during_a_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, float]] = []
    decode, encode = inference.decode_request, inference.encode_response

    def decoding(*args: Any, **kwargs: Any) -> Any:
        events.append(("decode", time.monotonic()))
        return decode(*args, **kwargs)

    def encoding(*args: Any, **kwargs: Any) -> Any:
        events.append(("encode", time.monotonic()))
        return encode(*args, **kwargs)

    monkeypatch.setattr(inference, "decode_request", decoding)
    monkeypatch.setattr(inference, "encode_response", encoding)
    with running_server(policy="source") as server:
        engine = server.engine()
        run = engine.run

        def slow_run(request: Any) -> Any:
            events.append(("forward", time.monotonic()))
            answer = run(request)
            time.sleep(SLOW_S)
            events.append(("forward-end", time.monotonic()))
            return answer

        monkeypatch.setattr(engine, "run", slow_run)
        clients = [server.client() for _ in range(2)]
        for client in clients:  # warm: connections, first forward
            client.infer("demo", [infer_input(images(4))])
        events.clear()
        x = images(64)
        threads = [threading.Thread(target=lambda c=c: c.infer("demo", [infer_input(x)])) for c in clients]
        threads[0].start()
        deadline = time.monotonic() + 10
        while not any(kind == "forward" for kind, _ in events) and time.monotonic() < deadline:
            time.sleep(0.005)  # the second request is sent once the first one computes
        threads[1].start()
        for thread in threads:
            thread.join(30)
    starts = sorted(t for kind, t in events if kind == "forward")
    ends = sorted(t for kind, t in events if kind == "forward-end")
    decodes = sorted(t for kind, t in events if kind == "decode")
    encodes = sorted(t for kind, t in events if kind == "encode")
    assert len(starts) == len(ends) == len(decodes) == len(encodes) == 2
    assert starts[0] < decodes[1] < ends[0]  # request 2 decoded while request 1 computed
    assert ends[0] <= encodes[0] < ends[1] - SLOW_S / 2  # request 1 answered long before request 2's forward ended
    assert starts[1] < ends[0] + SLOW_S / 2  # and request 2's forward did not wait for that
