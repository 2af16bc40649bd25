"""TLS: termination on listeners (wss://, https://) and TLS to upstreams.

The handshake runs once per connection in Python, with the ssl module, on the raw non-blocking
socket: certificates, SNI, ALPN, protocols, ciphers, session resumption and upstream verification
are OpenSSL's, configured through ssl.SSLContext.  Once a tunnel is established the relay engine
borrows the connection's SSL* and reads and writes through it in its native thread, so no Python
code runs per message (see _splice.pyx and includes/openssl.h).

Files are read when the configuration is loaded (a missing or unreadable file, a key that does
not match, an expired certificate: one line, as any config mistake) and again when a worker
builds its contexts, so a reload picks up renewed certificates.
"""

from __future__ import annotations

import base64
import errno
import functools
import logging
import os
import re
import socket
import ssl
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from .config import ServerBlock, TLSConfig, UpstreamTLS, _Reader
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config, LocationConfig
    from .proxy import ClientConn
    from .router import Router

log = logging.getLogger("fastws")

# nginx's ssl_protocols names.
PROTOCOLS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)


# --- configuration ------------------------------------------------------------------------

def _path(r: _Reader, name: str, value: str) -> str:
    # Relative paths are relative to the configuration file, as nginx's are to its conf dir.
    base = os.path.dirname(os.path.abspath(r.source)) if not r.source.startswith("<") \
        else os.getcwd()
    path = os.path.join(base, os.path.expanduser(value))
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise r.fail(name, f"{value}: no such file") from None
    except OSError as exc:
        raise r.fail(name, f"{value}: {(exc.strerror or str(exc)).lower()}") from None
    return path


@functools.cache
def engine_problem() -> str | None:
    """Why the relay engine cannot relay TLS with this Python's ssl module, or None: the
    engine's own check on a throwaway connection object, once per process."""
    from . import _splice
    a, b = socket.socketpair()
    try:
        s = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_socket(
            a, server_hostname="check.invalid", do_handshake_on_connect=False)
        try:
            _splice.check_ssl(sslobj(s), s.fileno())
        finally:
            s.close()
    except (RuntimeError, TypeError, OSError) as exc:
        return str(exc)
    finally:
        a.close()
        b.close()
    return None


def _check_engine(r: _Reader) -> None:
    problem = engine_problem()
    if problem is not None:
        raise r.fail("tls", f"TLS is not available: {problem}")


def read_server_tls(server: _Reader) -> TLSConfig | None:
    """The `tls` table of a [[server]], with every file checked (config.py calls this)."""
    table = server.get("tls", dict, None)
    if table is None:
        return None
    _check_engine(server)
    r = _Reader(server.source, table, server.key("tls"))
    cert = _path(r, "certificate", r.get("certificate", str, required=True))
    key = _path(r, "key", r.get("key", str, required=True))
    protocols = r.strings("protocols", ("TLSv1.2", "TLSv1.3"))
    for p in protocols:
        if p not in PROTOCOLS:
            raise r.fail("protocols", f"unknown protocol {p!r} (one of {', '.join(PROTOCOLS)}; "
                         "SSLv2 and SSLv3 are not supported)")
    if not protocols:
        raise r.fail("protocols", "needs at least one protocol")
    ciphers = r.get("ciphers", str, "HIGH:!aNULL:!MD5")
    timeout = r.duration("handshake_timeout", 60.0)
    if timeout <= 0:
        raise r.fail("handshake_timeout", "must be greater than zero")
    tickets = r.get("session_tickets", bool, True)
    r.finish()
    conf = TLSConfig(cert, key, tuple(protocols), ciphers, timeout, tickets)
    try:
        server_context(conf)
    except _Problem as exc:
        raise r.fail(exc.key, exc.problem) from None
    return conf


def read_upstream_tls(upstream: _Reader) -> UpstreamTLS | None:
    """`tls = true` or `tls = {verify, ca_file, server_name}` on an [[upstream]]."""
    value = upstream.get("tls", (bool, dict), None)
    if value is None or value is False:
        return None
    _check_engine(upstream)
    if value is True:
        return UpstreamTLS()
    r = _Reader(upstream.source, value, upstream.key("tls"))
    verify = r.get("verify", bool, True)
    ca_raw = r.get("ca_file", str, None)
    ca_file = _path(r, "ca_file", ca_raw) if ca_raw is not None else None
    name = r.get("server_name", str, None)
    r.finish()
    conf = UpstreamTLS(verify, ca_file, name)
    try:
        upstream_context(conf)
    except _Problem as exc:
        raise r.fail(exc.key, exc.problem) from None
    return conf


def check_listeners(source: str, servers: tuple[ServerBlock, ...]) -> None:
    """An address is TLS or plain for every server on it (nginx's `listen ... ssl`); and a
    proxy_pass https:// needs an engine that can relay TLS."""
    seen: dict[tuple[str, int], tuple[int, bool]] = {}
    for si, server in enumerate(servers):
        for li, loc in enumerate(server.locations):
            if loc.proxy_tls and engine_problem() is not None:
                raise ConfigError(source, f"server[{si}].location[{li}].proxy_pass",
                                  f"TLS is not available: {engine_problem()}")
        for addr in server.listen:
            first = seen.setdefault((addr.host, addr.port), (si, server.tls is not None))
            if first[1] != (server.tls is not None):
                raise ConfigError(source, f"server[{si}].tls",
                                  f"{addr.text} is {'TLS' if first[1] else 'plain HTTP'} in "
                                  f"server[{first[0]}]: every server on an address must agree")


class _Problem(Exception):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


def _no_passphrase() -> bytes:
    raise _Problem("key", "the key is encrypted; fastws needs an unencrypted key file")


def _not_after(pem: bytes) -> datetime | None:
    # The leaf certificate's notAfter, read from the DER: Certificate -> tbsCertificate ->
    # [version], serialNumber, signature, issuer, validity { notBefore, notAfter } (RFC 5280).
    m = _PEM_CERT.search(pem)
    if m is None:
        return None
    try:
        der = base64.b64decode(b"".join(m.group(1).split()))

        def tlv(pos: int) -> tuple[int, int, int]:
            tag, length = der[pos], der[pos + 1]
            pos += 2
            if length & 0x80:
                n = length & 0x7F
                length = int.from_bytes(der[pos:pos + n], "big")
                pos += n
            return tag, pos, pos + length

        _, p, _ = tlv(0)
        _, p, _ = tlv(p)
        tag, _, end = tlv(p)
        if tag == 0xA0:
            p = end
        for _ in range(3):
            p = tlv(p)[2]
        _, p, _ = tlv(p)
        p = tlv(p)[2]
        tag, start, end = tlv(p)
        text = der[start:end].decode("ascii")
        fmt = "%y%m%d%H%M%SZ" if tag == 0x17 else "%Y%m%d%H%M%SZ"
        return datetime.strptime(text, fmt).replace(tzinfo=timezone.utc)
    except (IndexError, ValueError):
        return None


def server_context(conf: TLSConfig) -> ssl.SSLContext:
    """An SSLContext for a server block; raises _Problem naming the key at fault."""
    with open(conf.certificate, "rb") as f:
        pem = f.read()
    not_after = _not_after(pem)
    if not_after is None:
        raise _Problem("certificate", "no PEM certificate in the file")
    if not_after < datetime.now(timezone.utc):
        raise _Problem("certificate", f"the certificate expired on {not_after:%Y-%m-%d %H:%M} UTC")
    with open(conf.key, "rb") as f:
        if b"ENCRYPTED" in f.read(4096):
            _no_passphrase()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(conf.certificate, conf.key, password=_no_passphrase)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or exc.reason == "KEY_VALUES_MISMATCH":
            raise _Problem("key", "the key does not match the certificate") from None
        raise _Problem("key", f"cannot load the certificate and key: {exc.reason or exc}") from None
    versions = sorted(PROTOCOLS[p] for p in conf.protocols)
    try:
        if versions[0] < ssl.TLSVersion.TLSv1_2:
            # OpenSSL 3 refuses TLS 1.0/1.1's SHA-1 signatures at its default security level.
            ctx.set_ciphers(conf.ciphers + ":@SECLEVEL=0")
        else:
            ctx.set_ciphers(conf.ciphers)
    except ssl.SSLError:
        raise _Problem("ciphers", f"{conf.ciphers!r} selects no cipher") from None
    ctx.minimum_version = versions[0]
    ctx.maximum_version = versions[-1]
    ctx.set_alpn_protocols(["http/1.1"])
    # Renegotiation would run the handshake again inside the relay engine's thread: refused.
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    if not conf.session_tickets:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    ctx.sslsocket_class = _TLSSocket
    return ctx


def upstream_context(conf: UpstreamTLS) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if conf.verify:
        try:
            if conf.ca_file:
                ctx.load_verify_locations(cafile=conf.ca_file)
            else:
                ctx.load_default_certs()
        except ssl.SSLError as exc:
            raise _Problem("ca_file", f"no CA certificate could be loaded: {exc.reason or exc}") \
                from None
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    ctx.sslsocket_class = _TLSSocket
    return ctx


# --- sockets ------------------------------------------------------------------------------

class _TLSSocket(ssl.SSLSocket):
    """An SSLSocket that behaves as the plain non-blocking sockets proxy.py drives: a read or
    write that must wait raises BlockingIOError, a read also returns what OpenSSL holds."""

    fastws_route: Callable[[str], ssl.SSLContext | None] | None = None

    def recv(self, buflen: int = 65536, flags: int = 0) -> bytes:
        try:
            data = super().recv(buflen, flags)
            pending = self.pending()
            if data and pending:
                data += super().recv(pending)
            return data
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError(errno.EAGAIN, "TLS record incomplete") from None

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            return super().send(data, flags)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError(errno.EAGAIN, "TLS write must wait") from None

    def shutdown(self, how: int) -> None:
        # close_notify first (best effort: the peer's is never waited for), then the FIN
        obj = sslobj(self)
        if obj is not None and how != socket.SHUT_RD:
            try:
                obj.shutdown()
            except (ssl.SSLError, OSError, ValueError):
                pass
        socket.socket.shutdown(self, how)


def sslobj(sock: Any) -> Any:
    """What the relay engine needs of a TLS socket (None for a plain one); call before detach."""
    return getattr(sock, "_sslobj", None)


def _sni(sock: Any, name: str | None, ctx: ssl.SSLContext) -> None:
    route = getattr(sock, "fastws_route", None)
    if route is not None and name:
        chosen = route(name.lower())
        if chosen is not None and chosen is not ctx:
            sock.context = chosen
    return None


class _Handshake:
    """Drives do_handshake() on a non-blocking TLS socket from the event loop."""

    __slots__ = ("loop", "sock", "fd", "done", "failed")

    def __init__(self, loop: Any, sock: ssl.SSLSocket, done: Callable[[], None],
                 failed: Callable[[BaseException], None], *, server_side: bool) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.done = done
        self.failed = failed
        if server_side:
            # the client speaks first; and a failure must not come back inside accept()
            loop.add_reader(self.fd, self.step)
        else:
            self.step()

    def step(self) -> None:
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.loop.add_reader(self.fd, self.step)
        except ssl.SSLWantWriteError:
            self.loop.add_writer(self.fd, self.step)
        except (OSError, ValueError) as exc:
            self.failed(exc)
        else:
            self.done()


class ListenerTLS:
    """TLS of one listen address: the default server's context and the SNI choice among the
    servers on the address, by their server_name (router rules)."""

    def __init__(self, contexts: dict[int, ssl.SSLContext], router: "Router",
                 key: tuple[str, int], default: ServerBlock) -> None:
        self.contexts = contexts
        self.router = router
        self.key = key
        self.context = contexts[id(default)]
        assert default.tls is not None
        self.handshake_timeout = default.tls.handshake_timeout

    def route(self, name: str) -> ssl.SSLContext | None:
        return self.contexts.get(id(self.router.server(self.key, name)))

    def accept(self, conn: "ClientConn") -> None:
        """Wrap a just-accepted client socket and handshake; then conn._start_reading()."""
        try:
            sock = self.context.wrap_socket(conn.sock, server_side=True,
                                            do_handshake_on_connect=False)
        except OSError:
            conn.abort()
            return
        sock.fastws_route = self.route  # type: ignore[attr-defined]
        conn.sock = sock
        conn.timer = conn.loop.call_later(self.handshake_timeout, self._timeout, conn)
        _Handshake(conn.loop, sock, lambda: self._done(conn), lambda e: self._failed(conn, e),
                   server_side=True)

    def _done(self, conn: "ClientConn") -> None:
        if conn.closed:
            return
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        conn._start_reading()

    def _timeout(self, conn: "ClientConn") -> None:
        conn.timer = None
        log.info("client %s timed out in the TLS handshake", conn.remote_addr)
        conn.abort()

    def _failed(self, conn: "ClientConn", exc: BaseException) -> None:
        if conn.closed:
            return
        if isinstance(exc, ssl.SSLError) and exc.reason == "HTTP_REQUEST":
            # nginx's 497: a plain HTTP request on an HTTPS port gets a plain 400
            conn.sock = socket.socket(fileno=conn.sock.detach())
            conn._fail(400, "the plain HTTP request was sent to an HTTPS port")
            return
        log.info("TLS handshake with %s failed: %s", conn.remote_addr,
                 getattr(exc, "reason", None) or exc)
        conn.abort()


class UpstreamTLSConnect:
    """TLS to the servers of one upstream group."""

    def __init__(self, conf: UpstreamTLS) -> None:
        self.conf = conf
        self.context = upstream_context(conf)

    def server_name(self, peer: Any) -> str | None:
        if self.conf.server_name:
            return self.conf.server_name
        host = peer.server.rsplit(":", 1)[0] if not peer.server.startswith("[") \
            else peer.server[1:].split("]", 1)[0]
        return None if host.startswith("unix") else host

    def connect(self, conn: "ClientConn", timeout: float) -> None:
        """Handshake on conn.usock (connected); then conn._upstream_ready() or
        conn._upstream_failed(why)."""
        name = self.server_name(conn.peer)
        assert conn.usock is not None
        try:
            sock = self.context.wrap_socket(conn.usock, server_side=False, server_hostname=name,
                                            do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            conn._upstream_failed(f"cannot start TLS to the upstream: {exc}", timeout=False)
            return
        conn.usock = sock
        conn.timer = conn.loop.call_later(timeout, self._timeout, conn)
        _Handshake(conn.loop, sock, lambda: self._done(conn), lambda e: self._failed(conn, e),
                   server_side=False)

    def _done(self, conn: "ClientConn") -> None:
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        conn._upstream_ready()

    def _timeout(self, conn: "ClientConn") -> None:
        conn.timer = None
        conn._upstream_failed("upstream timed out (110: Connection timed out) while SSL "
                             "handshaking to upstream", timeout=True)

    def _failed(self, conn: "ClientConn", exc: BaseException) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if isinstance(exc, ssl.SSLCertVerificationError):
            why = f"upstream SSL certificate verify error: ({exc.verify_code}:" \
                  f"{exc.verify_message}) while SSL handshaking to upstream"
        else:
            why = f"SSL handshake to upstream failed: {getattr(exc, 'reason', None) or exc}"
        conn._upstream_failed(why, timeout=False)


class WorkerTLS:
    """The TLS contexts of a worker, built from the files as they are now."""

    def __init__(self, config: "Config", router: "Router") -> None:
        self.router = router
        self.servers: dict[int, ssl.SSLContext] = {}
        self.upstreams: dict[str, UpstreamTLSConnect] = {}
        self.default_upstream: UpstreamTLSConnect | None = None
        for server in config.servers:
            if server.tls is not None:
                ctx = server_context(server.tls)
                ctx.sni_callback = _sni
                self.servers[id(server)] = ctx
        for up in config.upstreams:
            if up.tls is not None:
                self.upstreams[up.name] = UpstreamTLSConnect(up.tls)

    def listener(self, key: tuple[str, int], default: ServerBlock) -> ListenerTLS | None:
        if default.tls is None:
            return None
        return ListenerTLS(self.servers, self.router, key, default)

    def for_location(self, loc: "LocationConfig") -> UpstreamTLSConnect | None:
        """TLS to the upstream of a location: proxy_pass https://, or an upstream with tls."""
        conn = self.upstreams.get(loc.proxy_pass or "")
        if conn is None and loc.proxy_tls:
            if self.default_upstream is None:
                self.default_upstream = UpstreamTLSConnect(UpstreamTLS())
            conn = self.default_upstream
        return conn
