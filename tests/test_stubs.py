"""The compiled engine's type stubs (fastws/_engine.pyi) describe the module as built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_stubs_match_the_compiled_engine():
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "fastws._engine",
         "--allowlist", str(HERE / "stubtest-allowlist.txt")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
