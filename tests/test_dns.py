"""Upstream names that follow DNS (fastws/dns.py): a real DNS server on 127.0.0.1 (dnslib's)
whose answers the tests change, and fastws adding and removing the addresses in place, in the
running workers: connections go on, those to an address that left close after drain_timeout."""

from __future__ import annotations

import asyncio
import signal
import ssl
from pathlib import Path
from typing import Any, Iterator

import pytest
import trustme
from dnslib import AAAA, QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSServer
from websockets.sync.client import connect

import fastws
from fastws import balancer, config, dns
from fastws.errors import ConfigError
from support import NamedBackend, closes_of, free_port, http_get, wait_until


class Zone(BaseResolver):
    """A DNS server's answers, changed by the test: name -> addresses (TTL 1 s)."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.ttl = 1
        self.queries = 0
        self.server: Any = None

    def resolve(self, request: Any, handler: Any) -> Any:
        self.queries += 1
        reply = request.reply()
        name = str(request.q.qname).rstrip(".")
        kind = QTYPE[request.q.qtype]
        if name not in self.records:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for ip in self.records[name]:
            if kind == "A" and ":" not in ip:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ip), ttl=self.ttl))
            elif kind == "AAAA" and ":" in ip:
                reply.add_answer(RR(request.q.qname, QTYPE.AAAA, rdata=AAAA(ip), ttl=self.ttl))
        return reply


@pytest.fixture
def zone() -> Iterator[Zone]:
    z = Zone()
    port = free_port()
    z.server = DNSServer(z, port=port, address="127.0.0.1")
    z.server.start_thread()
    z.port = port      # type: ignore[attr-defined]
    yield z
    z.server.stop()


Hosts = tuple[NamedBackend, NamedBackend]


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """Two backends on one port, on 127.0.0.2 and 127.0.0.3: what a name's answers give."""
    b2 = NamedBackend("b2", "127.0.0.2")
    b3 = NamedBackend("b3", "127.0.0.3", b2.port)
    yield b2, b3
    b2.close()
    b3.close()


def resolver(zone: Zone) -> dict[str, Any]:
    return {"addresses": [f"127.0.0.1:{zone.port}"], "min_ttl": "0.2s",   # type: ignore[attr-defined]
            "max_ttl": "1s", "timeout": "1s"}


def test_lookup_through_the_configured_server(zone: Zone) -> None:
    zone.records["app.test"] = ["127.0.0.3", "::1", "127.0.0.2"]
    r = dns.ResolverConfig((("127.0.0.1", zone.port),), 1.0, 0.5, 60)   # type: ignore[attr-defined]
    assert dns.lookup("app.test", r) == (("127.0.0.2", "127.0.0.3", "::1"), 1.0)
    zone.ttl = 3600
    assert dns.lookup("app.test", r)[1] == 60                    # bounded by max_ttl
    with pytest.raises(dns.LookupError_, match="no such name"):
        dns.lookup("nowhere.test", r)


def test_a_name_that_does_not_resolve_fails_the_check(zone: Zone) -> None:
    with pytest.raises(ConfigError, match=r"upstream\.app\.servers\[0\]: cannot resolve: "
                                          "nowhere.test: no such name"):
        config.from_dict({"resolver": resolver(zone),
                          "upstream": [{"name": "app", "servers": [
                              {"address": "nowhere.test:80", "resolve": True}]}],
                          "server": [{"listen": ["127.0.0.1:8080"],
                                      "location": [{"path": "/", "proxy_pass": "app"}]}]})
    with pytest.raises(ConfigError, match="resolve: applies to a host name"):
        config.from_dict({"upstream": [{"name": "app", "servers": [
                              {"address": "127.0.0.1:80", "resolve": True}]}],
                          "server": [{"listen": ["127.0.0.1:8080"],
                                      "location": [{"path": "/", "proxy_pass": "app"}]}]})


def test_consistent_hashing_moves_only_the_keys_of_the_addresses_that_changed(
        zone: Zone) -> None:
    ips = [f"10.0.0.{i}" for i in range(1, 6)]
    zone.records["app.test"] = ips[:4]
    cfg = config.from_dict({"resolver": resolver(zone), "upstream": [
        {"name": "app", "balance": "hash", "hash_key": "$request_uri", "consistent": True,
         "servers": [{"address": "app.test:8000", "resolve": True}]}],
        "server": [{"listen": ["127.0.0.1:8080"],
                    "location": [{"path": "/", "proxy_pass": "app"}]}]})

    def choices(c: config.Config) -> list[str]:
        group = balancer.build_upstreams(c)["app"]
        out = []
        for i in range(1000):
            sel = group.selection(key=f"/k{i}".encode())
            peer = sel.next()
            assert peer is not None
            out.append(peer.name)
            sel.free(peer)
        return out

    before = choices(cfg)
    assert sorted(set(before)) == [f"{ip}:8000" for ip in ips[:4]]
    # one more address: only keys that now go to it moved
    more = choices(config.with_answers(cfg, "app", "app.test", tuple(ips)))
    moved = [k for k in range(1000) if before[k] != more[k]]
    assert moved and all(more[k] == "10.0.0.5:8000" for k in moved)
    # one address fewer: only its keys moved
    fewer = choices(config.with_answers(cfg, "app", "app.test", tuple(ips[1:4])))
    moved = [k for k in range(1000) if before[k] != fewer[k]]
    assert moved == [k for k in range(1000) if before[k] == "10.0.0.1:8000"]


def test_fastws_follows_the_name(zone: Zone, hosts: Hosts,
                                 make_proxy: Any, tmp_path: Path) -> None:
    b2, b3 = hosts
    zone.records["app.test"] = ["127.0.0.2"]
    port = free_port()
    cfg = {"resolver": resolver(zone), "processes": 2,     # each worker is told
           "upstream": [{"name": "app", "drain_timeout": "1s", "servers": [
               {"address": f"app.test:{b2.port}", "resolve": True}]}],
           "server": [{"listen": [f"127.0.0.1:{port}"], "location": [
               {"path": "/", "proxy_pass": "app"}]}]}
    p = make_proxy(cfg, port=port)

    def served_by() -> set[str]:
        return {http_get("127.0.0.1", port, "/x")[1].decode() for _ in range(8)}

    assert served_by() == {"b2"}
    ws = connect(f"ws://127.0.0.1:{port}/chat")      # a tunnel to b2
    ws.send("hi")
    assert ws.recv(timeout=10) == "hi"
    zone.records["app.test"] = ["127.0.0.2", "127.0.0.3"]
    wait_until(lambda: served_by() == {"b2", "b3"})
    assert "app.test now resolves to 127.0.0.2, 127.0.0.3 (was 127.0.0.2)" in p.output()
    ws.send("still")                                   # still relayed
    assert ws.recv(timeout=10) == "still"
    closed = closes_of(ws)
    zone.records["app.test"] = ["127.0.0.3"]
    wait_until(lambda: served_by() == {"b3"})
    # the tunnel to the address that left: closed politely after drain_timeout
    wait_until(lambda: closed == [(1001, "server removed")], timeout=15)
    # a name that stops resolving: the last answer stays
    del zone.records["app.test"]
    wait_until(lambda: "cannot look app.test up again" in p.output())
    assert served_by() == {"b3"}
    assert "Traceback" not in p.output()


def test_a_change_is_made_in_place(zone: Zone, hosts: Hosts,
                                   make_proxy: Any, tmp_path: Path) -> None:
    # No new generation of workers: the same processes go on, a TLS tunnel to an address that
    # stays is untouched, each address keeps its live connection count (max_conns = 1 shows
    # it), and a tunnel to one that leaves closes politely after drain_timeout.
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    cert, key = tmp_path / "leaf.crt", tmp_path / "leaf.key"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    client = ssl.create_default_context()
    ca.configure_trust(client)
    b2, b3 = hosts
    zone.records["app.test"] = ["127.0.0.2"]
    port, tls_port = free_port(), free_port()
    p = make_proxy({
        "resolver": resolver(zone),
        "upstream": [{"name": "app", "drain_timeout": "1s", "servers": [
            {"address": f"app.test:{b2.port}", "resolve": True, "max_conns": 1}]}],
        "server": [{"listen": [f"127.0.0.1:{port}"], "location": [
                       {"path": "/", "proxy_pass": "app"},
                       {"path": "= /status", "status": "json"}]},
                   {"listen": [f"127.0.0.1:{tls_port}"], "server_name": ["localhost"],
                    "tls": {"certificate": str(cert), "key": str(key)},
                    "location": [{"path": "/", "proxy_pass": "app"}]}]}, port=port)
    wait_until(lambda: len(p.workers()) == 1)       # (the master listens before it forks)
    workers = p.workers()

    def served_by() -> set[str]:
        out = set()
        for _ in range(8):
            code, body = http_get("127.0.0.1", port, "/x")
            out.add(body.decode() if code == 200 else str(code))
        return out

    ws = connect(f"wss://localhost:{tls_port}/chat", ssl=client)    # to b2, now full
    ws.send("hi")
    assert ws.recv(timeout=10) == "hi"
    assert served_by() == {"502"}
    zone.records["app.test"] = ["127.0.0.2", "127.0.0.3"]
    wait_until(lambda: f"upstream app: added 127.0.0.3:{b2.port}" in p.output())
    assert p.workers() == workers
    ws.send("still")
    assert ws.recv(timeout=10) == "still"
    assert served_by() == {"b3"}          # b2 still has its one connection
    closed = closes_of(ws)
    zone.records["app.test"] = ["127.0.0.3"]
    wait_until(lambda: f"removed 127.0.0.2:{b2.port}; 1 tunnel(s) to removed servers "
                       "close within 1s" in p.output())
    wait_until(lambda: closed == [(1001, "server removed")], timeout=15)
    assert p.status()["engine"]["closes"]["removed"] == 1
    zone.records["app.test"] = ["127.0.0.2", "127.0.0.3"]
    wait_until(lambda: served_by() == {"b2", "b3"})     # b2 back, with no connection
    assert p.workers() == workers
    assert "Traceback" not in p.output()


def test_a_draining_tunnel_keeps_its_reason_over_a_reload(zone: Zone, hosts: Hosts,
                                                          make_proxy: Any) -> None:
    # its server left; a reload hands it to the new worker, which ends it as the old would have
    b2, b3 = hosts
    zone.records["app.test"] = ["127.0.0.2"]
    port = free_port()
    p = make_proxy({"resolver": resolver(zone),
                    "upstream": [{"name": "app", "drain_timeout": "3s", "servers": [
                        {"address": f"app.test:{b2.port}", "resolve": True}]}],
                    "server": [{"listen": [f"127.0.0.1:{port}"], "location": [
                        {"path": "/", "proxy_pass": "app"}]}]}, port=port)
    ws = connect(f"ws://127.0.0.1:{port}/chat")
    ws.send("hi")
    assert ws.recv(timeout=10) == "hi"
    closed = closes_of(ws)
    zone.records["app.test"] = ["127.0.0.3"]
    wait_until(lambda: "1 tunnel(s) to removed servers close within 3s" in p.output())
    old = set(p.workers())
    p.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: set(p.workers()) and not set(p.workers()) & old)
    wait_until(lambda: closed == [(1001, "server removed")], timeout=15)
    assert "Traceback" not in p.output()


def test_health_checks_follow_the_name(zone: Zone, hosts: Hosts, make_proxy: Any) -> None:
    # a new address is checked from then on; one that left is checked no more
    b2, b3 = hosts
    zone.records["app.test"] = ["127.0.0.2"]
    port = free_port()
    p = make_proxy({
        "resolver": resolver(zone),
        "upstream": [{"name": "app", "health_check": {"interval": "0.1s", "timeout": "0.1s",
                                                      "uri": "/health"},
                      "servers": [{"address": f"app.test:{b2.port}", "resolve": True}]}],
        "server": [{"listen": [f"127.0.0.1:{port}"], "location": [
            {"path": "/", "proxy_pass": "app"},
            {"path": "= /status", "status": "json"}]}]}, port=port)

    def checks(b: NamedBackend) -> int:
        with b.lock:
            return sum(line.startswith("GET /health ") for line, _ in b.heads)

    def checked() -> dict[str, int]:
        return {s["server"]: s["health_check"]["checks"]
                for s in p.status()["upstreams"]["app"]}

    wait_until(lambda: checks(b2) >= 2)
    zone.records["app.test"] = ["127.0.0.2", "127.0.0.3"]
    wait_until(lambda: checks(b3) >= 2)
    assert set(checked()) == {f"127.0.0.2:{b2.port}", f"127.0.0.3:{b2.port}"}
    zone.records["app.test"] = ["127.0.0.3"]
    wait_until(lambda: set(checked()) == {f"127.0.0.3:{b2.port}"})
    left, seen = checks(b2), checks(b3)
    wait_until(lambda: checks(b3) >= seen + 3)
    assert checks(b2) <= left + 1            # (one under way when it left, at most)
    assert "Traceback" not in p.output()


def test_an_embedded_proxy_follows_the_name(zone: Zone, hosts: Hosts) -> None:
    b2, b3 = hosts
    zone.records["app.test"] = ["127.0.0.2"]
    port = free_port()
    cfg = {"resolver": resolver(zone),
           "upstream": [{"name": "app", "servers": [
               {"address": f"app.test:{b2.port}", "resolve": True}]}],
           "server": [{"listen": [f"127.0.0.1:{port}"],
                       "location": [{"path": "/", "proxy_pass": "app"}]}]}

    async def main() -> None:
        async with fastws.Proxy(cfg):
            async def served_by() -> set[str]:
                got = [await asyncio.to_thread(http_get, "127.0.0.1", port, "/x")
                       for _ in range(6)]
                return {body.decode() for _, body in got}

            assert await served_by() == {"b2"}
            zone.records["app.test"] = ["127.0.0.3"]
            for _ in range(500):                     # (bounded: 10 s)
                if await served_by() == {"b3"}:
                    return
                await asyncio.sleep(0.02)
            raise AssertionError("the proxy did not follow the name")

    asyncio.run(main())


def test_nginx_resolver_and_resolve(zone: Zone, tmp_path: Path) -> None:
    zone.records["app.test"] = ["127.0.0.9"]
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
        events {{}}
        http {{
            resolver 127.0.0.1:{zone.port} valid=10s ipv6=off;
            resolver_timeout 3s;
            upstream app {{ server app.test:8000 resolve; }}
            server {{ listen 127.0.0.1:8080; location / {{ proxy_pass http://app; }} }}
        }}""")
    cfg = config.load(str(conf))
    assert cfg.resolver.addresses == (("127.0.0.1", zone.port),)   # type: ignore[attr-defined]
    assert (cfg.resolver.min_ttl, cfg.resolver.max_ttl, cfg.resolver.timeout) == (10, 10, 3)
    assert cfg.resolver.families == ("A",)
    (up,) = cfg.upstreams
    assert up.answers == (("app.test", ("127.0.0.9",)),)
    assert [p.name for p in up.peers] == ["127.0.0.9:8000"]
    # its TLS name and Host stay the name as written
    assert up.peer_host("127.0.0.9:8000", "127.0.0.9:8000") == "app.test"


def test_a_name_dns_cannot_carry_is_one_line(zone: Zone) -> None:
    with pytest.raises(ConfigError, match=r"servers\[0\]: cannot resolve: a\.\.b: EmptyLabel"):
        config.from_dict({"resolver": resolver(zone),
                          "upstream": [{"name": "app", "servers": [
                              {"address": "a..b:80", "resolve": True}]}],
                          "server": [{"listen": ["127.0.0.1:8080"],
                                      "location": [{"path": "/", "proxy_pass": "app"}]}]})


def test_signals_need_no_dns(zone: Zone, make_proxy: Any, tmp_path: Path) -> None:
    # `fastws -s` reads the pid file's name, not the upstreams: it works with DNS gone (a pod
    # whose Service was deleted first, say)
    import subprocess
    import sys
    zone.records["app.test"] = ["127.0.0.2"]
    port = free_port()
    p = make_proxy({
        "resolver": resolver(zone), "pid": str(tmp_path / "fastws.pid"),
        "upstream": [{"name": "app", "servers": [{"address": "app.test:80", "resolve": True}]}],
        "server": [{"listen": [f"127.0.0.1:{port}"],
                    "location": [{"path": "/", "proxy_pass": "app"}]}]}, port=port)
    zone.records.clear()                           # the name is gone
    r = subprocess.run([sys.executable, "-m", "fastws", "-s", "stop", "-c", str(p.path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert p.proc.wait(20) == 0
