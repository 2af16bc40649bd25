"""Instances that agree without shared state: two fastws instances and one nginx, on the same
upstream list, send each of 1,000 keys to the same backend under ip_hash, hash and consistent
hash; and when one backend leaves, only its keys move, on all three alike.  (nginx keeps a
leaving server in an ip_hash or hash list, marked `down`, to preserve the others' keys: its
documentation's advice; a consistent-hash list just drops it.)"""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any, Iterator

import pytest

from nginx_support import NGINX, Nginx
from support import NamedBackend, Proxy, free_port, wait_until

KEYS = 1000
GROUPS = ("iph", "h", "ch")

pytestmark = pytest.mark.skipif(NGINX is None, reason="needs nginx (apt-get install nginx-light)")


def fastws_config(port: int, backends: list[str], gone: str | None) -> dict[str, Any]:
    def servers(group: str) -> list[Any]:
        if group == "ch":
            return [b for b in backends if b != gone]
        return [{"address": b, "down": True} if b == gone else b for b in backends]

    return {
        "upstream": [{"name": "iph", "balance": "ip_hash", "servers": servers("iph")},
                     {"name": "h", "balance": "hash", "hash_key": "$arg_k",
                      "servers": servers("h")},
                     {"name": "ch", "balance": "hash", "hash_key": "$arg_k", "consistent": True,
                      "servers": servers("ch")}],
        "server": [{"listen": [f"127.0.0.1:{port}"], "location": [
            {"path": f"/{g}/", "proxy_pass": g, "access_log": False} for g in GROUPS]}],
    }


def nginx_config(tmp: Path, port: int, backends: list[str], gone: str | None) -> Path:
    def servers(group: str) -> str:
        out = []
        for b in backends:
            if b == gone and group == "ch":
                continue
            out.append(f"server {b}{' down' if b == gone else ''};")
        return " ".join(out)

    path = tmp / "nginx.conf"
    path.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log crit;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    upstream iph {{ ip_hash; {servers("iph")} }}
    upstream h {{ hash $arg_k; {servers("h")} }}
    upstream ch {{ hash $arg_k consistent; {servers("ch")} }}
    server {{
        listen 127.0.0.1:{port};
        location /iph/ {{ proxy_pass http://iph; }}
        location /h/ {{ proxy_pass http://h; }}
        location /ch/ {{ proxy_pass http://ch; }}
    }}
}}
""")
    return path


def client_address(i: int) -> str:
    # ip_hash keys on an IPv4 client's first three octets: 1,000 different ones on loopback
    return f"127.{1 + i // 200}.{i % 200}.1"


def ask(port: int, path: str, source: str = "127.0.0.1",
        conn: socket.socket | None = None) -> tuple[str, socket.socket]:
    """One GET (on `conn`, kept alive, or a new connection from `source`): the backend's name."""
    if conn is None:
        conn = socket.create_connection(("127.0.0.1", port), timeout=10,
                                        source_address=(source, 0))
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += conn.recv(4096)
    assert head.startswith(b"HTTP/1.1 200 "), head
    return body.decode(), conn


def choices(port: int) -> dict[str, list[str]]:
    """Each group's backend for each of the 1,000 keys, through the proxy on `port`."""
    out: dict[str, list[str]] = {"iph": []}
    for i in range(KEYS):
        name, conn = ask(port, "/iph/", source=client_address(i))
        conn.close()
        out["iph"].append(name)
    for group in ("h", "ch"):
        conn = None
        out[group] = []
        for i in range(KEYS):
            name, conn = ask(port, f"/{group}/?k=key-{i}", conn=conn)
            out[group].append(name)
        assert conn is not None
        conn.close()
    return out


@pytest.fixture
def backends() -> Iterator[list[NamedBackend]]:
    made = [NamedBackend(f"b{i}") for i in range(4)]
    yield made
    for b in made:
        b.sock.close()


def test_two_fastws_instances_and_nginx_choose_alike(tmp_path: Path,
                                                     backends: list[NamedBackend]) -> None:
    # the backends' answers are their names; they keep client connections alive
    addresses = [b.address for b in backends]
    by_address = {b.address: b.name for b in backends}
    ports = [free_port(), free_port(), free_port()]
    instances = []
    nginx: Nginx | None = None
    try:
        for i in range(2):
            (tmp_path / f"i{i}").mkdir()
            instances.append(Proxy(tmp_path / f"i{i}", fastws_config(ports[i], addresses, None),
                                   port=ports[i]))
        nginx = Nginx(nginx_config(tmp_path, ports[2], addresses, None), tmp_path, ports[2])
        before = [choices(p) for p in ports]
        for group in GROUPS:
            assert before[0][group] == before[1][group] == before[2][group], group
            assert len(set(before[0][group])) == 4      # every backend has keys
        # b2 leaves: the fastws instances reload, nginx starts again on its new file
        gone = addresses[2]
        for i, proxy in enumerate(instances):
            old = set(proxy.workers())
            proxy.rewrite(fastws_config(ports[i], addresses, gone))
            proxy.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: set(proxy.workers()) and not set(proxy.workers()) & old)
        nginx.stop()
        nginx = Nginx(nginx_config(tmp_path, ports[2], addresses, gone), tmp_path, ports[2])
        after = [choices(p) for p in ports]
        for group in GROUPS:
            assert after[0][group] == after[1][group] == after[2][group], group
            moved = [k for k in range(KEYS) if before[0][group][k] != after[0][group][k]]
            # exactly the keys b2 had moved, and none went to b2
            assert moved == [k for k in range(KEYS) if before[0][group][k] == by_address[gone]
                             or before[0][group][k] == "b2"], group
            assert "b2" not in after[0][group]
    finally:
        for proxy in instances:
            proxy.stop()
        if nginx is not None:
            nginx.stop()
