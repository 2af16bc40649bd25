"""Active health checks (fastws/health.py): servers that fail them are chosen no more and come
back after passing them; plain GETs and WebSocket handshakes; what the status pages show;
configuration mistakes."""

from __future__ import annotations

import json
import socket
from typing import Any, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastws import config
from fastws.errors import ConfigError
from support import ThreadedServer, free_port, http_get, read_head, wait_until, ws_accept


class SwitchBackend(ThreadedServer):
    """An HTTP server answering /health with `health_status` (200 until told otherwise), any
    other request with 200 and its name, and a WebSocket handshake with `upgrade_status`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.health_status = 200
        self.upgrade_status = 101
        self.checks = 0
        super().__init__()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            raw, _ = read_head(conn)
            if not raw.endswith(b"\r\n\r\n"):
                return
            head = raw[:-4].decode("latin-1")
            fields = {k.strip().lower(): v.strip() for k, v in
                      (line.split(":", 1) for line in head.split("\r\n")[1:])}
            target = head.split(" ")[1]
            if fields.get("user-agent") == "fastws-health-check":
                self.checks += 1
            if fields.get("upgrade", "").lower() == "websocket" and self.upgrade_status == 101:
                accept = ws_accept(fields["sec-websocket-key"].encode())
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept
                             + b"\r\n\r\n")
                conn.recv(100)               # the check's close frame
                return
            status = self.health_status if target == "/health" else 200
            body = self.name.encode()
            conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)


@pytest.fixture
def pair() -> Iterator[list[SwitchBackend]]:
    made = [SwitchBackend("one"), SwitchBackend("two")]
    yield made
    for b in made:
        b.close()


def checked_config(port: int, servers: list[str], **check: Any) -> dict[str, Any]:
    hc: dict[str, Any] = {"interval": "0.1s", "timeout": "0.1s", "fails": 2, "passes": 2,
                          "uri": "/health"}
    hc.update(check)
    return {"upstream": [{"name": "app", "servers": servers, "health_check": hc}],
            "server": [{"listen": [f"127.0.0.1:{port}"],
                        "location": [{"path": "/", "proxy_pass": "app"},
                                     {"path": "= /status", "status": "json"},
                                     {"path": "= /metrics", "status": "prometheus"}]}]}


def names(port: int, n: int = 12) -> set[str]:
    out = set()
    for _ in range(n):
        code, body = http_get("127.0.0.1", port, "/x")
        assert code == 200
        out.add(body.decode())
    return out


def server_status(port: int) -> dict[str, dict[str, Any]]:
    code, body = http_get("127.0.0.1", port, "/status")
    return {s["server"]: s for s in json.loads(body)["upstreams"]["app"]}


def test_a_failing_server_is_left_out_until_it_passes_again(make_proxy: Any,
                                                           pair: list[SwitchBackend]) -> None:
    port = free_port()
    make_proxy(checked_config(port, [b.address for b in pair]), port=port)
    wait_until(lambda: all(b.checks >= 2 for b in pair))
    assert names(port) == {"one", "two"}
    pair[0].health_status = 503
    wait_until(lambda: server_status(port)[pair[0].address]["state"] == "unhealthy")
    assert names(port) == {"two"}
    s = server_status(port)[pair[0].address]
    assert s["health_check"]["healthy"] is False and s["health_check"]["last_status"] == 503
    assert s["health_check"]["last_error"] == "the answer's status is 503"
    code, text = http_get("127.0.0.1", port, "/metrics")
    samples = {(f.name, smp.labels["server"]): smp.value
               for f in text_string_to_metric_families(text.decode()) for smp in f.samples
               if f.name.startswith("fastws_upstream_health")}
    assert samples[("fastws_upstream_healthy", pair[0].address)] == 0
    assert samples[("fastws_upstream_healthy", pair[1].address)] == 1
    pair[0].health_status = 200
    wait_until(lambda: server_status(port)[pair[0].address]["state"] == "up")
    assert names(port) == {"one", "two"}


def test_a_server_that_refuses_connections_is_unhealthy(make_proxy: Any,
                                                       pair: list[SwitchBackend]) -> None:
    port = free_port()
    gone = f"127.0.0.1:{free_port()}"           # nothing listens there
    p = make_proxy(checked_config(port, [pair[0].address, gone]), port=port)
    wait_until(lambda: server_status(port)[gone]["state"] == "unhealthy")
    assert server_status(port)[gone]["health_check"]["last_error"] == "Connection refused"
    # no client ever waited for it: every request went to the healthy one
    assert names(port, 20) == {"one"}
    assert "upstream app server " + gone + " is unhealthy: Connection refused" in p.output()


def test_a_websocket_check_wants_a_real_handshake(make_proxy: Any,
                                                  pair: list[SwitchBackend]) -> None:
    port = free_port()
    make_proxy(checked_config(port, [b.address for b in pair], websocket=True, uri="/ws"),
               port=port)
    pair[1].upgrade_status = 200                 # answers the upgrade with a page
    wait_until(lambda: server_status(port)[pair[1].address]["state"] == "unhealthy")
    st = server_status(port)
    assert st[pair[0].address]["state"] == "up"
    assert st[pair[1].address]["health_check"]["last_error"] == "the handshake was answered 200"


def test_a_reload_keeps_what_the_checks_found(make_proxy: Any, pair: list[SwitchBackend],
                                              tmp_path: Any) -> None:
    # the new generation starts from the old one's verdicts, not from "all healthy" (with this
    # interval its own checks would need a minute to find the server failing)
    import signal
    from support import to_toml
    port = free_port()
    p = make_proxy(checked_config(port, [b.address for b in pair]), port=port)
    pair[0].health_status = 503
    wait_until(lambda: server_status(port)[pair[0].address]["state"] == "unhealthy")
    old = set(p.workers())
    p.path.write_text(to_toml(checked_config(port, [b.address for b in pair],
                                             interval="30s", timeout="1s")))
    p.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: set(p.workers()) and not set(p.workers()) & old)
    assert server_status(port)[pair[0].address]["state"] == "unhealthy"
    assert names(port) == {"two"}


@pytest.mark.parametrize("check, problem", [
    ({"interval": "0s"}, "interval: must be greater than zero"),
    ({"interval": "1s", "timeout": "2s"}, "timeout: must not be longer than the interval"),
    ({"fails": 0}, "fails: must be at least 1"),
    ({"uri": "health"}, "is not a request target"),
    ({"expect_status": "6xx"}, "expected a status"),
    ({"expect_status": ["200-199"]}, "is not within 100-599"),
    ({"websocket": True, "expect_status": 200}, "a WebSocket check expects 101"),
    ({"nope": 1}, "health_check.nope: unknown key"),
])
def test_health_check_mistakes(check: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        config.from_dict({"upstream": [{"name": "b", "servers": ["127.0.0.1:9"],
                                        "health_check": check}],
                          "server": [{"listen": ["127.0.0.1:8080"],
                                      "location": [{"path": "/", "proxy_pass": "b"}]}]})


def test_expected_statuses() -> None:
    cfg = config.from_dict({"upstream": [{"name": "b", "servers": ["127.0.0.1:9"],
                                          "health_check": {"expect_status": [204, "3xx",
                                                                             "400-404"]}}],
                            "server": [{"listen": ["127.0.0.1:8080"],
                                        "location": [{"path": "/", "proxy_pass": "b"}]}]})
    hc = cfg.upstreams[0].health_check
    assert hc is not None
    assert [s for s in (200, 204, 301, 399, 400, 404, 405) if hc.expects(s)] == [
        204, 301, 399, 400, 404]
