"""The fastws command as a user runs it: the demo, the client, the shipped examples."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent


def test_demo_echoes_through_the_splice_core():
    port = free_port()
    demo = subprocess.Popen([sys.executable, "-m", "fastws", "demo", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_port("127.0.0.1", port)
        url = f"ws://127.0.0.1:{port}/ws"
        result = subprocess.run([sys.executable, "-m", "fastws", "client", url, "hello", "world"],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["hello", "world"]
    finally:
        demo.send_signal(signal.SIGINT)
        out, _ = demo.communicate(timeout=15)
    assert demo.returncode == 0, out
    assert f"fastws client {url} hello" in out         # it told the user how to try it
    assert "Traceback" not in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("fastws demo: stopped; 1 tunnel relayed, ")
    spliced = int(last.split(", ")[1].split()[0])
    assert spliced > 0, last


def test_demo_port_in_use_is_one_line():
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "fastws", "demo", "--port", str(port)],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"fastws: cannot listen: 127.0.0.1:{port}: Address already in use")


def test_client_reports_a_refused_connection():
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "fastws", "client",
                             f"ws://127.0.0.1:{port}/ws"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 1
    assert "Connection refused" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.toml")),
                         ids=lambda p: p.name)
def test_examples_pass_the_check(example):
    result = subprocess.run([sys.executable, "-m", "fastws", "-t", "-c", str(example)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stdout


def test_no_config_is_a_clear_message():
    result = subprocess.run([sys.executable, "-m", "fastws"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 1
    assert "fastws -c FILE" in result.stderr
