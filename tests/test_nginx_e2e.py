"""The nginx recipe run as written: the very same nginx.conf under a real nginx and under
fastws (`fastws -p DIR -c DIR/nginx.conf`), one after the other, with the same requests.

For each block of the reference (tests/data/nginx-websocket.conf) and a few variants, the
clients get the same status codes, the backends receive the same request heads (apart from the
differences docs/nginx.md lists, named in `documented` below), the balancer makes the same
choices, and the access log and stub_status say the same things.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import re
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import trustme

from nginx_support import Nginx, Site, render
from support import NamedBackend as Backend
from support import Proxy, free_port, read_all, read_head, wait_until, ws_frame

Head = tuple[str, tuple[tuple[str, str], ...]]   # request line, sorted (name, value) pairs


def documented(line: str, fields: list[tuple[str, str]]) -> Head:
    """A request head with docs/nginx.md's differences taken out: fastws speaks HTTP/1.1 to
    upstreams where nginx's default is 1.0, and sets Connection itself for a plain request
    (nginx: close; fastws: keep-alive or nothing, by the group's keepalive)."""
    method, target, version = line.split(" ")
    plain = not any(k.lower() == "upgrade" for k, _ in fields)
    if plain:
        line = f"{method} {target} HTTP/1.x"
        fields = [(k, v) for k, v in fields if k.lower() != "connection"]
    return line, tuple(sorted((k.lower(), v) for k, v in fields))


# --- clients ----------------------------------------------------------------------------------

# (kind "ws" or "get", path, source, Host, headers, bytes sent first: a PROXY protocol header)
Request = tuple[str, str, str, str, str, bytes]
LOCAL = "127.0.0.1"


def ws(path: str, source: str = LOCAL, host: str = "example.com", extra: str = "",
       preamble: bytes = b"") -> Request:
    return ("ws", path, source, host, extra, preamble)


def get(path: str, source: str = LOCAL, host: str = "example.com", extra: str = "",
        preamble: bytes = b"") -> Request:
    return ("get", path, source, host, extra, preamble)


def _connect(port: int, source: str, tls: ssl.SSLContext | None,
             preamble: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.sendall(preamble)
    if tls is not None:
        s = tls.wrap_socket(s, server_hostname="example.com")
    return s


def run_requests(port: int, requests: list[Request],
                 tls: ssl.SSLContext | None = None) -> list[tuple[int, bytes]]:
    """Each request on its own connection: (status, what came back: the echo of a tunnel, or
    the body)."""
    out = []
    for n, (kind, path, source, host, extra, preamble) in enumerate(requests):
        with _connect(port, source, tls, preamble) as s:
            if kind == "ws":
                # the same keys in both runs, so that the heads compare whole
                key = base64.b64encode(hashlib.md5(b"%d" % n).digest()).decode()
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                          "Sec-WebSocket-Version: 13\r\nOrigin: http://example.com\r\n"
                          f"User-Agent: difftest\r\n{extra}\r\n".encode("latin-1"))
                head, rest = read_head(s)
                status = int(head.split(b" ")[1])
                echoed = rest
                if status == 101:
                    # a WebSocket message, masked as a client's; the backend echoes it unmasked
                    s.sendall(ws_frame(b"ping-" + path.encode()))
                    while len(echoed) < 2 + 5 + len(path):
                        data = s.recv(65536)
                        if not data:
                            break
                        echoed += data
                out.append((status, echoed))
            else:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: difftest"
                          f"\r\nConnection: close\r\n{extra}\r\n".encode("latin-1"))
                raw = read_all(s)
                head, _, body = raw.partition(b"\r\n\r\n")
                out.append((int(head.split(b" ")[1]), body))
    return out


# --- the comparison ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, ssl.SSLContext]:
    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    cert = ca.issue_cert("example.com")
    cert.cert_chain_pems[0].write_to_path(str(d / "example.com.crt"))
    cert.private_key_pem.write_to_path(str(d / "example.com.key"))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return str(d / "example.com.crt"), str(d / "example.com.key"), client


def _status_fields(body: bytes) -> list[int]:
    return [int(x) for x in re.findall(rb"\d+", body)]


def _log_fields(path: Path) -> list[str]:
    """Each access-log line with its times taken out (they differ between any two runs)."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="latin-1").splitlines()
    masked = []
    for line in lines:
        line = re.sub(r"\[[^\]]+\]", "[TIME]", line)
        # a page of the proxy's own: the same status, each proxy's own wording
        line = re.sub(r"\" ([45]\d\d) \d+ ", r'" \1 PAGE ', line)
        line = re.sub(r"=\"?[\d.]+\"?", "=T", line)
        masked.append(line)
    return sorted(masked)        # a tunnel's line is written when it closes: order by content


def compare(tmp: Path, title: str, requests: list[Request], *, tls: bool = False,
            certs: tuple[str, str, ssl.SSLContext] | None = None, backends: int = 3,
            extra: Callable[[str], str] = lambda text: text) -> dict[str, Any]:
    servers = [Backend(f"b{i}") for i in range(backends)]
    other = Backend("other")
    site = Site(tmp, free_port(), free_port(), [b.address for b in servers], other.address,
                *(certs[:2] if certs else ("", "")))
    conf = tmp / "nginx.conf"
    conf.write_text(extra(render(title, site)))
    port = site.tls_port if tls else site.port
    client_tls = certs[2] if tls and certs else None
    results: dict[str, Any] = {}
    try:
        for name in ("nginx", "fastws"):
            for f in tmp.glob("*access.log"):
                f.unlink()
            if name == "nginx":
                proc: Any = Nginx(conf, tmp, port)
            else:
                proc = Proxy(tmp, conf, port=port, args=("-p", str(tmp)))
            try:
                answers = run_requests(port, requests, client_tls)
                wait_until(lambda: sum(len(b.heads) for b in servers + [other])
                           >= sum(1 for a in answers if a[0] in (101, 200) and
                                  not a[1].startswith(b"Active")))
                heads = {b.name: [documented(*h) for h in b.take()] for b in servers + [other]}
            finally:
                proc.stop()
            logs = {f.name: _log_fields(f) for f in sorted(tmp.glob("*access.log"))}
            results[name] = {"answers": answers, "heads": heads, "logs": logs}
    finally:
        for b in servers + [other]:
            b.close()
    return results


def assert_same(results: dict[str, Any]) -> None:
    ng, fw = results["nginx"], results["fastws"]
    assert [a[0] for a in fw["answers"]] == [a[0] for a in ng["answers"]]
    for (ns, nbody), (fs, fbody) in zip(ng["answers"], fw["answers"]):
        if nbody.startswith(b"Active connections"):
            assert _status_fields(fbody)[1:4] == _status_fields(nbody)[1:4], (nbody, fbody)
        elif ns in (101, 200):          # the backend's answer (each proxy words its own pages)
            assert fbody == nbody
    assert fw["heads"] == ng["heads"]
    assert fw["logs"] == ng["logs"]


def test_basic_configuration(tmp_path: Path) -> None:
    results = compare(tmp_path, "Basic configuration",
                      [ws("/ws"), ws("/ws/chat?room=1"), get("/ws"), get("/ws?x=%41")])
    assert [a[0] for a in results["fastws"]["answers"]] == [101, 101, 200, 200]
    assert_same(results)


def test_complete_configuration_example(tmp_path: Path) -> None:
    results = compare(tmp_path, "Complete configuration example",
                      [ws("/ws"), ws("/ws"), get("/"), get("/page?x=1"), ws("/ws")])
    assert [a[0] for a in results["fastws"]["answers"]] == [101, 101, 200, 200, 101]
    assert_same(results)


def test_https_websocket_configuration(tmp_path: Path, certs: Any) -> None:
    results = compare(tmp_path, "HTTPS WebSocket configuration",
                      [ws("/ws"), ws("/ws"), get("/ws")],
                      tls=True, certs=certs)
    assert [a[0] for a in results["fastws"]["answers"]] == [101, 101, 200]
    assert_same(results)


def test_websocket_load_balancing_keeps_each_client_on_one_backend(tmp_path: Path) -> None:
    sources = [f"127.{a}.{b}.9" for a in (1, 7, 42) for b in (3, 88, 200)]
    results = compare(tmp_path, "WebSocket load balancing",
                      [ws("/ws", s) for s in sources] * 2)
    assert_same(results)
    used = {name for name, heads in results["fastws"]["heads"].items() if heads}
    assert len(used) > 1      # the addresses spread over the servers


def test_performance_optimisation(tmp_path: Path) -> None:
    results = compare(tmp_path, "Performance optimisation",
                      [ws("/ws"), get("/ws"), ws("/ws")])
    assert_same(results)


def test_multi_path_websocket(tmp_path: Path) -> None:
    results = compare(tmp_path, "Multi-path WebSocket",
                      [ws("/chat/ws"), ws("/notification/ws"), ws("/ws"), ws("/chat/ws/room"),
                       get("/notification/ws")])
    assert [a[0] for a in results["fastws"]["answers"]] == [101, 101, 101, 101, 200]
    assert_same(results)


def test_monitoring_and_logging(tmp_path: Path) -> None:
    results = compare(tmp_path, "Monitoring and logging",
                      [ws("/ws"), get("/ws"), ws("/ws"), get("/nginx_status")])
    assert_same(results)
    (log,) = results["fastws"]["logs"].values()
    assert len(log) == 3 and all("difftest" in line for line in log)


def test_hash_consistent_and_weights(tmp_path: Path) -> None:
    def variant(text: str) -> str:
        text = text.replace("ip_hash;", "hash $request_uri consistent;")
        return re.sub(r"(server 127\.0\.0\.1:\d+);", r"\1 weight=3;", text, count=1)
    results = compare(tmp_path, "WebSocket load balancing",
                      [ws(f"/ws/{i}") for i in range(24)], extra=variant)
    assert_same(results)
    assert sum(1 for heads in results["fastws"]["heads"].values() if heads) == 3


def test_several_server_names_pick_the_same_server(tmp_path: Path) -> None:
    def variant(text: str) -> str:
        # a second server on the same address, for other names, answering itself
        listen = re.search(r"listen (127\.0\.0\.1:\d+);", text).group(1)  # type: ignore
        return text.replace("http {", "http {\n    server {\n        listen " + listen + ";\n"
                            "        server_name .other.test www.example.*;\n"
                            "        location / { return 403; }\n    }\n    server {\n"
                            "        listen " + listen + ";\n"
                            "        server_name ~^(?<sub>[a-z]+)\\.regex\\.test$ "
                            "~^api\\d+\\.;\n"
                            "        location / { return 409; }\n    }", 1)
    results = compare(tmp_path, "Multi-path WebSocket",
                      [ws("/chat/ws"), get("/ws"), ws("/chat/ws", host="other.test"),
                       get("/x", host="a.other.test"), get("/", host="www.example.org"),
                       get("/", host="unknown.test"), ws("/ws", host="EXAMPLE.com"),
                       get("/", host="abc.regex.test"), get("/", host="ABC.Regex.test"),
                       get("/", host="a1.regex.test"), get("/", host="api7.example.com")],
                      extra=variant)
    assert [a[0] for a in results["fastws"]["answers"]] == [101, 200, 403, 403, 403, 403, 101,
                                                            409, 409, 403, 409]
    assert_same(results)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")
def test_user_runs_the_workers_as_that_user_once_the_listeners_are_open(tmp_path: Path) -> None:
    backend = Backend("b0")
    port = free_port()
    (tmp_path / "logs").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"user nobody;\nworker_processes 2;\npid logs/fastws.pid;\n"
                    f"error_log logs/error.log info;\nevents {{ worker_connections 256; }}\n"
                    f"http {{\n  access_log logs/access.log;\n"
                    f"  upstream b {{ server {backend.address}; }}\n"
                    f"  server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://b; }} }}"
                    "\n}\n")
    proxy = Proxy(tmp_path, conf, port=port, args=("-p", str(tmp_path)))
    try:
        nobody = pwd.getpwnam("nobody").pw_uid
        wait_until(lambda: len(proxy.workers()) == 2 and all(
            _uid(pid) == nobody for pid in proxy.workers()))
        assert _uid(proxy.pid) == 0
        assert run_requests(port, [get("/a")]) == [(200, b"b0")]
        assert (tmp_path / "logs" / "access.log").stat().st_uid == nobody
    finally:
        proxy.stop(signal.SIGQUIT)
        backend.close()
    assert '"GET /a HTTP/1.1" 200 2' in (tmp_path / "logs" / "access.log").read_text()


def _uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[2])     # the effective uid
    raise AssertionError(f"no Uid in /proc/{pid}/status")


def test_regex_and_prefix_locations_in_nginx_order(tmp_path: Path) -> None:
    # exact, ^~, the longest prefix, then regular expressions in order (case-sensitive and
    # not), each location answering with its own status
    def variant(text: str) -> str:
        return text.replace("    location /ws {", """    location = /exact { return 201; }
    location ^~ /static/ { return 202; }
    location /static/deeper/ { return 203; }
    location ~ ^/api/v[0-9]+/ { return 204; }
    location ~* \\.(PNG|jpg)$ { return 205; }
    location /api/ { return 206; }
    location ~ ^/ws/(\\d+)$ {
        proxy_pass http://websocket_backend;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
    }
    location /ws {""", 1)
    paths = ["/exact", "/static/a.png", "/static/deeper/b.png", "/api/v2/x.jpg", "/api/x",
             "/api/x.JPG", "/other.png", "/ws/12", "/ws/x", "/ws/%31%32", "/API/v1/x.JPG"]
    results = compare(tmp_path, "Multi-path WebSocket",
                      [get(p) for p in paths] + [ws("/ws/7"), ws("/ws/seven")], extra=variant)
    assert [a[0] for a in results["fastws"]["answers"]] == [
        201, 202, 205, 204, 206, 205, 205, 200, 200, 200, 205, 101, 101]
    assert_same(results)


def test_maps_give_the_same_values_as_nginx(tmp_path: Path) -> None:
    # strings ignoring case, hostnames' wildcards, regular expressions in order, a default
    # with variables, a map of a map, and a map as the hash key
    def variant(text: str) -> str:
        text = text.replace("http {", r"""http {
    map $http_host $tenant {
        hostnames;
        default "other-$request_method";
        example.com main;
        *.example.org org;
        .example.net net;
        www.example.* www;
        ~^api\.(v[0-9])\. api;
        ~*^CDN cdn;
    }
    map $tenant $tier {
        main gold;
        ~^o silver;
        default bronze;
    }
    map $http_x_forwarded_proto $forwarded_proto {
        default $http_x_forwarded_proto;
        ''      $scheme;
    }""", 1)
        return text.replace("""    location /ws {
        proxy_pass http://websocket_backend;""", """    location /ws {
        proxy_pass http://websocket_backend;
        proxy_set_header X-Tenant $tenant;
        proxy_set_header X-Tier "$tier/$tenant";
        proxy_set_header X-Forwarded-Proto $forwarded_proto;""", 1).replace(
            "server 127.0.0.1", "hash $tier consistent;\n        server 127.0.0.1", 1)
    hosts = ["example.com", "EXAMPLE.COM", "a.example.org", "example.org", "b.example.net",
             "example.net", "www.example.de", "api.v2.x", "cdn.example.com", "unknown.test",
             "example.com."]
    results = compare(tmp_path, "Multi-path WebSocket",
                      [get("/ws", host=h) for h in hosts] + [ws("/ws", host="a.example.org")],
                      extra=variant)
    assert_same(results)
    tenants = [dict(fields)["x-tenant"] for heads in results["fastws"]["heads"].values()
               for _, fields in heads]
    assert {"main", "org", "net", "www", "api", "cdn", "other-GET"} <= set(tenants)


@pytest.mark.parametrize("escape", ["default", "json", "none"])
def test_log_format_escapes_as_nginx(tmp_path: Path, escape: str) -> None:
    def variant(text: str) -> str:
        return text.replace("log_format websocket", f"""log_format escaped escape={escape}
        '{{"ref":"$http_referer","x":"$http_x_test","uri":"$request_uri"}}';
    log_format websocket""", 1).replace(
            "access_log off;", f"access_log {tmp_path}/escaped_access.log escaped;", 1)
    # (control characters are refused by fastws with 400, where nginx takes them: http.md)
    # (and a header sent empty is "-" in fastws's default escaping, "" in nginx's: nginx.md)
    odd = ['a"b\\c', "tab\there", "caf\xe9", "{}<>'"] + ([""] if escape != "default" else [])
    results = compare(tmp_path, "Monitoring and logging",
                      [get("/nginx_status?q=%22x", extra=f"X-Test: {v}\r\nReferer: {v}\r\n")
                       for v in odd], extra=variant)
    assert_same(results)
    assert len(results["fastws"]["logs"]["escaped_access.log"]) == len(odd)


def test_debians_own_nginx_conf_with_a_proxy_site(tmp_path: Path) -> None:
    # The packaged /etc/nginx (modules, mime.types, gzip, ssl_* defaults, conf.d and
    # sites-enabled includes) with its default site made a WebSocket proxy.
    import shutil
    etc = tmp_path / "etc"
    shutil.copytree("/etc/nginx", etc, symlinks=False)
    main = etc / "nginx.conf"
    main.write_text(main.read_text().replace("/etc/nginx/", f"{etc}/").replace(
        "/var/log/nginx/", f"{tmp_path}/").replace("/run/nginx.pid", f"{tmp_path}/nginx.pid"))
    backend = Backend("app")
    port = free_port()
    for site in (etc / "sites-enabled").iterdir():
        site.unlink()
    (etc / "sites-enabled" / "default").write_text(
        "map $http_upgrade $connection_upgrade { default upgrade; '' close; }\n"
        f"upstream app {{ server {backend.address}; }}\n"
        f"server {{ listen 127.0.0.1:{port} default_server; server_name _;\n"
        "  location / { proxy_pass http://app; proxy_http_version 1.1;\n"
        "    proxy_set_header Upgrade $http_upgrade;\n"
        "    proxy_set_header Connection $connection_upgrade; proxy_set_header Host $host; }\n}\n")
    check = subprocess.run([sys.executable, "-m", "fastws", "-t", "-c", str(main)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert "sendfile: ignored" in check.stdout and "gzip on: " in check.stdout
    # its paths outside /etc/nginx (logs, pid) are moved to the test's directory too
    proxy = Proxy(tmp_path, main, port=port, args=("-p", str(tmp_path)))
    try:
        assert run_requests(port, [get("/x")]) == [(200, b"app")]
    finally:
        proxy.stop()
        backend.close()
    assert '"GET /x HTTP/1.1" 200 3' in (tmp_path / "access.log").read_text()


def test_a_rendered_test_config_runs_unchanged_under_p(tmp_path: Path) -> None:
    # what test suites render for nginx: relative pid, error log, logs and temp paths, run
    # with -p DIR under both
    backend = Backend("app")
    port = free_port()
    for d in ("logs", "tmp"):
        (tmp_path / d).mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""daemon off;
master_process on;
worker_processes 1;
pid logs/nginx.pid;
error_log logs/error.log debug;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path tmp/client_body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    access_log logs/access.log;
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://{backend.address}; }}
        location /status {{ stub_status; }}
    }}
}}
""")
    try:
        for name in ("nginx", "fastws"):
            proc: Any = Nginx(conf, tmp_path, port) if name == "nginx" else \
                Proxy(tmp_path, conf, port=port, args=("-p", str(tmp_path)))
            try:
                assert run_requests(port, [get("/a")]) == [(200, b"app")]
                assert (tmp_path / "logs" / "nginx.pid").read_text().strip().isdigit()
            finally:
                proc.stop()
            lines = (tmp_path / "logs" / "access.log").read_text().splitlines()
            assert '"GET /a HTTP/1.1" 200 3' in lines[-1], (name, lines)
    finally:
        backend.close()


def test_proxy_pass_with_variables_names_a_group(tmp_path: Path) -> None:
    def variant(text: str) -> str:
        text = text.replace("http {", """http {
    map $http_x_pool $pool {
        default websocket_backend;
        chat chat_backend;
        nowhere no_such_group;
    }""", 1)
        return text.replace("    location /ws {", """    location /dyn {
        proxy_pass http://$pool;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
        proxy_set_header X-Host $proxy_host;
    }
    location /rewrite/ {
        proxy_pass http://$pool/v2$uri?from=$arg_id;
    }
    location /ws {""", 1)
    results = compare(tmp_path, "Multi-path WebSocket",
                      [get("/dyn/a?x=1"), get("/dyn/b", extra="X-Pool: chat\r\n"),
                       ws("/dyn/c", extra="X-Pool: chat\r\n"), get("/rewrite/z?id=7"),
                       get("/dyn/d", extra="X-Pool: nowhere\r\n")], extra=variant)
    assert [a[0] for a in results["fastws"]["answers"]] == [200, 200, 101, 200, 502]
    assert_same(results)


def test_allow_and_deny_as_nginx(tmp_path: Path) -> None:
    # first match decides; a level with rules replaces the inherited ones
    def variant(text: str) -> str:
        text = text.replace("stub_status on;", "stub_status on;\n    allow 127.0.0.1;\n"
                            "    allow 127.1.0.0/16;\n    deny all;", 1)
        return text.replace("server_name example.com;", "server_name example.com;\n"
                            "    deny 127.0.0.3;\n    deny 127.9.0.0/24;", 1)
    results = compare(tmp_path, "Monitoring and logging",
                      [get("/nginx_status"), get("/nginx_status", "127.1.2.3"),
                       get("/nginx_status", "127.0.0.2"), ws("/ws", "127.0.0.3"),
                       ws("/ws", "127.0.0.4"), get("/ws", "127.9.0.77"),
                       get("/ws", "127.9.1.1")], extra=variant)
    assert [a[0] for a in results["fastws"]["answers"]] == [200, 200, 403, 403, 101, 403, 200]
    assert_same(results)


@pytest.mark.parametrize("header, recursive", [("X-Forwarded-For", "on"),
                                               ("X-Forwarded-For", "off"),
                                               ("X-Real-IP", "off")])
def test_real_ip_from_trusted_proxies_as_nginx(tmp_path: Path, header: str,
                                               recursive: str) -> None:
    # the recipe's X-Real-IP / X-Forwarded-For, the access log and the rules all see the
    # address a trusted proxy names; an untrusted peer's headers name nobody
    def variant(text: str) -> str:
        return text.replace("server_name example.com;", "server_name example.com;\n"
                            "    set_real_ip_from 127.0.0.0/24;\n"
                            "    set_real_ip_from ::1;\n"
                            f"    real_ip_header {header};\n"
                            f"    real_ip_recursive {recursive};\n"
                            "    deny 198.51.100.1;", 1)
    xff = "X-Forwarded-For: 203.0.113.7, 127.0.0.9\r\nX-Real-IP: 192.0.2.44\r\n"
    results = compare(tmp_path, "Basic configuration",
                      [ws("/ws", "127.0.0.5", extra=xff), get("/ws", "127.0.0.5", extra=xff),
                       get("/ws", "127.1.0.5", extra=xff),
                       get("/ws", "127.0.0.6", extra="X-Forwarded-For: 198.51.100.1\r\n"
                                                     "X-Real-IP: 198.51.100.1\r\n"),
                       get("/ws", "127.0.0.6", extra="X-Forwarded-For: bogus\r\n"
                                                     "X-Real-IP: bogus\r\n")], extra=variant)
    assert_same(results)


def test_the_clients_own_forwarding_headers_as_nginx(tmp_path: Path) -> None:
    # without proxy_set_header for them, nginx passes the client's X-Real-IP and
    # X-Forwarded-* on as they are; with it, its own values replace them
    own = ("X-Forwarded-For: 198.51.100.9\r\nX-Real-IP: 198.51.100.10\r\n"
           "X-Forwarded-Proto: https\r\n")
    results = compare(tmp_path, "Complete configuration example",
                      [ws("/ws", extra=own), get("/", extra=own), get("/ws", extra=own),
                       get("/")], extra=lambda text: text)
    assert_same(results)


@pytest.mark.parametrize("trusted", ["127.0.0.0/24", "10.0.0.0/8"])
def test_proxy_protocol_as_nginx(tmp_path: Path, trusted: str) -> None:
    # `listen ... proxy_protocol` and `real_ip_header proxy_protocol`: from a trusted sender
    # the header names the client (the recipe's headers, the access log, the rules); from an
    # untrusted one only $proxy_protocol_addr does
    def variant(text: str) -> str:
        text = re.sub(r"listen ([\d.:]+);", r"listen \1 proxy_protocol;", text)
        return text.replace("server_name example.com;", "server_name example.com;\n"
                            f"    set_real_ip_from {trusted};\n"
                            "    real_ip_header proxy_protocol;\n"
                            "    proxy_set_header X-PP $proxy_protocol_addr:$proxy_protocol_port;"
                            "\n    deny 198.51.100.1;", 1)
    v1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 80\r\n"
    v2 = (b"\r\n\r\n\x00\r\nQUIT\n\x21\x21\x00\x24" + socket.inet_pton(socket.AF_INET6, "2001:db8::7")
          + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + b"\x9c\x40\x00\x50")
    denied = b"PROXY TCP4 198.51.100.1 192.0.2.1 40000 80\r\n"
    results = compare(tmp_path, "Basic configuration",
                      [ws("/ws", preamble=v1), get("/ws", preamble=v2), get("/ws", preamble=denied),
                       ws("/ws", preamble=b"PROXY UNKNOWN\r\n")], extra=variant)
    expected = [101, 200, 403, 101] if trusted.startswith("127.") else [101, 200, 200, 101]
    assert [a[0] for a in results["fastws"]["answers"]] == expected
    assert_same(results)


def test_limit_req_and_limit_conn_as_nginx(tmp_path: Path) -> None:
    # a burst from one address: nginx's leaky bucket lets the first and the burst through and
    # refuses the rest with limit_req_status, while another address is served (limit_conn's
    # refusals are in test_edge.py: here a closed tunnel's count would race the next request)
    def variant(text: str) -> str:
        text = text.replace("http {", "http {\n"
                            "    limit_req_zone $binary_remote_addr zone=one:1m rate=1r/m;\n"
                            "    limit_conn_zone $binary_remote_addr zone=addr:1m;", 1)
        return text.replace("server_name example.com;", "server_name example.com;\n"
                            "    limit_req zone=one burst=2 nodelay;\n"
                            "    limit_req_status 429;\n"
                            "    limit_conn addr 5;", 1)
    results = compare(tmp_path, "Basic configuration",
                      [get("/ws", "127.0.0.5"), ws("/ws", "127.0.0.5"), get("/ws", "127.0.0.5"),
                       get("/ws", "127.0.0.5"), ws("/ws", "127.0.0.5"), get("/ws", "127.0.0.6")],
                      extra=variant)
    assert [a[0] for a in results["fastws"]["answers"]] == [200, 101, 200, 429, 429, 200]
    assert_same(results)
