"""TLS end to end: wss:// and https:// through a fastws process, SNI, TLS to upstreams, faults.

Certificates are made at test time with trustme; every connection is a real TLS connection.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import trustme
from websockets.asyncio.client import connect

from support import (RawBackend, wait_until, free_port, http_get, raw_echo_handler, read_all, read_head,
                     to_toml, upgrade_request, ws_accept, wait_port)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_cert(ca: trustme.CA, directory: Path, stem: str, *names: str, **kw: Any) -> dict[str, str]:
    """A leaf certificate (with its chain) and key as PEM files; returns the config table."""
    leaf = ca.issue_cert(*names, **kw)
    cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return {"certificate": str(cert), "key": str(key)}


def client_context(ca: trustme.CA, **kw: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    for name, value in kw.items():
        setattr(ctx, name, value)
    return ctx


def tls_config(port: int, status_port: int, tls: dict[str, Any], upstream: str,
               **server: Any) -> dict[str, Any]:
    """A TLS server on `port` with /ws proxied to `upstream`, and a plain server on
    `status_port` with the JSON status page (one process: it sees the TLS server's counters)."""
    return {
        "upstream": [{"name": "backend", "servers": [upstream]}],
        "server": [
            {"listen": [f"127.0.0.1:{port}"], "server_name": ["localhost"], "tls": tls, **server,
             # the tests speak raw bytes through the tunnels: relayed blind
             "location": [{"path": "/ws", "proxy_pass": "backend", "frames": False},
                          {"path": "/hello", "return": [200, "hello over tls"]},
                          {"path": "= /status", "status": "json"}]},
            {"listen": [f"127.0.0.1:{status_port}"],
             "location": [{"path": "= /status", "status": "json"}]},
        ],
    }


def status(port: int) -> dict[str, Any]:
    code, body = http_get("127.0.0.1", port, "/status")
    assert code == 200, body
    return json.loads(body)


def https_get(port: int, path: str, ctx: ssl.SSLContext, host: str = "localhost",
              session: ssl.SSLSession | None = None) -> tuple[int, bytes, dict[str, Any]]:
    """A GET over TLS; returns the status, the body and what the TLS connection was."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host, session=session) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = read_all(s)
            info = {"alpn": s.selected_alpn_protocol(), "version": s.version(),
                    "session": s.session, "reused": s.session_reused, "cert": s.getpeercert()}
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body, info


def wss_echo(url: str, ctx: ssl.SSLContext, messages: list[Any], *, clients: int = 1,
             during: Callable[[], None] | None = None, **kw: Any) -> None:
    """Open `clients` WebSocket connections, echo `messages` on each, call `during()` while
    they are open, and echo them again.  websockets' asyncio client, not its sync one: the
    sync client reads and writes one SSLSocket from two threads at once, which OpenSSL does
    not allow, and loses a request now and then when TLS 1.3 tickets arrive meanwhile."""
    async def main() -> None:
        conns = [await connect(url, ssl=ctx, max_size=None, compression=None, **kw)
                 for _ in range(clients)]
        try:
            for round_ in range(2):
                for ws in conns:
                    for m in messages:
                        await ws.send(m)
                        assert await ws.recv() == m
                if round_ == 0 and during is not None:
                    during()        # blocking calls: the connections just wait
        finally:
            for ws in conns:
                await ws.close()

    asyncio.run(main())



def test_client_certificates_and_what_a_hook_sees(make_proxy, ca, tmp_path, ports, monkeypatch):
    # two servers on one address: the default one asks for no certificate, the one SNI names
    # requires one signed by client_ca (its verification follows SNI's choice, as nginx's);
    # a hook there reads the TLS session and answers with what it saw
    port, sport = ports
    clients = trustme.CA()
    (tmp_path / "clients.pem").write_bytes(clients.cert_pem.bytes())
    (tmp_path / "fastws_test_tlshook.py").write_text(
        "from fastws.hooks import Deny\n"
        "def seen(r):\n"
        "    return Deny(200, f'{r.tls}|{r.tls_sni}|{r.tls_alpn}|{r.tls_client_subject}')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    cfg = tls_config(port, sport, write_cert(ca, tmp_path, "a", "a.example"), "127.0.0.1:9")
    cfg["server"][0]["server_name"] = ["a.example"]
    secure = {**write_cert(ca, tmp_path, "s", "secure.example"), "verify_client": "on",
              "client_ca": str(tmp_path / "clients.pem")}
    optional = {**write_cert(ca, tmp_path, "o", "optional.example"),
                "verify_client": "optional", "client_ca": str(tmp_path / "clients.pem")}
    for name, tls in (("secure.example", secure), ("optional.example", optional)):
        cfg["server"].insert(1, {"listen": [f"127.0.0.1:{port}"], "server_name": [name],
                                 "tls": tls, "location": [{"path": "/", "proxy_pass": "backend",
                                                           "hook": "fastws_test_tlshook:seen",
                                                           "hook_requests": True}]})
    make_proxy(cfg, port=port)
    anonymous = client_context(ca)
    identified = client_context(ca)
    leaf = clients.issue_cert("alice@example.com", common_name="alice")
    leaf.configure_cert(identified)
    identified.set_alpn_protocols(["h2", "http/1.1"])
    stranger = client_context(ca)
    trustme.CA().issue_cert("mallory@example.com", common_name="mallory").configure_cert(stranger)
    assert https_get(port, "/hello", anonymous, host="a.example")[:2] == (200, b"hello over tls")
    code, body, _ = https_get(port, "/x", identified, host="secure.example")
    assert code == 200 and body.startswith(b"True|secure.example|http/1.1|/O=trustme")
    assert body.endswith(b"/CN=alice")
    code, body, _ = https_get(port, "/x", anonymous, host="optional.example")
    assert (code, body) == (200, b"True|optional.example|None|None")    # (no ALPN asked)
    for ctx, host in ((anonymous, "secure.example"), (stranger, "secure.example"),
                      (stranger, "optional.example")):
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            https_get(port, "/x", ctx, host=host)
    assert https_get(port, "/hello", anonymous, host="a.example")[0] == 200


def check_config(tmp_path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "check.toml"
    path.write_text(to_toml(config))
    return subprocess.run([sys.executable, "-m", "fastws", "-t", "-c", str(path)],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def ports() -> tuple[int, int]:
    return free_port(), free_port()


# --- termination ----------------------------------------------------------------------------

@pytest.mark.parametrize("relay,version", [("auto", ssl.TLSVersion.TLSv1_3),
                                           ("splice", ssl.TLSVersion.TLSv1_2)])
def test_wss_echo_small_and_16mb(make_proxy, echo_backend, ca, tmp_path, ports, relay, version):
    port, sport = ports
    cfg = tls_config(port, sport, write_cert(ca, tmp_path, "site", "localhost"),
                     echo_backend.address)
    cfg["server"][0]["location"][0]["relay"] = relay
    make_proxy(cfg, port=port)
    big = os.urandom(16 << 20)
    wss_echo(f"wss://localhost:{port}/ws", client_context(ca, maximum_version=version),
             [f"message {i}" for i in range(100)] + [big, b""])
    eng = status(sport)["engine"]
    # the tunnel's bytes went through the engine's TLS path: decrypted and encrypted in C
    assert eng["tls_tunnels_total"] == 1
    assert eng["bytes_spliced"] == 0
    assert eng["bytes_copied"] >= 4 * len(big)
    assert eng["tls_reads"] > 0 and eng["tls_writes"] > 0


def test_backend_sees_https(make_proxy, ca, tmp_path, ports):
    port, sport = ports
    backend = RawBackend(raw_echo_handler)
    cfg = tls_config(port, sport, write_cert(ca, tmp_path, "site", "localhost"), backend.address)
    cfg["server"][0]["location"][0]["set_headers"] = {"X-Scheme": "$scheme"}
    make_proxy(cfg, port=port)
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with client_context(ca).wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(upgrade_request(host="localhost", key=key))
            head, rest = read_head(s)
            assert head.startswith(b"HTTP/1.1 101")
            assert ws_accept(key) in head
            s.sendall(b"raw bytes through wss")
            got = rest
            while len(got) < 21:
                got += s.recv(100)
            assert got == b"raw bytes through wss"
    assert b"\r\nX-Forwarded-Proto: https\r\n" in backend.heads[0]
    assert b"\r\nX-Scheme: https\r\n" in backend.heads[0]
    backend.close()


def test_plain_http_and_alpn_over_tls(make_proxy, echo_backend, ca, tmp_path, ports):
    port, sport = ports
    make_proxy(tls_config(port, sport, write_cert(ca, tmp_path, "site", "localhost"),
                          echo_backend.address), port=port)
    ctx = client_context(ca)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    code, body, s = https_get(port, "/hello", ctx)
    assert (code, body) == (200, b"hello over tls")
    assert s["alpn"] == "http/1.1"
    assert s["version"] == "TLSv1.3"
    code, body, _ = https_get(port, "/status", ctx)
    assert code == 200 and b'"tunnels"' in body


def test_session_resumption(make_proxy, echo_backend, ca, tmp_path, ports):
    port, sport = ports
    make_proxy(tls_config(port, sport, write_cert(ca, tmp_path, "site", "localhost"),
                          echo_backend.address), port=port)
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = client_context(ca, maximum_version=version)
        _, _, first = https_get(port, "/hello", ctx)
        assert first["session"] is not None and not first["reused"]
        code, body, again = https_get(port, "/hello", ctx, session=first["session"])
        assert (code, body) == (200, b"hello over tls")
        assert again["reused"], version


def test_sni_selects_the_certificate(make_proxy, echo_backend, ca, tmp_path, ports):
    port, sport = ports
    a = write_cert(ca, tmp_path, "a", "a.example")
    b = write_cert(ca, tmp_path, "b", "b.example", "*.b.example")
    cfg = tls_config(port, sport, a, echo_backend.address)
    cfg["server"][0]["server_name"] = ["a.example"]
    cfg["server"].insert(1, {"listen": [f"127.0.0.1:{port}"], "server_name": ["b.example",
                                                                              "*.b.example"],
                             "tls": b, "location": [{"path": "/", "return": [200, "server b"]}]})
    make_proxy(cfg, port=port)
    ctx = client_context(ca)
    for name, body in (("a.example", b"hello over tls"), ("b.example", b"server b"),
                       ("www.b.example", b"server b")):
        code, got, s = https_get(port, "/hello", ctx, host=name)
        assert (code, got) == (200, body)
    # no SNI match: the default server's certificate, which the client then refuses for the name
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get(port, "/hello", ctx, host="c.example")
    loose = client_context(ca, check_hostname=False)
    _, _, info = https_get(port, "/hello", loose, host="c.example")
    assert [v for k, v in info["cert"]["subjectAltName"]] == ["a.example"]


def test_protocols(make_proxy, echo_backend, ca, tmp_path, ports):
    port, sport = ports
    tls = write_cert(ca, tmp_path, "site", "localhost")
    make_proxy(tls_config(port, sport, tls, echo_backend.address), port=port)
    tls12 = client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2)
    assert https_get(port, "/hello", tls12)[0] == 200
    port2, sport2 = free_port(), free_port()
    make_proxy(tls_config(port2, sport2, dict(tls, protocols=["TLSv1.3"]), echo_backend.address),
               port=port2)
    with pytest.raises(ssl.SSLError):
        https_get(port2, "/hello", tls12)
    assert https_get(port2, "/hello", client_context(ca))[0] == 200


def test_redirect_to_https(make_proxy, echo_backend, ca, tmp_path, ports):
    port, sport = ports
    cfg = tls_config(port, sport, write_cert(ca, tmp_path, "site", "localhost"),
                     echo_backend.address)
    plain = free_port()
    cfg["server"].append({"listen": [f"127.0.0.1:{plain}"], "server_name": ["localhost"],
                          "redirect_https": port})
    make_proxy(cfg, port=port)
    wait_port("127.0.0.1", plain)
    raw = read_all_from(plain, b"GET /ws?room=1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 301 ")
    assert f"\r\nLocation: https://localhost:{port}/ws?room=1\r\n".encode() in raw


def read_all_from(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        return read_all(s)


# --- faults on the TLS port -----------------------------------------------------------------

def test_bad_clients_are_closed_without_harm(make_proxy, echo_backend, ca, tmp_path, ports):
    port, sport = ports
    tls = dict(write_cert(ca, tmp_path, "site", "localhost"), handshake_timeout="500ms")
    proxy = make_proxy(tls_config(port, sport, tls, echo_backend.address), port=port)
    stalled: list[socket.socket] = []

    def faults() -> None:
        # plain HTTP to the TLS port: a plain 400, as nginx's 497
        raw = read_all_from(port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 400 ")
        # garbage: closed
        raw = read_all_from(port, b"\x16\x03\x01\x00\x05garbage" + os.urandom(300))
        assert not raw.startswith(b"HTTP/")
        # a stalled handshake: half a ClientHello, then nothing
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            stalled.append(s)

    url, ctx = f"wss://localhost:{port}/ws", client_context(ca)
    wss_echo(url, ctx, ["message"], during=faults)
    for s in stalled:
        assert s.recv(100) == b""       # closed by the handshake timeout
        s.close()
    wss_echo(url, ctx, ["after"])
    assert status(sport)["connections"]["active"] == 1     # the status request itself
    assert proxy.proc.poll() is None
    assert "timed out in the TLS handshake" in proxy.output()


# --- TLS to the upstream --------------------------------------------------------------------

class TLSBackend(RawBackend):
    """raw_echo_handler behind TLS; records the SNI each client sent."""

    def __init__(self, cert: dict[str, str]) -> None:
        self.names: list[str | None] = []
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert["certificate"], cert["key"])
        self.ctx.sni_callback = lambda s, name, c: self.names.append(name)
        super().__init__(self._handle)

    def _handle(self, conn: socket.socket, backend: RawBackend) -> None:
        conn.settimeout(10)
        try:
            tls = self.ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with tls:
            raw_echo_handler(tls, backend)


def upstream_config(port: int, backend: TLSBackend, tls: Any) -> dict[str, Any]:
    return {
        "upstream": [{"name": "backend", "servers": [backend.address], "tls": tls}],
        "server": [{"listen": [f"127.0.0.1:{port}"],
                    "location": [{"path": "/ws", "proxy_pass": "backend", "frames": False}]}],
    }


def ws_roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(upgrade_request())
        head, rest = read_head(s)
        if not head.startswith(b"HTTP/1.1 101"):
            return head
        s.sendall(payload)
        got = rest
        while len(got) < len(payload):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        return got


@pytest.mark.parametrize("trusted", [True, False])
def test_upstream_tls_verification(make_proxy, ca, tmp_path, port, trusted):
    issuer = ca if trusted else trustme.CA()
    backend = TLSBackend(write_cert(issuer, tmp_path, "backend", "backend.internal"))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    proxy = make_proxy(upstream_config(port, backend, {"ca_file": str(ca_file),
                                                       "server_name": "backend.internal"}),
                       port=port)
    payload = os.urandom(3 << 20)
    if trusted:
        assert ws_roundtrip(port, payload) == payload
        assert backend.names == ["backend.internal"]            # SNI
        assert b"\r\nX-Forwarded-Proto: http\r\n" in backend.heads[0]
        assert "verify" not in proxy.output()
    else:
        assert ws_roundtrip(port, payload).startswith(b"HTTP/1.1 502 ")
        wait_until(lambda: "upstream SSL certificate verify error" in proxy.output())
        # the same backend with verification off: the failure above was the verification
        port2 = free_port()
        make_proxy(upstream_config(port2, backend, {"verify": False}), port=port2)
        assert ws_roundtrip(port2, payload) == payload
    backend.close()


def test_proxy_pass_https_verifies_against_the_system_store(make_proxy, ca, tmp_path, port):
    # a test CA is in no system store: proxy_pass https:// verifies by default, so this is a 502
    backend = TLSBackend(write_cert(ca, tmp_path, "backend", "127.0.0.1"))
    proxy = make_proxy({"server": [{"listen": [f"127.0.0.1:{port}"], "location": [
        {"path": "/ws", "proxy_pass": f"https://{backend.address}"}]}]}, port=port)
    assert ws_roundtrip(port, b"x").startswith(b"HTTP/1.1 502 ")
    # the engine hands its error-log messages over at the end of its turn
    wait_until(lambda: "certificate verify" in proxy.output())
    assert backend.names == [None]           # an IP address is not sent as SNI
    backend.close()


# --- configuration faults -------------------------------------------------------------------

def test_certificate_problems_fail_the_config_check(ca, tmp_path, echo_backend):
    good = write_cert(ca, tmp_path, "good", "localhost")
    other = write_cert(ca, tmp_path, "other", "localhost")
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
    expired = write_cert(ca, tmp_path, "expired", "localhost",
                         not_before=past - datetime.timedelta(days=30), not_after=past)
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(Path(good["key"]).read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    cases = [
        (dict(good, certificate=str(tmp_path / "missing.crt")), "tls.certificate", "no such file"),
        (dict(good, key=str(encrypted)), "tls.key", "the key is encrypted"),
        (dict(good, key=str(tmp_path)), "tls.key", "is a directory"),
        (dict(good, key=other["key"]), "tls.key", "the key does not match the certificate"),
        (expired, "tls.certificate", "the certificate expired on"),
        (dict(good, certificate=good["key"]), "tls.certificate", "no PEM certificate"),
        (dict(good, protocols=["SSLv3"]), "tls.protocols", "unknown protocol"),
        (dict(good, ciphers="NOTHING-AT-ALL"), "tls.ciphers", "selects no cipher"),
        (dict(good, colour="blue"), "tls.colour", "unknown key"),
    ]
    for tls, key, problem in cases:
        result = check_config(tmp_path, tls_config(8443, 8080, tls, echo_backend.address))
        assert result.returncode == 1, tls
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert f"server[0].{key}: " in lines[0] and problem in lines[0], lines[0]
    assert check_config(tmp_path, tls_config(8443, 8080, good, echo_backend.address)).returncode == 0


def test_tls_and_plain_cannot_share_an_address(tmp_path, ca):
    cfg = tls_config(8443, 8080, write_cert(ca, tmp_path, "site", "localhost"), "127.0.0.1:1")
    cfg["server"][1]["listen"] = ["127.0.0.1:8443"]
    result = check_config(tmp_path, cfg)
    assert result.returncode == 1
    assert "server[1].tls: 127.0.0.1:8443 is TLS in server[0]" in result.stderr


def test_renewed_certificate_files_are_read_again(ca, tmp_path):
    """What a reload does: load the configuration and build the worker's contexts again."""
    from fastws import config as fconfig
    from fastws.tls import Contexts

    tls = write_cert(ca, tmp_path, "site", "localhost")
    path = tmp_path / "fastws.toml"
    path.write_text(to_toml(tls_config(8443, 8080, tls, "127.0.0.1:1")))

    def served_serial() -> int:
        cfg = fconfig.load(str(path))
        server_ctx = Contexts(cfg).server(cfg.servers[0])
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        client = client_context(ca).wrap_bio(c_in, c_out, server_hostname="localhost")
        server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        done = [False, False]
        for _ in range(10):
            for i, side in enumerate((client, server)):
                try:
                    side.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
            if all(done):
                break
        cert = client.getpeercert()
        assert cert is not None
        return int(str(cert["serialNumber"]), 16)

    first = served_serial()
    write_cert(ca, tmp_path, "site", "localhost")       # renewed in place
    assert served_serial() != first



# --- the recipe ----------------------------------------------------------------------------

RECIPE_HTTPS = """
[[upstream]]
name = "websocket_backend"
servers = ["{backend}"]

[[server]]
listen = ["{listen}"]
server_name = ["example.com"]
tls = {{ certificate = "{certificate}", key = "{key}" }}

[[server.location]]
path = "/ws"
proxy_pass = "http://websocket_backend"
connect_timeout = "7d"
send_timeout = "7d"
read_timeout = "7d"
"""


def test_recipe_https_block(make_proxy, echo_backend, ca, tmp_path, port):
    """The nginx recipe's HTTPS block, as docs/tls.md writes it for fastws."""
    cert = write_cert(ca, tmp_path, "example.com", "example.com")
    make_proxy(RECIPE_HTTPS.format(backend=echo_backend.address, listen=f"127.0.0.1:{port}",
                                   **cert), port=port)
    wss_echo(f"wss://example.com:{port}/ws", client_context(ca), ["through the recipe"],
             sock=socket.create_connection(("127.0.0.1", port)), server_hostname="example.com")
    headers = dict((k.lower(), v) for k, v in echo_backend.requests[-1])
    assert headers["host"] == f"example.com:{port}"
    assert headers["x-forwarded-proto"] == "https"
    assert headers["upgrade"] == "websocket"


def test_plain_request_proxied_over_https(make_proxy, ca, tmp_path, ports):
    port, sport = ports

    def answer(conn: socket.socket, backend: RawBackend) -> None:
        head, _ = read_head(conn)
        backend.heads.append(head)
        body = b"y" * 300_000
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    backend = RawBackend(answer)
    make_proxy(tls_config(port, sport, write_cert(ca, tmp_path, "site", "localhost"),
                          backend.address), port=port)
    code, body, _ = https_get(port, "/ws/plain", client_context(ca))
    assert code == 200 and body == b"y" * 300_000
    assert b"\r\nX-Forwarded-Proto: https\r\n" in backend.heads[0]
    backend.close()


def test_tls_tunnels_release_everything(make_proxy, echo_backend, ca, tmp_path, ports):
    port, sport = ports
    proxy = make_proxy(tls_config(port, sport, write_cert(ca, tmp_path, "site", "localhost"),
                                  echo_backend.address), port=port)
    ctx = client_context(ca)
    https_get(port, "/hello", ctx)
    wait_until(lambda: proxy.connections() == 0)    # that connection, closed
    baseline = proxy.fds()
    active: list[int] = []
    wss_echo(f"wss://localhost:{port}/ws", ctx, ["a", b"b" * 70000], clients=20,
             during=lambda: active.append(status(sport)["tunnels"]["active"]))
    assert active == [20]
    wait_until(lambda: status(sport)["tunnels"]["active"] == 0)
    wait_until(lambda: proxy.fds() <= baseline, timeout=5)
    assert proxy.fds() == baseline


def test_tls_client_that_stops_reading_hits_send_timeout(make_proxy, ca, tmp_path, ports):
    port, sport = ports

    def firehose(conn: socket.socket, backend: RawBackend) -> None:
        from support import ws_upgrade_handler
        ws_upgrade_handler(conn, backend)
        chunk = b"z" * 65536
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            conn.sendall(chunk)

    backend = RawBackend(firehose)
    cfg = tls_config(port, sport, write_cert(ca, tmp_path, "site", "localhost"), backend.address)
    cfg["server"][0]["location"][0]["send_timeout"] = "1s"
    make_proxy(cfg, port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with client_context(ca).wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(upgrade_request(host="localhost"))
            head, _ = read_head(s)
            assert head.startswith(b"HTTP/1.1 101")
            wait_until(lambda: status(sport)["engine"]["send_timeouts"] > 0, timeout=15)
    engine = status(sport)["engine"]
    assert engine["send_timeouts"] == 1 and engine["tunnels_active"] == 0
    backend.close()


def test_other_tls_settings_fail_the_config_check(ca, tmp_path):
    site = write_cert(ca, tmp_path, "site", "localhost")
    cases = []
    cfg = tls_config(8443, 8080, site, "127.0.0.1:1")
    cfg["upstream"][0]["tls"] = {"ca_file": str(tmp_path / "missing-ca.pem")}
    cases.append((cfg, "upstream.backend.tls.ca_file: ", "no such file"))
    cfg = tls_config(8443, 8080, site, "127.0.0.1:1")
    cfg["upstream"][0]["tls"] = {"ca_file": site["key"]}
    cases.append((cfg, "upstream.backend.tls.ca_file: ", "no CA certificate could be loaded"))
    cfg = tls_config(8443, 8080, site, "127.0.0.1:1")
    cfg["server"][0]["redirect_https"] = True
    cases.append((cfg, "server[0].redirect_https: ", "applies to a plain-HTTP server"))
    cfg = tls_config(8443, 8080, site, "127.0.0.1:1")
    cfg["server"][0]["location"][0]["proxy_pass"] = "wss://127.0.0.1:1"
    cases.append((cfg, "proxy_pass: ", "unsupported scheme 'wss'"))
    cfg = tls_config(8443, 8080, {**site, "verify_client": "on"}, "127.0.0.1:1")
    cases.append((cfg, "server[0].tls.verify_client: ", "needs client_ca"))
    cfg = tls_config(8443, 8080, {**site, "verify_client": "sometimes",
                                  "client_ca": site["certificate"]}, "127.0.0.1:1")
    cases.append((cfg, "server[0].tls.verify_client: ", "expected \"on\", \"optional\""))
    cfg = tls_config(8443, 8080, {**site, "verify_client": "optional",
                                  "client_ca": site["key"]}, "127.0.0.1:1")
    cases.append((cfg, "server[0].tls.client_ca: ", "cannot load the CA certificates"))
    for cfg, key, problem in cases:
        result = check_config(tmp_path, cfg)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and key in lines[0] and problem in lines[0], result.stderr


def test_engine_borrows_a_context_only_when_openssl_agrees():
    """The engine finds the SSL_CTX* inside CPython's private _ssl object, and checks it
    against an SSL object the ssl module made from the same context."""
    from fastws import _engine, tls

    assert tls.engine_problem() is None
    _engine.check_tls_context(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    _engine.check_tls_context(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    with pytest.raises((TypeError, AttributeError)):
        _engine.check_tls_context(object())
