"""Self-checks of the bench's own C programs: the load generator must catch a wrong echo.

    python -m pytest bench/test_selfcheck.py

Builds wsload and wsbackend into a temp dir (never over bench/.build/), runs them on
loopback for a second or two each, and needs nothing else.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def exes(tmp_path_factory):
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("bench-build")
    out = {}
    for name in ("wsload", "wsbackend"):
        exe = d / name
        subprocess.run([cc, "-O2", "-Wall", "-Wno-unused-function", "-o", str(exe), str(HERE / f"{name}.c")],
                       check=True)
        out[name] = exe
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(exes, *extra):
    port = _free_port()
    p = subprocess.Popen([str(exes["wsbackend"]), "-p", str(port), "-t", "60", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.02)
    return p, port


def _load(exes, port, *args):
    r = subprocess.run([str(exes["wsload"]), "--port", str(port), "--duration", "1", "--warmup", "0.2", *args],
                       capture_output=True, text=True, timeout=60)
    res = [json.loads(line[7:]) for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert res, r.stdout + r.stderr
    return r.returncode, res[0], r.stdout


@pytest.mark.parametrize("mode,size", [("echo", "64"), ("echo", "4096"), ("send", "65536"), ("recv", "65536"),
                                       ("handshake", "64"), ("http", "0")])
def test_clean_backend_passes(exes, mode, size):
    p, port = _backend(exes)
    try:
        rc, res, out = _load(exes, port, "--mode", mode, "--size", size, "--conns", "8")
    finally:
        p.terminate()
        p.wait(5)
    assert rc == 0 and res["errors"] == 0, res
    assert res["count"] > 0
    assert "MARK start" in out and "MARK end" in out


@pytest.mark.parametrize("mode,pace", [("send", ["--rate", "40"]),                  # wsload paces
                                       ("recv", ["--path", "/firehose?rate=5"])])   # the backend does
def test_paced_bulk_holds_its_pace(exes, mode, pace):
    # the paced bulk scenarios: 40 MB/s in all over 8 connections, every byte still checked
    p, port = _backend(exes)
    try:
        rc, res, out = _load(exes, port, "--mode", mode, "--size", "65536", "--conns", "8", *pace)
    finally:
        p.terminate()
        p.wait(5)
    assert rc == 0 and res["errors"] == 0, res
    assert 0 < res["mb_per_s"] <= 40 * 1.05, res


def test_chat_sends_each_connection_a_message_an_interval(exes):
    # 200 connections, a message each 0.2 s: about 1,000 messages a second, every echo checked
    p, port = _backend(exes)
    try:
        rc, res, out = _load(exes, port, "--mode", "chat", "--conns", "200", "--interval", "0.2",
                             "--inflight", "64")
    finally:
        p.terminate()
        p.wait(5)
    assert rc == 0 and res["errors"] == 0 and res["opened"] == 200, res
    assert 600 <= res["rate"] <= 1100, res       # paced, not a ping-pong
    assert "MARK start" in out and "MARK end" in out


def test_wait_go_holds_the_run_until_told(exes):
    p, port = _backend(exes)
    try:
        w = subprocess.Popen([str(exes["wsload"]), "--port", str(port), "--mode", "echo", "--conns", "4",
                              "--duration", "0.5", "--warmup", "0", "--wait-go"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert w.stdout.readline().startswith("MARK open")
        w.stdin.write("go\n")
        w.stdin.flush()
        out = w.stdout.read()
        w.wait(30)
    finally:
        p.terminate()
        p.wait(5)
    assert w.returncode == 0 and "MARK start" in out and '"errors": 0' in out


@pytest.mark.parametrize("size", ["64", "4096"])
def test_corrupted_echo_is_caught(exes, size):
    p, port = _backend(exes, "-x", "1000")
    try:
        rc, res, _ = _load(exes, port, "--mode", "echo", "--size", size, "--conns", "8")
    finally:
        p.terminate()
        p.wait(5)
    assert rc != 0
    assert res["errors"] > 0
    assert any("echo mismatch" in e for e in res["error_samples"])


def test_idle_holds_and_releases(exes):
    p, port = _backend(exes)
    try:
        w = subprocess.Popen([str(exes["wsload"]), "--port", str(port), "--mode", "idle", "--conns", "300",
                              "--hold", "20"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = w.stdout.readline()
        assert line.strip() == "READY 300"
        w.stdin.write("go\n")
        w.stdin.flush()
        rest = w.stdout.read()
        assert w.wait(20) == 0
        res = json.loads(rest.split("RESULT ", 1)[1])
        assert res["opened"] == 300 and res["errors"] == 0
    finally:
        p.terminate()
        p.wait(5)


def test_burst_against_a_rejecting_backend(exes):
    # -l: the backend answers a head over 32 KiB with 431 and closes, as a proxy does
    p, port = _backend(exes, "-l", "32768")
    try:
        rc, res, out = _load(exes, port, "--mode", "burst", "--conns", "50", "--count", "500", "--size", "40960",
                             "--duration", "60")
    finally:
        p.terminate()
        p.wait(5)
    assert rc == 0 and res["errors"] == 0, res
    assert res["count"] == res["total_count"] == 500 and res["opened"] == 500
    assert res["statuses"] == {"431": 500} and res["head_bytes"] == 40960
    assert "MARK start" in out and "MARK end" in out


def test_burst_reset_after_the_answer_is_not_an_error(exes):
    # a 300 KB head: the backend answers and closes with most of it unread, so the kernel resets
    p, port = _backend(exes, "-l", "32768")
    try:
        rc, res, _ = _load(exes, port, "--mode", "burst", "--conns", "20", "--count", "100", "--size", "300000",
                           "--duration", "60")
    finally:
        p.terminate()
        p.wait(5)
    assert rc == 0 and res["errors"] == 0, res
    assert res["statuses"] == {"431": 100}


def test_burst_fails_when_the_head_is_accepted(exes):
    p, port = _backend(exes)   # no limit: the backend answers 200
    try:
        rc, res, _ = _load(exes, port, "--mode", "burst", "--conns", "10", "--count", "50", "--size", "40960",
                           "--duration", "60")
    finally:
        p.terminate()
        p.wait(5)
    assert rc != 0 and res["errors"] > 0
    assert any("accepted: status 200" in e for e in res["error_samples"])


def test_burst_fails_when_nobody_answers(exes):
    port = _free_port()   # nothing listens there
    rc, res, _ = _load(exes, port, "--mode", "burst", "--conns", "5", "--count", "10", "--size", "40960",
                       "--duration", "20")
    assert rc != 0 and res["errors"] > 0 and res["connect_errors"] > 0


@pytest.mark.parametrize("mode", ["handshake", "http"])
def test_count_is_a_fixed_amount_of_work(exes, mode):
    p, port = _backend(exes)
    try:
        rc, res, _ = _load(exes, port, "--mode", mode, "--conns", "16", "--count", "300", "--warmup", "0",
                           "--duration", "60")
    finally:
        p.terminate()
        p.wait(5)
    assert rc == 0 and res["errors"] == 0, res
    assert res["total_count"] == 300 and res["started"] == 300


@pytest.mark.parametrize("mode", ["handshake", "http"])
def test_a_peer_that_never_answers_fails_the_run(exes, mode):
    # the kernel completes the TCP handshakes in the backlog; nothing ever answers
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        rc, res, _ = _load(exes, silent.getsockname()[1], "--mode", mode, "--conns", "4", "--timeout", "30")
    assert rc != 0 and res["errors"] > 0
    assert any("still waiting for an answer" in e for e in res["error_samples"]), res["error_samples"]
