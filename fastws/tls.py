"""TLS: the contexts of termination on listeners (wss://, https://) and of TLS to upstreams.

Certificates, SNI's choices, ALPN, protocols, ciphers, session resumption and upstream
verification are OpenSSL's, configured here through ssl.SSLContext, once per worker.  The
engine runs every handshake itself on OpenSSL objects it makes from these contexts, and reads
and writes through them, so no Python code runs per connection (engine/tls.pxi,
includes/openssl.h).

Files are read when the configuration is loaded (a missing or unreadable file, a key that does
not match, an expired certificate: one line, as any configuration mistake) and again when a
worker builds its contexts, so a reload picks up renewed certificates.
"""

from __future__ import annotations

import base64
import functools
import re
import ssl
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

# nginx's ssl_protocols names.
PROTOCOLS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """A server's TLS termination (nginx's ssl_* directives); file paths are absolute."""

    certificate: str
    key: str
    protocols: tuple[str, ...] = ("TLSv1.2", "TLSv1.3")
    ciphers: str = "HIGH:!aNULL:!MD5"
    handshake_timeout: float = 60.0
    session_tickets: bool = True
    verify_client: str = "off"     # "on": a client certificate signed by client_ca is required;
    client_ca: str | None = None   # "optional": checked if the client sends one


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    """TLS to an upstream (nginx's proxy_ssl_*), with verification on by default."""

    verify: bool = True
    ca_file: str | None = None
    server_name: str | None = None  # SNI and the name verified; default: each server's host


def check_engine(config: Any) -> None:
    """Raise ConfigError (naming the first key that needs TLS) when the engine cannot do TLS
    with this Python's ssl module; `fastws -t` and every worker check it."""
    from .errors import ConfigError
    uses = any(s.tls is not None or any(loc.proxy_tls for loc in s.locations)
               for s in config.servers) or any(up.tls is not None for up in config.upstreams)
    problem = engine_problem() if uses else None
    if problem is None:
        return
    for si, server in enumerate(config.servers):
        if server.tls is not None:
            raise ConfigError(config.source, f"server[{si}].tls", f"TLS is not available: {problem}")
        for li, loc in enumerate(server.locations):
            if loc.proxy_tls:
                raise ConfigError(config.source, f"server[{si}].location[{li}].proxy_pass",
                                  f"TLS is not available: {problem}")
    for up in config.upstreams:
        if up.tls is not None and not up.implicit:
            raise ConfigError(config.source, f"upstream.{up.name}.tls",
                              f"TLS is not available: {problem}")


@functools.cache
def engine_problem() -> str | None:
    """Why the engine cannot use this Python's ssl module, or None: the engine's own check of
    how it borrows a context, once per process."""
    from . import _engine
    try:
        _engine.check_tls_context(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    except (RuntimeError, TypeError, OSError) as exc:
        return str(exc)
    return None


class Problem(Exception):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


def _no_passphrase() -> bytes:
    raise Problem("key", "the key is encrypted; fastws needs an unencrypted key file")


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
    """An SSLContext for a server block; raises Problem naming the key at fault."""
    with open(conf.certificate, "rb") as f:
        pem = f.read()
    not_after = _not_after(pem)
    if not_after is None:
        raise Problem("certificate", "no PEM certificate in the file")
    if not_after < datetime.now(timezone.utc):
        raise Problem("certificate", f"the certificate expired on {not_after:%Y-%m-%d %H:%M} UTC")
    with open(conf.key, "rb") as f:
        if b"ENCRYPTED" in f.read(4096):
            _no_passphrase()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(conf.certificate, conf.key, password=_no_passphrase)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or exc.reason == "KEY_VALUES_MISMATCH":
            raise Problem("key", "the key does not match the certificate") from None
        raise Problem("key", f"cannot load the certificate and key: {exc.reason or exc}") from None
    versions = sorted(PROTOCOLS[p] for p in conf.protocols)
    try:
        if versions[0] < ssl.TLSVersion.TLSv1_2:
            # OpenSSL 3 refuses TLS 1.0/1.1's SHA-1 signatures at its default security level.
            ctx.set_ciphers(conf.ciphers + ":@SECLEVEL=0")
        else:
            ctx.set_ciphers(conf.ciphers)
    except ssl.SSLError:
        raise Problem("ciphers", f"{conf.ciphers!r} selects no cipher") from None
    ctx.minimum_version = versions[0]
    ctx.maximum_version = versions[-1]
    ctx.set_alpn_protocols(["http/1.1"])
    # Renegotiation is refused: a tunnel's bytes belong to the application.
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    if not conf.session_tickets:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    if conf.verify_client != "off" and conf.client_ca is not None:
        # nginx's ssl_verify_client and ssl_client_certificate: a certificate that does not
        # verify against client_ca ends the handshake (with "on", so does none at all)
        try:
            ctx.load_verify_locations(cafile=conf.client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise Problem("client_ca", f"cannot load the CA certificates: "
                          f"{getattr(exc, 'reason', None) or exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if conf.verify_client == "on" else ssl.CERT_OPTIONAL
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
            raise Problem("ca_file", f"no CA certificate could be loaded: {exc.reason or exc}") \
                from None
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    return ctx


class UpstreamContext:
    """TLS to the servers of one upstream group (or one proxy_pass https://)."""

    __slots__ = ("conf", "context")

    def __init__(self, conf: UpstreamTLS) -> None:
        self.conf = conf
        self.context = upstream_context(conf)


class Contexts:
    """A worker's TLS contexts, built from the files as they are now."""

    def __init__(self, config: Any) -> None:
        self._servers: dict[int, ssl.SSLContext] = {}
        self._upstreams: dict[str, UpstreamContext] = {}
        self._default: UpstreamContext | None = None
        for server in config.servers:
            if server.tls is not None:
                self._servers[id(server)] = server_context(server.tls)
        for up in config.upstreams:
            if up.tls is not None:
                self._upstreams[up.name] = UpstreamContext(up.tls)

    def server(self, server: Any) -> ssl.SSLContext | None:
        return self._servers.get(id(server))

    def upstream(self, loc: Any) -> UpstreamContext | None:
        """TLS to the upstream of a location: an upstream with tls, or proxy_pass https://."""
        ctx = self._upstreams.get(loc.proxy_pass or "")
        if ctx is None and loc.proxy_tls:
            if self._default is None:
                self._default = UpstreamContext(UpstreamTLS())
            ctx = self._default
        return ctx
