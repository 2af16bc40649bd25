"""The soak's CI version: `python -m bench.soak --seconds 60` (bench/soak.py), a mixed load
with reloads every few seconds, fails on any error, dropped tunnel or growth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_a_minute_of_mixed_load_with_reloads_loses_nothing_and_grows_nothing() -> None:
    root = Path(__file__).parent.parent
    r = subprocess.run([sys.executable, "-m", "bench.soak", "--seconds", "60", "--json"],
                       cwd=root, capture_output=True, text=True, timeout=300)
    out = json.loads(r.stdout)
    assert out["problems"] == [], out
    assert r.returncode == 0
    assert out["dropped_tunnels"] == 0 and out["reloads"] >= 15
    done = out["done"]
    for kind in ("handshake", "keep-alive GETs", "limited GETs", "client reset",
                 "upstream reset", "slow reader", "garbage", "long tunnel messages",
                 "429 from limit_req"):
        assert done.get(kind, 0) > 0, (kind, done)
    assert out["end"]["fds"] <= out["start"]["fds"] + 2
