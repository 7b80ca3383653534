import platform

import pytest

from ttaserve.server.memory import keep_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="malloc tuning applies to glibc only")
def test_malloc_thresholds_are_raised_on_glibc() -> None:
    assert keep_freed_memory() is True
