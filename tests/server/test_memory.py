import platform

import pytest

from ttaserve.server.memory import keep_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="malloc tuning applies to glibc only")
def test_malloc_thresholds_are_raised_on_glibc() -> None:
    assert keep_freed_memory() is True


@pytest.mark.parametrize("tuned", [True, False])
def test_the_server_tunes_malloc_unless_told_not_to(monkeypatch: pytest.MonkeyPatch, tuned: bool) -> None:
    """``--no-keep-freed-memory`` / TTASERVE_KEEP_FREED_MEMORY=0 leave malloc alone (the
    peer benchmark starts ttaserve so when no server gets the tuning)."""
    from tests.server.conftest import running_server
    from ttaserve.server import app

    calls: list[bool] = []
    monkeypatch.setattr(app, "keep_freed_memory", lambda: calls.append(True) or True)
    with running_server(keep_freed_memory=tuned):
        pass
    assert calls == ([True] if tuned else [])


def test_keep_freed_memory_maps_from_the_flag_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from ttaserve.cli import build_parser
    from ttaserve.cli_options import settings_from_args
    from ttaserve.server.settings import ServerSettings

    assert ServerSettings.from_env().keep_freed_memory is True
    assert settings_from_args(build_parser().parse_args(["serve", "--no-keep-freed-memory"])).keep_freed_memory is False
    monkeypatch.setenv("TTASERVE_KEEP_FREED_MEMORY", "0")
    assert ServerSettings.from_env().keep_freed_memory is False
