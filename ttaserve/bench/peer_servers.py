"""Starting, probing and stopping the peer servers of ``ttaserve.bench.peers`` (each a
subprocess on loopback ports, peers from their own virtualenv), and their gRPC clients."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ttaserve.server.memory import MMAP_THRESHOLD, TRIM_THRESHOLD

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
_SCRIPTS = _HERE / "peer_scripts"
_REPO = _HERE.parents[1]
_MODELS = _HERE.parent / "models"

Caller = Callable[[np.ndarray], np.ndarray]  # images [B,1,28,28] -> logits [B,10]

ALLOCATORS = ("tuned", "default")
# ttaserve's in-process malloc tuning (server/memory.py) as glibc reads it from the
# environment at start: given to every server process under --allocator tuned.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


class PeerError(RuntimeError):
    """A peer could not be installed, started or queried; the message says why."""


@dataclass(frozen=True)
class Launch:
    """How to start one server: its command, environment, and a per-thread client factory."""

    command: list[str]
    env: dict[str, str]
    client: Callable[[], Caller]


@dataclass(frozen=True)
class Setup:
    """What every launcher needs: interpreters, thread count, a scratch directory (all
    paths absolute: servers run with the scratch directory as their working directory),
    and the allocator setting every server gets (one of ``ALLOCATORS``)."""

    peers_python: Path
    threads: int
    workdir: Path
    allocator: str = "tuned"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def equal_terms(threads: int, allocator: str) -> dict[str, str]:
    """The variables every server process gets alike (its workers inherit them): thread
    pools and, under ``tuned``, the malloc thresholds; under ``default`` nobody gets those."""
    pools = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return {**pools, **(TUNED_MALLOC if allocator == "tuned" else {})}


def server_env(setup: Setup) -> dict[str, str]:
    """This process's environment without any allocator setting of its own (``MALLOC_*``,
    glibc tunables, a preloaded allocator), plus ``equal_terms``."""
    inherited = {k: v for k, v in os.environ.items()
                 if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    return {**inherited, "PYTHONUNBUFFERED": "1", **equal_terms(setup.threads, setup.allocator)}


def _peer_env(setup: Setup) -> dict[str, str]:
    return {
        **server_env(setup),
        "PYTHONPATH": str(_SCRIPTS),
        "PATH": f"{setup.peers_python.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TTASERVE_PEER_RESNET": str(_MODELS / "resnet.py"),
        "TTASERVE_PEER_WEIGHTS": str(_MODELS / "weights" / "expert.safetensors"),
        "TTASERVE_PEER_THREADS": str(setup.threads),
        # the memory layout ttaserve runs the demo in (ttaserve.adapters.model.prepare)
        "TTASERVE_PEER_CHANNELS_LAST": "1",
    }


def _triton_client(url: str, model: str = "demo") -> Callable[[], Caller]:
    def make() -> Caller:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(url)

        def call(images: np.ndarray) -> np.ndarray:
            tensor = grpcclient.InferInput("input", list(images.shape), "FP32")
            tensor.set_data_from_numpy(images)
            return client.infer(model, [tensor]).as_numpy("logits")

        return call

    return make


def _torchserve_messages() -> tuple[Any, Any]:
    """PredictionsRequest / PredictionResponse of TorchServe's inference.proto (fields used here)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FieldDescriptorProto
    package = "org.pytorch.serve.grpc.inference"
    proto = descriptor_pb2.FileDescriptorProto(name="ttaserve_bench_torchserve.proto",
                                               package=package, syntax="proto3")
    request = proto.message_type.add(name="PredictionsRequest")
    request.field.add(name="model_name", number=1, type=fdp.TYPE_STRING, label=fdp.LABEL_OPTIONAL)
    entry = request.nested_type.add(name="InputEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=fdp.TYPE_STRING, label=fdp.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=fdp.TYPE_BYTES, label=fdp.LABEL_OPTIONAL)
    request.field.add(name="input", number=3, type=fdp.TYPE_MESSAGE, label=fdp.LABEL_REPEATED,
                      type_name=f".{package}.PredictionsRequest.InputEntry")
    response = proto.message_type.add(name="PredictionResponse")
    response.field.add(name="prediction", number=1, type=fdp.TYPE_BYTES, label=fdp.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()  # private: never clashes with other generated code
    pool.Add(proto)
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))
                 for name in ("PredictionsRequest", "PredictionResponse"))  # type: ignore[return-value]


def _torchserve_client(url: str) -> Callable[[], Caller]:
    request_type, response_type = _torchserve_messages()

    def make() -> Caller:
        import grpc

        channel = grpc.insecure_channel(url, options=[("grpc.max_receive_message_length", -1)])
        predict = channel.unary_unary(
            "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString,
        )

        def call(images: np.ndarray) -> np.ndarray:
            request = request_type(model_name="demo", input={"data": images.astype("<f4").tobytes()})
            answer = np.frombuffer(predict(request, timeout=60).prediction, dtype="<f4")
            return answer.reshape(len(images), -1)

        return call

    return make


def _launch_ttaserve(setup: Setup, policy: str = "source") -> Launch:
    port = free_port()
    command = [sys.executable, "-m", "ttaserve", "serve", "--grpc-port", str(port),
               "--metrics-port", "-1", "--policy", policy, "--torch-threads", str(setup.threads)]
    if setup.allocator != "tuned":  # no in-process tuning either: malloc as glibc ships it
        command.append("--no-keep-freed-memory")
    return Launch(command, server_env(setup), _triton_client(f"127.0.0.1:{port}"))


def _launch_triton(setup: Setup) -> Launch:
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    env = _peer_env(setup)
    # pytriton's Python backend stub links libpython; without the running interpreter's
    # LIBDIR first it picks the system one and the model fails to load (RLock error).
    env["LD_LIBRARY_PATH"] = f"{_python_libdir(setup.peers_python)}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"
    command = [str(setup.peers_python), str(_SCRIPTS / "triton_peer.py"),
               str(grpc_port), str(http_port), str(metrics_port)]
    return Launch(command, env, _triton_client(f"127.0.0.1:{grpc_port}"))


def _launch_mlserver(setup: Setup) -> Launch:
    root = setup.workdir / "mlserver"
    (root / "demo").mkdir(parents=True, exist_ok=True)
    grpc_port = free_port()
    settings = {"host": "127.0.0.1", "http_port": free_port(), "grpc_port": grpc_port,
                "metrics_port": free_port()}  # parallel_workers stays at MLServer's default
    (root / "settings.json").write_text(json.dumps(settings))
    model = {"name": "demo", "implementation": "mlserver_peer.DemoRuntime"}
    (root / "demo" / "model-settings.json").write_text(json.dumps(model))
    command = [str(setup.peers_python.parent / "mlserver"), "start", str(root)]
    return Launch(command, _peer_env(setup), _triton_client(f"127.0.0.1:{grpc_port}"))


def _launch_torchserve(setup: Setup) -> Launch:
    root = setup.workdir / "torchserve"
    store = root / "store"
    store.mkdir(parents=True, exist_ok=True)
    bin_dir = setup.peers_python.parent
    _run([str(bin_dir / "torch-model-archiver"), "--model-name", "demo", "--version", "1.0",
          "--handler", str(_SCRIPTS / "torchserve_peer.py"), "--extra-files",
          str(_SCRIPTS / "demo_model.py"), "--export-path", str(store),
          "--archive-format", "no-archive", "--force"], "torch-model-archiver")
    grpc_port = free_port()
    config = {
        "inference_address": f"http://127.0.0.1:{free_port()}",
        "management_address": f"http://127.0.0.1:{free_port()}",
        "metrics_address": f"http://127.0.0.1:{free_port()}",
        "grpc_inference_address": "127.0.0.1", "grpc_inference_port": grpc_port,
        "grpc_management_address": "127.0.0.1", "grpc_management_port": free_port(),
        "default_workers_per_model": 1, "disable_system_metrics": "true",
        "disable_token_authorization": "true", "python": str(setup.peers_python),
        "model_store": str(store), "load_models": "demo",
    }
    (root / "config.properties").write_text("".join(f"{k}={v}\n" for k, v in config.items()))
    command = [str(bin_dir / "torchserve"), "--start", "--foreground", "--ncs",
               "--ts-config", str(root / "config.properties"), "--model-store", str(store)]
    return Launch(command, _peer_env(setup), _torchserve_client(f"127.0.0.1:{grpc_port}"))


LAUNCHERS: dict[str, tuple[str | None, Callable[[Setup], Launch]]] = {
    "ttaserve": (None, _launch_ttaserve),
    # adapting every request (alpha-bn on each batch: no sequence id needed), against the
    # peers serving the unadapted model
    "ttaserve-alpha-bn": (None, lambda setup: _launch_ttaserve(setup, "alpha-bn")),
    "triton": ("pytriton", _launch_triton),
    "mlserver": ("mlserver", _launch_mlserver),
    "torchserve": ("ts", _launch_torchserve),
}


def _run(command: list[str], what: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise PeerError(f"{what} failed: {(done.stderr or done.stdout).strip()[-600:]}")
    return done.stdout


def _python_libdir(python: Path) -> str:
    return _run([str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                "reading LIBDIR").strip()


def check_installed(python: Path, module: str) -> None:
    if not python.exists():
        raise PeerError(f"no peers virtualenv at {python.parent.parent} (run scripts/bench-peers.sh)")
    _run([str(python), "-c", f"import {module}"], f"import {module} in the peers virtualenv")


def _log_tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


@contextmanager
def serving(launch: Launch, log_path: Path, timeout_s: float, probe: np.ndarray) -> Iterator[tuple[Caller, int]]:
    """Start the server in its own session, wait until it answers, stop it afterwards;
    yields a client and the session id (every process the server starts belongs to it)."""
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(launch.command, env=launch.env, cwd=log_path.parent,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield _wait_ready(proc, launch.client, probe, timeout_s, log_path), proc.pid
    finally:
        _stop(proc)


def _session_processes(session: int) -> Iterator[tuple[str, dict[str, str]]]:
    """Name and initial environment (what glibc read at start) of each live process of ``session``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            if int(text[text.rindex(")") + 2:].split()[3]) != session:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
        pairs = (item.decode(errors="replace").partition("=") for item in environ if item)
        yield text[text.index("(") + 1:text.rindex(")")], {k: v for k, _, v in pairs}


def check_environments(session: int, expected: dict[str, str]) -> dict[str, Any]:
    """Whether every process of the server (workers included) started with ``expected``
    and with no malloc setting beyond it; the ones that did not are listed."""
    keys = sorted({*expected, *TUNED_MALLOC})
    want = {k: expected.get(k) for k in keys}
    seen = [(name, {k: env.get(k) for k in keys}) for name, env in _session_processes(session)]
    differing = [{"process": name, "env": env} for name, env in seen if env != want]
    return {"processes": len(seen), "as_set": len(seen) - len(differing), "differing": differing}


def _wait_ready(proc: subprocess.Popen, client: Callable[[], Caller], probe: np.ndarray,
                timeout_s: float, log_path: Path) -> Caller:
    deadline = time.monotonic() + timeout_s
    call, error = None, ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerError(f"exited with code {proc.returncode}:\n{_log_tail(log_path)}")
        try:
            call = call or client()
            call(probe)
            return call
        except Exception as exc:  # not up yet: connection refused, model still loading
            error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            time.sleep(0.5)
    raise PeerError(f"not ready after {timeout_s:.0f} s (last error: {error}):\n{_log_tail(log_path)}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT the whole group (TorchServe's Java frontend and workers, Triton's server), then kill."""
    for sig, wait_s in ((signal.SIGINT, 15.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGINT:  # leader gone; children of the group may linger
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return
