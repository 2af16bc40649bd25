"""The same client or key reaches the same server through fastws's balancer as through nginx.

A real nginx (Debian's package) runs on loopback with one upstream block per method; its backends
are `return 200` servers in the same nginx, plus a port that refuses connections (max_fails=0, so
nginx's state does not drift between requests) to exercise failover and rehashing.  Requests come
from many 127.a.b.c source addresses (ip_hash uses the first three octets) or with many
request URIs; `$upstream_addr` names every server nginx tried, in order.  The same upstream blocks
are then built with fastws.balancer and the same requests replayed.

What nginx did is also kept in tests/data/nginx_upstreams.json, replayed on machines without
nginx.  Set FASTWS_RECORD_VECTORS=1 to rewrite that file from a live run.
"""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import shutil
import socket
import subprocess
import time
from typing import Any

import pytest

from balancer_support import DATA, load_vectors, replay, upstream_from_spec

VECTORS = "nginx_upstreams.json"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


# -- the upstream blocks, with symbolic backends ---------------------------------------------------
# "B0".."B4": live backends on 127.0.0.1; "R": a refusing port; "U": a unix socket backend;
# "L3": backend B3 written as localhost:PORT (the ring hashes the text as written).

BLOCKS: list[dict[str, Any]] = [
    {"name": "iphash", "balance": "ip_hash", "servers": [
        {"b": "B0"}, {"b": "B1", "weight": 2}, {"b": "B2", "down": True}, {"b": "B3"},
        {"b": "B4", "weight": 3}]},
    {"name": "iphash_fail", "balance": "ip_hash", "servers": [
        {"b": "B0"}, {"b": "R", "max_fails": 0}, {"b": "B1"}, {"b": "B2", "weight": 2}]},
    {"name": "hash", "balance": "hash", "hash_key": "$request_uri", "servers": [
        {"b": "B0"}, {"b": "B1", "weight": 2}, {"b": "B2", "down": True}, {"b": "B3"},
        {"b": "R", "max_fails": 0}]},
    {"name": "chash", "balance": "hash", "hash_key": "$request_uri", "consistent": True,
     "servers": [
        {"b": "B0"}, {"b": "B1", "weight": 2}, {"b": "U"}, {"b": "B2", "down": True},
        {"b": "R", "max_fails": 0}, {"b": "L3"}]},
    {"name": "hashkey", "balance": "hash", "hash_key": "$http_x_user-$arg_id$cookie_sid",
     "consistent": True, "servers": [{"b": "B0"}, {"b": "B1"}, {"b": "B2"}, {"b": "B3"}]},
    {"name": "rr", "balance": "round_robin", "servers": [
        {"b": "B0", "weight": 5}, {"b": "B1"}, {"b": "B2"}]},
    {"name": "rrfail", "balance": "round_robin", "servers": [
        {"b": "R", "weight": 2, "max_fails": 0}, {"b": "B0"}, {"b": "B1", "weight": 3}]},
    {"name": "rrbackup", "balance": "round_robin", "servers": [
        {"b": "R", "max_fails": 0}, {"b": "B3", "down": True}, {"b": "B4", "backup": True}]},
    # Stateful: the refusing server is marked down at its first failure (max_fails=1) for a
    # minute, longer than the run, so later requests must skip it without trying it.
    {"name": "rrmark", "balance": "round_robin", "servers": [
        {"b": "R", "weight": 2, "fail_timeout": 60}, {"b": "B0"}, {"b": "B1", "weight": 3}]},
    {"name": "iphash_mark", "balance": "ip_hash", "servers": [
        {"b": "B0"}, {"b": "R", "fail_timeout": 60}, {"b": "B1"}, {"b": "B2", "weight": 2}]},
    {"name": "chash_mark", "balance": "hash", "hash_key": "$request_uri", "consistent": True,
     "servers": [{"b": "B0"}, {"b": "R", "fail_timeout": 60}, {"b": "B1"}, {"b": "B2"}]},
    {"name": "leastconn", "balance": "least_conn", "servers": [
        {"b": "B0", "weight": 3}, {"b": "B1"}, {"b": "B2", "weight": 2}]},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client_addresses(n: int) -> list[str]:
    # Vary the second and third octets (ip_hash ignores the fourth), and the fourth a little.
    return [f"127.{1 + i // 200}.{i % 200}.{1 + (i * 7) % 250}" for i in range(n)]


def _requests(block: dict[str, Any]) -> list[dict[str, Any]]:
    name = block["name"]
    if name == "iphash_mark":
        return [{"remote_addr": a, "request_uri": f"/{name}/"} for a in _client_addresses(200)]
    if name.startswith("iphash"):
        return [{"remote_addr": a, "request_uri": f"/{name}/"} for a in _client_addresses(1000)]
    if name == "chash_mark":
        return [{"request_uri": f"/{name}/item/{i}"} for i in range(200)]
    if name in ("hash", "chash"):
        return [{"request_uri": f"/{name}/item/{i}?v={i * 31 % 97}"} for i in range(1000)]
    if name == "hashkey":
        out = []
        for i in range(300):
            headers = {"X-User": f"user{i % 37}"}
            if i % 3:
                headers["Cookie"] = f"a=1; sid=s{i % 11}; b=2"
            out.append({"request_uri": f"/{name}/?id={i % 23}&x={i}", "headers": headers})
        return out
    return [{"request_uri": f"/{name}/"} for _ in range(60)]


def _nginx_config(tmp: pathlib.Path, front: int, ports: dict[str, int], refusing: int,
                  unix_path: str, ipv6: bool) -> tuple[str, dict[str, str]]:
    """The nginx.conf text, and a map from symbolic backend to the server text written in it."""
    text_of = {b: f"127.0.0.1:{p}" for b, p in ports.items()}
    text_of["R"] = f"127.0.0.1:{refusing}"
    text_of["U"] = f"unix:{unix_path}"
    text_of["L3"] = f"localhost:{ports['B3']}"
    upstreams = []
    for block in BLOCKS:
        lines = []
        if block["balance"] == "ip_hash":
            lines.append("ip_hash;")
        elif block["balance"] == "least_conn":
            lines.append("least_conn;")
        elif block["balance"] == "hash":
            lines.append(f"hash {block['hash_key']}{' consistent' if block.get('consistent') else ''};")
        for s in block["servers"]:
            params = [f"weight={s.get('weight', 1)}", f"max_fails={s.get('max_fails', 1)}",
                      f"fail_timeout={s.get('fail_timeout', 10)}s"]
            if s.get("down"):
                params.append("down")
            if s.get("backup"):
                params.append("backup")
            lines.append(f"server {text_of[s['b']]} {' '.join(params)};")
        upstreams.append(f"upstream {block['name']} {{\n    " + "\n    ".join(lines) + "\n}")
    locations = "\n".join(
        f"        location /{b['name']}/ {{ proxy_pass http://{b['name']}; }}" for b in BLOCKS)
    backends = "\n".join(
        f"    server {{ listen 127.0.0.1:{p}; return 200 \"{b}\"; }}" for b, p in ports.items())
    listen6 = f"        listen [::1]:{front};\n" if ipv6 else ""
    conf = f"""
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log crit;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    proxy_connect_timeout 5s;
    {chr(10).join(upstreams)}
    server {{
        listen 127.0.0.1:{front};
{listen6}        add_header X-Upstream-Addr $upstream_addr always;
{locations}
    }}
{backends}
    server {{ listen unix:{unix_path}; return 200 "U"; }}
}}
"""
    return conf, text_of


def _get(conn: http.client.HTTPConnection, case: dict[str, Any]) -> list[str]:
    conn.request("GET", case["request_uri"], headers=case.get("headers", {}))
    resp = conn.getresponse()
    resp.read()
    addr = resp.getheader("X-Upstream-Addr") or ""
    assert resp.status in (200, 502), resp.status
    return [a.strip() for a in addr.split(",") if a.strip()]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _start_nginx(tmp: pathlib.Path, refusing: int, ipv6: bool
                 ) -> tuple[subprocess.Popen[bytes] | None, int, dict[str, str], str]:
    ports = {f"B{i}": _free_port() for i in range(5)}
    front = _free_port()
    sock = tmp / "u.sock"
    if sock.exists():
        sock.unlink()
    # A relative socket path (nginx runs in tmp) keeps machine paths out of the vectors.
    conf, text_of = _nginx_config(tmp, front, ports, refusing, "u.sock", ipv6)
    (tmp / "nginx.conf").write_text(conf)
    proc = subprocess.Popen([NGINX or "nginx", "-p", str(tmp), "-e", str(tmp / "error.log"),
                             "-c", str(tmp / "nginx.conf")], cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            return None, 0, {}, proc.stderr.read().decode().strip() if proc.stderr else ""
        try:
            socket.create_connection(("127.0.0.1", front), timeout=1).close()
            return proc, front, text_of, ""
        except OSError:
            if time.monotonic() > deadline:
                _stop(proc)
                return None, 0, {}, "timed out"
            time.sleep(0.05)     # a poll: the loop waits for the port


@pytest.fixture(scope="module")
def nginx_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run nginx once and record what it did for every block and request."""
    if NGINX is None:
        pytest.skip("nginx is not installed")
    tmp = tmp_path_factory.mktemp("nginx")
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / sub).mkdir()
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        ipv6 = True
    except OSError:
        ipv6 = False
    # A bound socket that never listens refuses connections, and no other process can take its
    # port while the test holds it.
    refuser = socket.socket()
    refuser.bind(("127.0.0.1", 0))
    proc: subprocess.Popen[bytes] | None = None
    front = 0
    text_of: dict[str, str] = {}
    try:
        for _attempt in range(3):  # a port picked below may be taken before nginx binds it
            proc, front, text_of, err = _start_nginx(tmp, refuser.getsockname()[1], ipv6)
            if proc is not None:
                break
        if proc is None:
            pytest.skip(f"nginx did not start: {err[:300]}")
        blocks = []
        for block in BLOCKS:
            cases = _requests(block)
            if block["name"] == "iphash" and ipv6:
                cases.append({"remote_addr": "::1", "request_uri": "/iphash/"})
            conn = None
            for case in cases:
                source = case.get("remote_addr", "127.0.0.1")
                if conn is None or block["name"].startswith("iphash"):
                    if conn is not None:
                        conn.close()
                    host = "::1" if ":" in source else "127.0.0.1"
                    conn = http.client.HTTPConnection(host, front, timeout=10,
                                                      source_address=(source, 0))
                case["upstream_addr"] = _get(conn, case)
            if conn is not None:
                conn.close()
            servers = []
            for s in block["servers"]:
                entry = {k: v for k, v in s.items() if k != "b"}
                entry["address"] = text_of[s["b"]]
                servers.append(entry)
            spec = {k: v for k, v in block.items() if k != "servers"}
            spec["servers"] = servers
            spec["refusing"] = [text_of["R"]]
            spec["cases"] = cases
            blocks.append(spec)
    finally:
        refuser.close()
        if proc is not None:
            _stop(proc)
    version = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr.strip()
    run = {"nginx": version, "upstreams": blocks}
    if os.environ.get("FASTWS_RECORD_VECTORS"):
        _write_vectors(run)
    return run


def _write_vectors(run: dict[str, Any]) -> None:
    """One case per line: small diffs when the vectors are recorded again."""
    parts = ['{"nginx": %s, "upstreams": [' % json.dumps(run["nginx"])]
    for i, block in enumerate(run["upstreams"]):
        head = {k: v for k, v in block.items() if k != "cases"}
        cases = ",\n  ".join(json.dumps(c, separators=(",", ":")) for c in block["cases"])
        parts.append(json.dumps(head)[:-1] + ', "cases": [\n  ' + cases + "\n]}"
                     + ("," if i < len(run["upstreams"]) - 1 else ""))
    parts.append("]}")
    (DATA / VECTORS).write_text("\n".join(parts) + "\n")


def _compare(spec: dict[str, Any]) -> None:
    up = upstream_from_spec(spec)
    refusing = set(spec.get("refusing", ()))
    mismatches = []
    for case in spec["cases"]:
        got = replay(up, case, refusing)
        if got != case["upstream_addr"]:
            mismatches.append((case, got))
    assert not mismatches, (f"{spec['name']}: {len(mismatches)} of {len(spec['cases'])} differ "
                            f"from nginx, first: {mismatches[:3]}")


BLOCK_NAMES = [b["name"] for b in BLOCKS]


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_same_choice_as_live_nginx(nginx_run: dict[str, Any], name: str) -> None:
    spec = next(b for b in nginx_run["upstreams"] if b["name"] == name)
    # The run must have exercised what it claims to: distinct servers, failover, rehashing.
    chosen = {tuple(c["upstream_addr"]) for c in spec["cases"]}
    if name == "rrbackup":
        # The primary refuses and the other is down: every request ends on the backup.
        assert all(len(c["upstream_addr"]) == 2 for c in spec["cases"]), chosen
    else:
        assert len({c["upstream_addr"][-1] for c in spec["cases"]}) >= 2, chosen
    _compare(spec)


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_same_choice_as_recorded_nginx(name: str) -> None:
    data = load_vectors(VECTORS)
    spec = next(b for b in data["upstreams"] if b["name"] == name)
    _compare(spec)


def test_recorded_vectors_are_substantial() -> None:
    data = load_vectors(VECTORS)
    by_name = {b["name"]: b for b in data["upstreams"]}
    assert set(by_name) == set(BLOCK_NAMES)
    for name in ("iphash", "iphash_fail", "hash", "chash"):
        assert len(by_name[name]["cases"]) >= 1000
    # Failover was recorded: some requests tried the refusing server and then another one.
    for name in ("iphash_fail", "hash", "chash", "rrfail", "rrbackup"):
        spec = by_name[name]
        assert any(len(c["upstream_addr"]) > 1 for c in spec["cases"]), name
    # Down-marking was recorded: the refusing server was tried exactly once, then skipped.
    for name in ("rrmark", "iphash_mark", "chash_mark"):
        spec = by_name[name]
        refusing = spec["refusing"][0]
        tried = [c for c in spec["cases"] if refusing in c["upstream_addr"]]
        assert len(tried) == 1, name
    # All 1,000 ip_hash clients come from distinct /24 networks.
    nets = {c["remote_addr"].rsplit(".", 1)[0] for c in by_name["iphash"]["cases"]}
    assert len(nets) >= 1000
