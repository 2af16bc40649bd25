"""The edge's defences end to end: the PROXY protocol read and sent, and per-client limits."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from support import (NamedBackend, RawBackend, free_port, raw_exchange, read_all, read_head,
                     upgrade_request, wait_until, ws_accept, ws_frame, ws_read_frame)
from test_tls import client_context, write_cert

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def pp_v1(src: str, dst: str, sport: int, dport: int) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def pp_v2(src: str, dst: str, sport: int, dport: int, tlv: bytes = b"") -> bytes:
    if ":" in src:
        addrs = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
        fam = 0x21
    else:
        addrs = socket.inet_aton(src) + socket.inet_aton(dst)
        fam = 0x11
    body = addrs + struct.pack("!HH", sport, dport) + tlv
    return V2_SIG + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


def pp_config(port: int, backend: str, **server: Any) -> dict[str, Any]:
    """A server on `port` (IPv4 and IPv6) that reads the PROXY protocol and believes it from
    loopback, and a plain one on port + 1 with the status page (make_proxy waits for that)."""
    block = {"listen": [f"127.0.0.1:{port}", f"[::1]:{port}"], "proxy_protocol": True,
             "real_ip": {"from": ["127.0.0.0/8", "::1"], "header": "proxy_protocol"},
             "client_header_timeout": "1s",
             "location": [{"path": "/", "proxy_pass": "b", "frames": False,   # raw bytes
                           "set_headers": {"X-PP": "$proxy_protocol_addr:$proxy_protocol_port "
                                                   "$proxy_protocol_server_addr:"
                                                   "$proxy_protocol_server_port"}}]}
    block.update(server)
    status = {"listen": [f"127.0.0.1:{free_port()}"],
              "location": [{"path": "= /status", "status": "json"}]}
    return {"upstream": [{"name": "b", "servers": [backend]}], "server": [block, status]}


def pp_proxy(make_proxy: Any, config: dict[str, Any], port: int) -> Any:
    status = int(config["server"][1]["listen"][0].rsplit(":", 1)[1])
    return make_proxy(config, port=status)


def headers_of(backend: NamedBackend) -> dict[str, str]:
    return {k.lower(): v for k, v in backend.take()[-1][1]}


GET = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("make", [pp_v1, pp_v2])
def test_a_proxy_protocol_header_names_the_client(make_proxy, host, make):
    backend = NamedBackend("b")
    port = free_port()
    pp_proxy(make_proxy, pp_config(port, backend.address), port)
    for src, dst in (("203.0.113.7", "198.51.100.1"), ("2001:db8::7", "2001:db8::1")):
        raw = raw_exchange(host, port, make(src, dst, 40000, 443) + GET)
        assert raw.startswith(b"HTTP/1.1 200"), raw
        head = headers_of(backend)
        assert head["x-real-ip"] == src and head["x-forwarded-for"] == src
        assert head["x-pp"] == f"{src}:40000 {dst}:443"
    backend.close()


def test_an_untrusted_sender_is_not_the_client_but_its_header_is_read(make_proxy):
    backend = NamedBackend("b")
    port = free_port()
    config = pp_config(port, backend.address)
    config["server"][0]["real_ip"]["from"] = ["10.0.0.0/8"]
    pp_proxy(make_proxy, config, port)
    assert raw_exchange("127.0.0.1", port, pp_v1("203.0.113.7", "10.0.0.1", 1, 2) + GET) \
        .startswith(b"HTTP/1.1 200")
    head = headers_of(backend)
    assert head["x-real-ip"] == "127.0.0.1"            # nginx's rule: only trusted senders
    assert head["x-pp"] == "203.0.113.7:1 10.0.0.1:2"  # $proxy_protocol_addr all the same
    backend.close()


def test_local_unknown_and_tlvs_are_accepted(make_proxy):
    backend = NamedBackend("b")
    port = free_port()
    pp_proxy(make_proxy, pp_config(port, backend.address), port)
    local = V2_SIG + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    tlv = bytes([0x04]) + struct.pack("!H", 3) + b"abc"          # PP2_TYPE_NOOP
    for header, client in ((local, "127.0.0.1"), (b"PROXY UNKNOWN\r\n", "127.0.0.1"),
                           (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", "127.0.0.1"),
                           (pp_v2("192.0.2.9", "192.0.2.1", 5, 6, tlv), "192.0.2.9")):
        assert raw_exchange("127.0.0.1", port, header + GET).startswith(b"HTTP/1.1 200")
        assert headers_of(backend)["x-real-ip"] == client
    backend.close()


def test_a_header_in_pieces_is_read_whole(make_proxy):
    backend = NamedBackend("b")
    port = free_port()
    proxy = pp_proxy(make_proxy, pp_config(port, backend.address), port)
    data = pp_v2("192.0.2.9", "192.0.2.1", 5, 6) + GET
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(data[:3])                 # inside the signature: accepted, found short
        data = data[3:]
        wait_until(lambda: proxy.status()["engine"]["states"]["proxy"] == 1)
        for cut in (11, 6):                 # the length, then part of the addresses
            s.sendall(data[:cut])
            data = data[cut:]
        s.sendall(data)
        assert read_all(s).startswith(b"HTTP/1.1 200")
    assert headers_of(backend)["x-real-ip"] == "192.0.2.9"
    backend.close()


@pytest.mark.parametrize("bad", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",               # no header at all
    b"PROXY TCP4 203.0.113.7 10.0.0.1 01 2\r\n",        # a leading zero
    b"PROXY TCP4 ::1 ::2 1 2\r\n",                       # the wrong family
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",             # a field too many
    b"PROXY " + b"1" * 120 + b"\r\n",                   # longer than 107 bytes
    V2_SIG + bytes([0x11, 0x11]) + b"\x00\x0c" + b"\x00" * 12,     # version 1 in a v2 header
    V2_SIG + bytes([0x21, 0x11]) + b"\x00\x04" + b"\x00" * 4,      # addresses cut short
])
def test_a_bad_header_closes_the_connection_and_is_counted(make_proxy, bad):
    backend = NamedBackend("b")
    port = free_port()
    proxy = pp_proxy(make_proxy, pp_config(port, backend.address), port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(bad)
        assert read_all(s) == b""
    wait_until(lambda: proxy.status()["engine"].get("proxy_protocol_errors") == 1)
    assert backend.take() == []
    backend.close()


def test_a_client_that_sends_no_header_is_cut_at_client_header_timeout(make_proxy):
    backend = NamedBackend("b")
    port = free_port()
    proxy = pp_proxy(make_proxy, pp_config(port, backend.address), port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"PROXY TCP4 ")
        assert read_all(s) == b""           # closed after 1 s, not the socket timeout's 10
    wait_until(lambda: proxy.status()["engine"].get("proxy_protocol_errors") == 1)
    backend.close()


def test_the_header_comes_before_tls(make_proxy, tmp_path: Path):
    import trustme
    ca = trustme.CA()
    backend = NamedBackend("b")
    port = free_port()
    config = pp_config(port, backend.address, tls=write_cert(ca, tmp_path, "leaf", "localhost"))
    pp_proxy(make_proxy, config, port)
    ctx = client_context(ca)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(pp_v1("203.0.113.7", "198.51.100.1", 1234, 443))
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(GET)
            assert read_all(s).startswith(b"HTTP/1.1 200")
    head = headers_of(backend)
    assert head["x-real-ip"] == "203.0.113.7" and head["x-forwarded-proto"] == "https"
    backend.close()


def _pp_recorder(conn: socket.socket, backend: RawBackend) -> None:
    # what an upstream behind send_proxy_protocol gets: the header, then the request
    data = b""
    while data.count(b"\r\n\r\n") < (2 if data.startswith(V2_SIG) else 1):   # the head's end
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
    backend.received.append(data)
    if b"upgrade: websocket" in data.lower():
        key = data.split(b"Sec-WebSocket-Key: ", 1)[1].split(b"\r\n", 1)[0]
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + ws_accept(key) +
                     b"\r\n\r\n")
        while chunk := conn.recv(4096):
            conn.sendall(chunk)
        return
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_group_that_asks_gets_the_header_first(make_proxy, version, host):
    backend = RawBackend(_pp_recorder)
    port = free_port()
    config = {"upstream": [{"name": "b", "servers": [backend.address],
                            "send_proxy_protocol": version}],
              "server": [{"listen": [f"127.0.0.1:{port}", f"[::1]:{port}"],
                          "location": [{"path": "/", "proxy_pass": "b", "websocket": False}]}]}
    make_proxy(config, port=port)
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(GET)
        assert read_all(s).endswith(b"ok")
        client = s.getsockname()
    data = backend.received[-1]
    length, src, dst = _engine_parse(data)
    assert src == (client[0], client[1]) and dst == (host, port)
    assert data[length:].startswith(b"GET / HTTP/1.1\r\n")
    backend.close()


def test_the_header_carries_the_real_client_through_a_tunnel(make_proxy):
    # a PROXY header read, the client named by it, and the same client sent on, in v2
    backend = RawBackend(_pp_recorder)
    port = free_port()
    config = pp_config(port, backend.address)
    config["upstream"][0]["send_proxy_protocol"] = "v2"
    config["server"][0]["location"][0]["websocket"] = True
    config["server"][0]["location"][0].pop("set_headers")
    pp_proxy(make_proxy, config, port)
    with socket.create_connection(("::1", port), timeout=10) as s:
        s.sendall(pp_v1("2001:db8::7", "2001:db8::1", 40000, 443) + upgrade_request("/"))
        head, rest = read_head(s)
        assert head.startswith(b"HTTP/1.1 101"), head
        s.sendall(b"ping")
        got = rest
        while len(got) < 4:
            got += s.recv(100)
        assert got == b"ping"
    length, src, dst = _engine_parse(backend.received[-1])
    assert src == ("2001:db8::7", 40000) and dst == ("2001:db8::1", 443)
    backend.close()


def _engine_parse(data: bytes) -> tuple[int, Any, Any]:
    from fastws import _engine
    parsed = _engine.proxy_header_parse(data)
    assert parsed is not None
    return parsed


# --- limits ----------------------------------------------------------------------------------

def limits_config(port: int, backend: str, **location: Any) -> dict[str, Any]:
    """Two workers (the zones are shared), IPv4 and IPv6, a status page on /status."""
    loc = {"path": "/", "proxy_pass": "b"}
    loc.update(location)
    return {"processes": 2,
            "limit_conn_zone": [{"name": "addr", "key": "$binary_remote_addr", "size": "64k"}],
            "limit_req_zone": [{"name": "slow", "key": "$remote_addr", "size": "64k",
                                "rate": "1r/m"},
                               {"name": "fast", "key": "$remote_addr", "size": "64k",
                                "rate": "5r/s"}],
            "upstream": [{"name": "b", "servers": [backend]}],
            "server": [{"listen": [f"127.0.0.1:{port}", f"[::1]:{port}"],
                        "location": [loc, {"path": "= /status", "status": "json"},
                                     {"path": "= /metrics", "status": "prometheus"}]}]}


def handshake(host: str, port: int, source: str | None = None) -> tuple[int, socket.socket]:
    s = socket.create_connection((host, port), timeout=10,
                                 source_address=(source, 0) if source else None)
    s.sendall(upgrade_request("/"))
    head, _ = read_head(s)
    return int(head.split(b" ")[1]), s


def test_limit_conn_counts_tunnels_across_workers(make_proxy):
    # one address may hold two tunnels, whichever worker took them; a third is refused, other
    # addresses are not, and a tunnel that closes gives its place back
    backend = NamedBackend("b")
    port = free_port()
    proxy = make_proxy(limits_config(port, backend.address,
                                     limit_conn={"zone": "addr", "max": 2}), port=port)
    for host, other in (("127.0.0.1", "127.0.0.2"), ("::1", None)):
        held = [handshake(host, port, host if ":" not in host else None) for _ in range(2)]
        assert [code for code, _ in held] == [101, 101]
        code, s = handshake(host, port, host if ":" not in host else None)
        assert code == 503
        s.close()
        if other is not None:
            code, s = handshake(host, port, other)
            assert code == 101
            s.close()
        held[0][1].close()
        # the count comes back when the tunnel's close is seen
        wait_until(lambda: proxy.status()["tunnels"]["active"] == 1)
        code, s = handshake(host, port, host if ":" not in host else None)
        assert code == 101
        for _, t in held[1:]:
            t.close()
        s.close()
        wait_until(lambda: proxy.status()["limits"]["addr"]["entries"] == 0)
    figures = proxy.status()["limits"]["addr"]
    assert figures["rejected"] == 2 and figures["kind"] == "conn"
    from prometheus_client.parser import text_string_to_metric_families
    code, text = proxy.get("/metrics")
    samples = {(s.name, s.labels.get("zone"), s.labels.get("result")): s.value
               for family in text_string_to_metric_families(text.decode())
               for s in family.samples}
    assert samples[("fastws_limit_requests_total", "addr", "rejected")] == 2
    assert samples[("fastws_limit_entries", "addr", None)] == 0
    backend.close()


def test_limit_req_refuses_over_the_burst_with_the_configured_status(make_proxy):
    backend = NamedBackend("b")
    port = free_port()
    proxy = make_proxy(limits_config(port, backend.address, limit_req_status=429,
                                     limit_req={"zone": "slow", "burst": 2, "nodelay": True}),
                       port=port)

    def get(source: str) -> int:
        with socket.create_connection(("127.0.0.1", port), timeout=10,
                                      source_address=(source, 0)) as s:
            s.sendall(GET)
            return int(read_all(s).split(b" ")[1])
    # a storm from one address: the first and the burst pass, the rest are refused at once,
    # and an address beside it is served all the while
    assert [get("127.0.0.5") for _ in range(6)] == [200, 200, 200, 429, 429, 429]
    assert get("127.0.0.6") == 200
    for _ in range(3):
        code, s = handshake("127.0.0.1", port, "127.0.0.5")   # handshakes count too
        s.close()
        assert code == 429
    figures = proxy.status()["limits"]["slow"]
    assert (figures["passed"], figures["rejected"]) == (4, 6)
    assert len(backend.take()) == 4
    backend.close()


def test_limit_req_delays_the_excess_instead_of_refusing_it(make_proxy):
    # without nodelay, requests over the rate wait their turn (nginx's default) and are served:
    # at 5 r/s each one after the first waits about 200 ms, so each is over the rate however
    # slowly the test runs (unless it pauses longer than that between two requests)
    backend = NamedBackend("b")
    port = free_port()
    proxy = make_proxy(limits_config(port, backend.address,
                                     limit_req={"zone": "fast", "burst": 10}), port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for i in range(4):
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body = read_head(s)
            assert head.startswith(b"HTTP/1.1 200"), head
            while len(body) < 1:
                body += s.recv(10)
    figures = proxy.status()["limits"]["fast"]
    assert figures["delayed"] == 3 and figures["rejected"] == 0
    backend.close()


def test_a_handed_over_tunnel_keeps_its_limit_conn_count(make_proxy, tmp_path: Path):
    import os
    import signal
    backend = NamedBackend("b")
    port = free_port()
    config = limits_config(port, backend.address, limit_conn={"zone": "addr", "max": 1})
    proxy = make_proxy(config, port=port)
    code, held = handshake("127.0.0.1", port, "127.0.0.7")
    assert code == 101
    config["server"][0]["location"][0]["read_timeout"] = "61s"      # a reload that changes
    proxy.rewrite(config)
    os.kill(proxy.pid, signal.SIGHUP)
    wait_until(lambda: {w["generation"] for w in proxy.status()["workers"]} == {2})
    held.sendall(ws_frame(b"still here"))
    assert ws_read_frame(held)[:2] == (1, b"still here")
    code, s = handshake("127.0.0.1", port, "127.0.0.7")
    s.close()
    assert code == 503                       # the tunnel still counts, in the new workers
    held.close()
    wait_until(lambda: proxy.status()["limits"]["addr"]["entries"] == 0)
    code, s = handshake("127.0.0.1", port, "127.0.0.7")
    s.close()
    assert code == 101
    backend.close()
