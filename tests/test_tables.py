"""The engine's tables (fastws/tables.py), built from a checked configuration: server names in
nginx's matching order, locations sorted for lookup, templates as variable numbers, log files
and formats shared, groups indexed; and the engine loading them."""

from __future__ import annotations

import os
import socket
from typing import Any, Iterator

import pytest

from fastws import _engine, balancer, config, tables, tls, worker
from fastws.variables import NUMBERS
from support import free_port


@pytest.fixture
def built(tmp_path) -> Iterator[Any]:
    socks: list[socket.socket] = []
    made: list[tables.Tables] = []

    def build(cfg: dict[str, Any]) -> tables.Tables:
        c = config.from_dict(cfg, "t.toml")
        socks.extend(worker.open_listeners(c))
        made.append(tables.build(c, socks, balancer.build_upstreams(c), tls.Contexts(c)))
        return made[-1]

    yield build
    for s in socks:
        s.close()
    for t in made:
        for f in t.log_files:
            os.close(f.fd)


def two_servers(port: int, log: str) -> dict[str, Any]:
    return {
        "upstream": [{"name": "app", "servers": ["127.0.0.1:9001", "localhost:9002"],
                      "keepalive": 8, "balance": "hash", "hash_key": "$arg_user"},
                     {"name": "chat", "servers": ["[::1]:9003"]}],
        "access_log": {"path": log, "format": "combined"},
        "server": [
            {"listen": [f"127.0.0.1:{port}"],
             "server_name": ["example.com", "*.example.com", "*.api.example.com", "www.example.*",
                             ".example.org"],
             "location": [
                 {"path": "/", "proxy_pass": "app"},
                 {"path": "/ws/chat", "proxy_pass": "chat",
                  "set_headers": {"X-User": "$cookie_user at $remote_addr", "X-Real-IP": ""}},
                 {"path": "/ws", "proxy_pass": "app", "relay": "copy"},
                 {"path": "= /status", "status": "json", "access_log": False},
                 {"path": "= /health", "return": [200, "ok"]},
                 {"path": "= /a", "return": 204},
             ]},
            {"listen": [f"127.0.0.1:{port}"], "server_name": ["other.test"], "default": True,
             "location": [{"path": "/", "proxy_pass": "http://127.0.0.1:9004/base/"}]},
        ],
    }


def test_server_names_in_nginx_matching_order(built, tmp_path):
    t = built(two_servers(free_port(), str(tmp_path / "a.log")))
    (lis,) = t.listeners
    assert lis.exact == [("example.com", 0), ("example.org", 0), ("other.test", 1)]
    # "*.example.com" is kept as ".example.com"; the longest suffix is tried first
    assert lis.head == [(".api.example.com", 0), (".example.com", 0), (".example.org", 0)]
    assert lis.tail == [("www.example.", 0)]
    assert lis.default == 1                       # `default = true`, not the first listed
    assert not lis.tls and lis.addr_text == "127.0.0.1"


def test_locations_sorted_for_lookup(built, tmp_path):
    t = built(two_servers(free_port(), str(tmp_path / "a.log")))
    first = t.servers[0]
    paths = [t.locations[i].path for i in first.exact]
    assert paths == ["/a", "/health", "/status"]  # exact ones sorted, for a binary search
    assert [t.locations[i].path for i in first.prefix] == ["/ws/chat", "/ws", "/"]
    kinds = {t.locations[i].path: t.locations[i].kind for i in first.exact + first.prefix}
    assert kinds == {"/a": tables.LOC_RETURN, "/health": tables.LOC_RETURN,
                     "/status": tables.LOC_STATUS, "/ws/chat": tables.LOC_PROXY,
                     "/ws": tables.LOC_PROXY, "/": tables.LOC_PROXY}
    by_path = {t.locations[i].path: t.locations[i] for i in first.exact + first.prefix}
    assert by_path["/health"].return_status == 200 and by_path["/health"].return_body == "ok"
    assert by_path["/ws"].relay == tables.RELAYS["copy"]
    second = t.servers[1]
    (loc,) = [t.locations[i] for i in second.prefix]
    assert loc.proxy_uri == "/base/" and t.groups[loc.group].name == "http://127.0.0.1:9004"


def test_templates_become_variable_numbers(built, tmp_path):
    t = built(two_servers(free_port(), str(tmp_path / "a.log")))
    chat = next(loc for loc in t.locations if loc.path == "/ws/chat")
    ops = dict(chat.ops)
    assert ops["X-User"] == [(NUMBERS["cookie_"], "user"), (-1, " at "),
                             (NUMBERS["remote_addr"], "")]
    assert ops["X-Real-IP"] is None               # "" removes the header
    groups = {g.name: g for g in t.groups}
    assert t.groups[chat.group] is groups["chat"]
    app = groups["app"]
    assert app.hash_key == [(NUMBERS["arg_"], "user")]
    assert app.keepalive == 8
    hosts = [p.host for p in app.group.peers]
    assert hosts[:1] == ["127.0.0.1"] and hosts[-1] == "localhost"
    assert [p.host for p in t.groups[chat.group].group.peers] == ["::1"]


def test_log_files_and_formats_are_shared(built, tmp_path):
    t = built(two_servers(free_port(), str(tmp_path / "a.log")))
    assert [f.path for f in t.log_files] == [str(tmp_path / "a.log")]
    assert len(t.log_formats) == 1 and len(t.access_logs) == 1
    status = next(loc for loc in t.locations if loc.path == "/status")
    assert status.access_log == -1                # access_log = false
    others = {loc.access_log for loc in t.locations if loc.path != "/status"}
    assert others == {0}
    # the first server's locations do not share one log: a request matching none is not logged
    assert t.servers[0].access_log == -1 and t.servers[1].access_log == 0


def test_the_engine_loads_the_tables(built, tmp_path):
    t = built(two_servers(free_port(), str(tmp_path / "a.log")))
    engine = _engine.Engine(None)
    try:
        engine.load(t)
        assert engine.stats()["conns"] == 0
    finally:
        engine.stop()
