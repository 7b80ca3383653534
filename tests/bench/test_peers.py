"""Peers benchmark: a quick real run against every peer installed in .venv-peers
(scripts/bench-peers.sh makes it), plus the failure path, which needs no peer at all."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ttaserve.bench import peer_servers, peers
from ttaserve.bench.peer_servers import (
    TUNED_MALLOC,
    Launch,
    PeerError,
    Setup,
    check_environments,
    server_env,
)
from ttaserve.bench.peers import PEERS, format_table, run_peers

REPO = Path(__file__).resolve().parents[2]

CONCURRENCIES = (1, 4)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("peers")
    return run_peers(out, quick=True, concurrencies=CONCURRENCIES, duration_s=1.5), out


def _served(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in result["servers"].items() if s["status"] == "ok"}


@pytest.mark.slow
def test_every_installed_peer_produces_results(quick_run: tuple[dict[str, Any], Path]) -> None:
    result, _ = quick_run
    assert set(result["servers"]) == set(PEERS)
    assert result["servers"]["ttaserve"]["status"] == "ok", result["servers"]["ttaserve"]
    for name, server in result["servers"].items():
        # a peer may be absent from the virtualenv; one that is installed must work
        assert server["status"] in ("ok", "not-installed"), f"{name}: {server.get('reason')}"


@pytest.mark.slow
def test_throughput_and_latency_at_each_concurrency(quick_run: tuple[dict[str, Any], Path]) -> None:
    result, _ = quick_run
    for name, server in _served(result).items():
        assert [r["concurrency"] for r in server["runs"]] == list(CONCURRENCIES), name
        for run in server["runs"]:
            assert run["errors"] == 0, f"{name}: {run['first_error']}"
            assert run["requests"] > 0 and run["req_per_s"] > 0, name
            assert run["images_per_s"] == pytest.approx(run["req_per_s"] * result["batch"])
            assert 0 < run["p50_ms"] <= run["p99_ms"], name


@pytest.mark.slow
def test_responses_equal_the_in_process_model(quick_run: tuple[dict[str, Any], Path]) -> None:
    result, _ = quick_run
    for name, server in _served(result).items():
        assert server["max_abs_diff"] <= 1e-5, name


@pytest.mark.slow
def test_ratios_come_from_the_same_run(quick_run: tuple[dict[str, Any], Path]) -> None:
    result, _ = quick_run
    own = {r["concurrency"]: r["req_per_s"] for r in result["servers"]["ttaserve"]["runs"]}
    for name, server in _served(result).items():
        if name.startswith("ttaserve"):
            continue
        rows = {row["concurrency"]: row for row in result["ratios"][name]}
        assert set(rows) == set(CONCURRENCIES), name
        for run in server["runs"]:
            row = rows[run["concurrency"]]
            assert row["throughput"] == pytest.approx(own[run["concurrency"]] / run["req_per_s"])
            assert row["goal_met"] == (row["throughput"] >= row["goal"])
    adapting = {r["concurrency"]: r["req_per_s"] for r in result["servers"]["ttaserve-alpha-bn"]["runs"]}
    for name, rows in result["ratios_adapting"].items():
        peer = {r["concurrency"]: r["req_per_s"] for r in result["servers"][name]["runs"]}
        for row in rows:
            assert row["goal"] == 1.0
            assert row["throughput"] == pytest.approx(adapting[row["concurrency"]] / peer[row["concurrency"]])


@pytest.mark.slow
def test_json_chart_and_table_are_written(quick_run: tuple[dict[str, Any], Path]) -> None:
    result, out = quick_run
    assert json.loads((out / "peers.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "peers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(result)
    for name in PEERS:
        assert name in table


def test_a_missing_peer_is_recorded_not_raised(tmp_path: Path) -> None:
    result = run_peers(tmp_path, quick=True, concurrencies=(1,), duration_s=0.2, rounds=2,
                       peers=("triton", "torchserve"), peers_venv=tmp_path / "no-such-venv")
    for name in ("triton", "torchserve"):
        server = result["servers"][name]
        assert server["status"] == "not-installed"
        assert "no peers virtualenv" in server["reason"]
        assert server["rounds_done"] == 0  # checked once, not retried in the second round
    assert result["rounds"] == 2 and result["direct"]["req_per_s"] > 0
    assert result["ratios"] == {}
    assert "not-installed" in format_table(result)
    assert (tmp_path / "peers.json").exists() and (tmp_path / "peers.png").exists()
    assert result["allocator"] == "tuned" and result["server_env"] == {
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **TUNED_MALLOC}
    assert result["publishable"] is False and result["not_publishable_because"][0] == "--quick"
    assert "allocator tuned" in format_table(result) and "NOT publishable" in format_table(result)


def test_unknown_peer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown peers"):
        run_peers(tmp_path, quick=True, peers=("kserve",))


def test_a_short_full_run_is_marked_not_publishable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    result = run_peers(tmp_path, concurrencies=(1,), duration_s=0.2, rounds=1, peers=("triton",),
                       peers_venv=tmp_path / "no-such-venv")
    assert result["publishable"] is False
    assert result["not_publishable_because"] == ["0.2 s per point (< 10)", "1 round(s) (< 2)"]
    assert "not publishable" in caplog.text


def _record_launches(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[Setup, Launch]]:
    """Wrap every real launcher: record what it was given and what it would start, then
    stop before any server starts (TorchServe's archiver and Triton's LIBDIR probe are
    not run either; they need the peers' virtualenv)."""
    seen: dict[str, tuple[Setup, Launch]] = {}
    monkeypatch.setattr(peer_servers, "_run", lambda command, what: "")

    def recording(name: str, launcher: Any) -> Any:
        def launch(setup: Setup) -> Launch:
            seen[name] = (setup, launcher(setup))
            raise PeerError("recorded, not started")
        return launch

    monkeypatch.setattr(peers, "LAUNCHERS", {n: (None, recording(n, fn)) for n, (_, fn) in peers.LAUNCHERS.items()})
    return seen


def _paths_in(launch: Launch, setup: Setup) -> list[str]:
    """Every path a launch hands its server: on its command line, in its environment, in its config files."""
    words = [*launch.command, *(v for k, v in launch.env.items() if os.environ.get(k) != v)]
    for config in setup.workdir.rglob("*"):
        if config.suffix in (".json", ".properties"):
            words += config.read_text().replace("=", " ").replace('"', " ").split()
    return [w for w in words if "/" in w and "://" not in w and ":" not in w.strip("/")]


def test_a_relative_out_reaches_every_launcher_as_absolute_paths(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The servers run in their own directories: a relative path would be applied twice."""
    seen = _record_launches(monkeypatch)
    monkeypatch.chdir(tmp_path)
    result = run_peers("rel/out", quick=True, concurrencies=(1,), duration_s=0.1, peers_venv="rel-venv")
    assert set(seen) == set(PEERS)
    assert all(s["status"] == "failed" for s in result["servers"].values())
    for name, (setup, launch) in seen.items():
        assert setup.workdir == tmp_path / "rel" / "out" / "servers" / "round0" / name, name
        assert setup.peers_python == tmp_path / "rel-venv" / "bin" / "python", name
        paths = _paths_in(launch, setup)
        assert paths and all(Path(p).is_absolute() for p in paths), (name, paths)
    assert (tmp_path / "rel" / "out" / "servers" / "round0" / "mlserver" / "mlserver" / "settings.json").exists()
    assert (tmp_path / "rel" / "out" / "peers.json").exists()


@pytest.mark.parametrize("allocator", ["tuned", "default"])
def test_every_server_gets_the_same_threads_and_allocator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          allocator: str) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # a setting of this shell reaches no server
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    seen = _record_launches(monkeypatch)
    run_peers(tmp_path, quick=True, concurrencies=(1,), duration_s=0.1, threads=2, allocator=allocator)
    terms = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", **(TUNED_MALLOC if allocator == "tuned" else {})}
    for name, (_, launch) in seen.items():
        assert {k: v for k, v in launch.env.items() if k.startswith(("MALLOC_", "OMP_", "MKL_"))} == terms, name
        assert "GLIBC_TUNABLES" not in launch.env, name
    ttaserve = seen["ttaserve"][1].command
    assert ttaserve[ttaserve.index("--torch-threads") + 1] == "2"
    assert ("--no-keep-freed-memory" in ttaserve) == (allocator == "default")
    adapting = seen["ttaserve-alpha-bn"][1].command  # the same server, adapting every batch
    assert adapting[adapting.index("--policy") + 1] == "alpha-bn"
    assert [w for w in adapting if w not in ("alpha-bn", "source")][:4] == [w for w in ttaserve if w != "source"][:4]
    assert seen["triton"][1].env["TTASERVE_PEER_THREADS"] == "2"
    for name in ("triton", "mlserver", "torchserve"):  # the layout ttaserve runs the demo in
        assert seen[name][1].env["TTASERVE_PEER_CHANNELS_LAST"] == "1", name


def test_unknown_allocator_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown allocator"):
        run_peers(tmp_path, quick=True, allocator="jemalloc")


def test_the_environment_check_sees_every_process_of_a_server(tmp_path: Path) -> None:
    """A real process tree (a parent and two children, one started with another
    environment): the check reads each one's initial environment from /proc."""
    if not Path("/proc/self/environ").exists():
        pytest.skip("needs /proc")
    setup = Setup(Path(sys.executable), 1, tmp_path)
    child = "import subprocess, sys, time; env = {'PATH': '/usr/bin:/bin'}; " \
            "kids = [subprocess.Popen(['sleep', '30']), subprocess.Popen(['sleep', '30'], env=env)]; " \
            "print('up', flush=True); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", child], env=server_env(setup), stdout=subprocess.PIPE,
                            start_new_session=True, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        check = check_environments(proc.pid, peer_servers.equal_terms(setup.threads, setup.allocator))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert check["processes"] == 3 and check["as_set"] == 2
    assert check["differing"] == [{"process": "sleep", "env": dict.fromkeys(
        ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MKL_NUM_THREADS", "OMP_NUM_THREADS"])}]


def test_ratios_close_to_their_goal_show_enough_digits() -> None:
    run = {"concurrency": 1, "requests": 1, "req_per_s": 1.0, "images_per_s": 64.0, "p50_ms": 1.0,
           "p99_ms": 1.0, "errors": 0}
    result = {"servers": {}, "direct": run, "load_average": {"before": [0.0], "after": [0.0]}, "cpus": 2,
              "threads": 1, "duration_s": 15.0, "rounds": 2, "publishable": True,
              "ratios": {"triton": [{"concurrency": 1, "throughput": 0.9962, "p99": 1.0, "goal": 1.0,
                                     "goal_met": False}]}}
    assert "0.996x [>= 1.0: NOT met]" in format_table(result)
    assert "NOT publishable" not in format_table(result)


def test_help_of_the_script_installs_nothing(tmp_path: Path) -> None:
    """With this checkout's .venv the options come from argparse; in a copy of the script
    without one, from the script itself. Either way nothing is created."""
    copy = tmp_path / "checkout"
    (copy / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "bench-peers.sh", copy / "scripts")
    for script in (REPO / "scripts" / "bench-peers.sh", copy / "scripts" / "bench-peers.sh"):
        before = sorted(p.name for p in script.parents[1].iterdir())
        started = time.monotonic()
        done = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PEERS_VENV": str(tmp_path / "no-venv")})
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - started < 30
        assert "--allocator" in done.stdout and "--duration" in done.stdout
        assert sorted(p.name for p in script.parents[1].iterdir()) == before
    assert not (tmp_path / "no-venv").exists()
    assert sorted(p.name for p in copy.iterdir()) == ["scripts"]
