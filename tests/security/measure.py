"""Measure the server's memory and disk under the attacks of issue 11, for the numbers in
docs/BENCHMARKS.md "Resource bounds".

    .venv/bin/python -m tests.security.measure [--source DIR] [--flood N] [--json]

Each attack runs against a fresh `python -m ttaserve serve` process on loopback whose code
comes from ``--source`` (default: this checkout; point it at another checkout, e.g. a
`git worktree` of an older commit, to compare). Reported: RSS before, after (settled 1 s)
and peak (VmHWM) in MiB, the status codes the attack got, and the attack's own size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.security.attacks import long_sequence_ids, session_flood, unauthenticated_bodies

PLAIN_TOKENS = "inference alice-token\nadmin admin-token\n"  # a format every version reads


def _status(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _serve(source: Path, workdir: Path, *args: str, path: str = "") -> tuple[subprocess.Popen, str, str]:
    tokens = workdir / "tokens"
    tokens.write_text(PLAIN_TOKENS)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ttaserve", "serve", "--grpc-port", "0", "--metrics-port", "0",
         "--torch-threads", "1", "--auth-token-file", str(tokens), *args],
        cwd=source, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": ":".join(filter(None, (str(source), path)))})
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("ttaserve ready"):
            match = re.search(r"gRPC (\S+), metrics (\S+)", line)
            assert match
            return proc, match.group(1), match.group(2)
    raise RuntimeError("server did not start")


def _run(source: Path, name: str, attack: Any, *args: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        proc, url, metrics = _serve(source, Path(tmp), *[a.replace("{tmp}", tmp) for a in args])
        try:
            time.sleep(1)
            before = _status(proc.pid, "VmRSS")
            started = time.monotonic()
            codes, extra = attack(url, metrics, Path(tmp))
            seconds = time.monotonic() - started
            time.sleep(1)
            row = {"attack": name, "flags": " ".join(args), "codes": dict(codes), "seconds": round(seconds, 1),
                   "rss_before_mib": round(before), "rss_after_mib": round(_status(proc.pid, "VmRSS")),
                   "rss_peak_mib": round(_status(proc.pid, "VmHWM")), **extra}
        finally:
            proc.kill()
            proc.wait(timeout=30)
    print(json.dumps(row), flush=True)
    return row


def _sessions_page_bytes(metrics: str) -> int:
    url = metrics.replace("/metrics", "/api/sessions?limit=1000")
    request = urllib.request.Request(url, headers={"Authorization": "Bearer admin-token"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return len(response.read())


def _disk(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*.ttas") if p.is_file())


SLOW_MODEL = """
import time
from ttaserve.models import demo
from ttaserve.models.resnet import DemoResNet

class Slow(DemoResNet):
    def forward(self, x):
        time.sleep(0.6)
        return super().forward(x)

def slow_demo():
    model = demo()
    model.__class__ = Slow
    return model
"""


def shutdown_row(source: Path, queued: int = 8, grace: float = 1.0) -> dict[str, Any]:
    """SIGTERM while ``queued`` requests of one tent sequence wait behind 0.6 s forwards:
    which answers came back, how many batches the restarted server restored, how long the
    stop took (signal to exit)."""
    import signal
    import threading

    import tritonclient.grpc as grpcclient

    from ttaserve.client import ControlClient

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "slowmodel.py").write_text(SLOW_MODEL)
        (root / "models" / "slow").mkdir(parents=True)
        (root / "models" / "slow" / "config.json").write_text(json.dumps({
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28], "range": [0, 1]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
            "factory": "slowmodel:slow_demo"}))
        args = ("--model-repository", str(root / "models"), "--no-demo", "--policy", "tent",
                "--state-dir", str(root / "state"), "--grace", str(grace))
        codes: dict[str, int] = {}
        lock = threading.Lock()
        proc, url, _ = _serve(source, root, *args, path=tmp)

        def send(seed: int) -> None:
            import numpy as np

            x = np.random.default_rng(seed).random((2, 1, 28, 28), dtype=np.float32)
            tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            try:
                grpcclient.InferenceServerClient(url).infer("slow", [tensor], sequence_id="s",
                                                            headers={"authorization": "Bearer admin-token"})
                code = "OK"
            except Exception as exc:
                code = str(getattr(exc, "status", lambda: "error")()).replace("StatusCode.", "")
            with lock:
                codes[code] = codes.get(code, 0) + 1
        threads = [threading.Thread(target=send, args=(i,)) for i in range(queued)]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        proc.wait(timeout=120)
        stopped = time.monotonic() - signalled
        for thread in threads:
            thread.join(120)
        proc, url, _ = _serve(source, root, *args, path=tmp)
        try:
            listed = ControlClient(url, "admin-token").list_sessions("slow").sessions
            restored = sum(s.batches for s in listed)
        finally:
            proc.kill()
            proc.wait(timeout=30)
    row = {"attack": f"SIGTERM with {queued} queued tent requests, --grace {grace}", "codes": codes,
           "batches_restored": restored, "signal_to_exit_s": round(stopped, 1)}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[2])
    parser.add_argument("--flood", type=int, default=1500, help="unmix-tns sessions in the flood")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--only-shutdown", action="store_true", help="run only the shutdown scenario")
    parser.add_argument("--new-flags", action="store_true",
                        help="add this version's budget flags (--max-session-memory, --state-max-bytes)")
    args = parser.parse_args(argv)
    source, flood = args.source.resolve(), args.flood
    memory = ("--max-session-memory", "256MiB") if args.new_flags else ()
    disk = ("--state-max-bytes", "64MiB") if args.new_flags else ()
    if args.only_shutdown:
        shutdown_row(source)
        return 0
    rows = [
        _run(source, "16 unauthenticated 60 MB requests",
             lambda url, m, d: (unauthenticated_bodies(url, 16, 60 << 20), {})),
        _run(source, "300 requests with 1 MiB sequence ids",
             lambda url, m, d: (long_sequence_ids(url, "alice-token", 300, 1 << 20),
                                {"sessions_page_bytes": _sessions_page_bytes(m)})),
        _run(source, f"{flood} new unmix-tns sessions",
             lambda url, m, d: (session_flood(url, "alice-token", flood), {}), *memory),
        _run(source, f"{flood} unmix-tns sessions, 100 live, the rest evicted to --state-dir",
             lambda url, m, d: (session_flood(url, "alice-token", flood), {"state_dir_mib": round(_disk(d / "state") / 2**20)}),
             "--state-dir", "{tmp}/state", "--max-sessions", "100", *disk),
    ]
    rows.append(shutdown_row(source))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
