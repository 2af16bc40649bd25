"""The examples of examples/, each run as written (its module unchanged, its configuration with
this test's ports and files), by the fastws command, with real clients and backends."""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterator

import jwt
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from support import EchoBackend, NamedBackend, Proxy, free_port, to_toml, wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SECRET = "s3cret-for-the-test-only"


@pytest.fixture
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[Callable[..., Proxy]]:
    made: list[Proxy] = []

    def run(name: str, servers: dict[str, list[str]], **env: str) -> Proxy:
        cfg: dict[str, Any] = tomllib.loads((EXAMPLES / name / "fastws.toml").read_text())
        port = free_port()
        for server in cfg["server"]:
            server["listen"] = [f"127.0.0.1:{port}"]
            if "access_log" in server:
                server["access_log"]["path"] = str(tmp_path / "access.log")
        for up in cfg["upstream"]:
            up["servers"] = servers[up["name"]]
        monkeypatch.setenv("PYTHONPATH", str(EXAMPLES / name))
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        proxy = Proxy(tmp_path, to_toml(cfg), port=port)
        made.append(proxy)
        return proxy

    yield run
    for proxy in made:
        proxy.stop()
        assert "still held" not in proxy.output() and "Traceback" not in proxy.output()


def token(sub: str, secret: str = SECRET, ttl: float = 60) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl)}, secret, algorithm="HS256")


def test_token_check(example: Callable[..., Proxy], tmp_path: Path) -> None:
    backend = NamedBackend("chat")
    p = example("token_check", {"chat": [backend.address]}, FASTWS_JWT_SECRET=SECRET)
    url = f"ws://127.0.0.1:{p.port}/chat"
    for bad in ("", f"?token={token('eve', 'another-secret')}", f"?token={token('eve', ttl=-5)}"):
        with pytest.raises(InvalidStatus) as err:
            connect(url + bad)
        assert err.value.response.status_code == 401
    with connect(f"{url}?token={token('alice')}") as ws:
        ws.send("hi")
        assert ws.recv() == "hi"
    with connect(url, additional_headers={"Cookie": f"token={token('bob')}"}) as ws:
        ws.send("hi")
        assert ws.recv() == "hi"
    users = [dict(fields).get("X-User") for _, fields in backend.heads]
    assert users == ["alice", "bob"]
    wait_until(lambda: (tmp_path / "access.log").exists()
               and (tmp_path / "access.log").read_text().count(" 101 ") >= 2)
    log = (tmp_path / "access.log").read_text()
    assert " - \"GET /chat HTTP/1.1\" 401" in log and " alice \"GET /chat?token=" in log


def test_token_check_refuses_to_start_without_its_secret(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES / "token_check"))
    monkeypatch.delenv("FASTWS_JWT_SECRET", raising=False)
    out = subprocess.run([sys.executable, "-m", "fastws", "-t", "-c",
                          str(EXAMPLES / "token_check" / "fastws.toml")],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 1 and "set FASTWS_JWT_SECRET" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_tenant_routing(example: Callable[..., Proxy]) -> None:
    acme = [NamedBackend("acme-1"), NamedBackend("acme-2")]
    globex = NamedBackend("globex")
    p = example("tenant_routing", {"tenant_acme": [b.address for b in acme],
                                   "tenant_globex": [globex.address]})
    import socket

    def tenant_url(tenant: str) -> dict[str, Any]:
        # the tenant's name in the URL (and so in Host), the proxy's address for the socket
        return {"uri": f"ws://{tenant}.chat.example.com/feed",
                "sock": socket.create_connection(("127.0.0.1", p.port), timeout=10)}

    for tenant, n in (("acme", 4), ("globex", 2)):
        for _ in range(n):
            with connect(**tenant_url(tenant)) as ws:
                ws.send("x")
                assert ws.recv() == "x"
    with pytest.raises(InvalidStatus) as err:
        connect(**tenant_url("initech"))
    assert err.value.response.status_code == 404
    assert [len(b.heads) for b in acme] == [2, 2] and len(globex.heads) == 2
    assert {dict(f)["X-Tenant"] for b in acme for _, f in b.heads} == {"acme"}
    # plain requests are routed too (hook_requests)
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    s.sendall(b"GET /api HTTP/1.1\r\nHost: globex.chat.example.com\r\nConnection: close\r\n\r\n")
    from support import read_all
    assert read_all(s).endswith(b"globex")
    s.close()


def test_usage_counting(example: Callable[..., Proxy], tmp_path: Path) -> None:
    backend = EchoBackend()
    usage = tmp_path / "usage.json"
    try:
        p = example("usage_counting", {"app": [backend.address]},
                    FASTWS_USAGE_FILE=str(usage))
        url = f"ws://127.0.0.1:{p.port}/ws"
        for key, messages in (("key-acme", 3), ("key-acme", 2), ("key-globex", 1)):
            with connect(url, additional_headers={"X-Api-Key": key}) as ws:
                for _ in range(messages):
                    ws.send(b"m" * 1000)
                    assert ws.recv() == b"m" * 1000
        with pytest.raises(InvalidStatus):
            connect(url)

        def totals() -> dict[str, Any]:
            files = list(tmp_path.glob("usage.json.*[0-9]"))
            return json.loads(files[0].read_text())["usage"] if len(files) == 1 else {}
        wait_until(lambda: totals().get("globex", {}).get("tunnels") == 1
                   and totals().get("acme", {}).get("tunnels") == 2)
        acme = totals()["acme"]
        assert acme["messages_in"] == acme["messages_out"] == 5
        assert acme["bytes_in"] >= 5 * 1000 and acme["bytes_out"] >= 5 * 1000
        assert totals()["globex"]["messages_in"] == 1
        assert all("api-key" not in k.lower() for k, _ in backend.requests[0])
    finally:
        backend.close()
