"""Addresses: listen and upstream addresses as written, and upstream servers checked and
resolved once, when the configuration is loaded.

Each server entry of an upstream group becomes its peers: one per address, as nginx's
ngx_parse_url / ngx_inet_resolve_host make them (IPv4 addresses first, then IPv6; a unix
socket path is one peer), primaries in the order written, then the backups.  Everything here is
plain data: balancer.py builds the compiled groups the engine selects from out of it, in every
worker, without resolving or checking anything again.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

from .errors import ConfigError


@dataclass(frozen=True, slots=True)
class Address:
    """A listen or upstream address as written, with what a socket needs."""

    text: str
    host: str
    port: int
    family: int

    @property
    def sockaddr(self) -> tuple[str, int]:
        return (self.host, self.port)


def parse_address(text: Any, *, default_port: int | None = None) -> Address:
    """Parse "host:port", "[v6]:port", or "port" (all IPv4 addresses) into an Address."""

    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str) or not text:
        raise ValueError("an address is a string \"host:port\" (IPv6 in brackets)")
    if text.isdigit():
        host, port_s = "0.0.0.0", text
    elif text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':port' after ']'")
        port_s = rest[1:]
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep:
            host, port_s = text, ""
        elif ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, as \"[::1]:8080\"")
    if not port_s:
        if default_port is None:
            raise ValueError(f"{text!r}: a port is required")
        port = default_port
    else:
        if not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise ValueError(f"{text!r}: {port_s!r} is not a port number (1-65535)")
        port = int(port_s)
    if not host:
        raise ValueError(f"{text!r}: a host is required")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
            raise ValueError(f"{text!r}: {host!r} is neither an IP address nor a host name") from None
        family = socket.AF_UNSPEC
    else:
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return Address(text, host, port, family)


# The ketama ring holds 160 points per weight unit; keep building it well under a second.
MAX_WEIGHT = 10000
MAX_CHASH_WEIGHT = 20000
# sizeof(sockaddr_un.sun_path) on Linux, less the terminating NUL.
MAX_UNIX_PATH = 107


class PeerSpec(NamedTuple):
    """One peer: an address of a server entry, with the entry's settings."""

    server_index: int  # the entry in the group's servers
    server: str  # the entry's address as written (the consistent-hash ring hashes it)
    name: str  # the address text, as nginx names a peer in $upstream_addr
    family: int
    sockaddr: Any  # as Python's socket module takes it
    weight: int
    max_fails: int
    fail_timeout: float
    max_conns: int
    backup: bool
    down: bool


def resolve(source: str, where: str, servers: Sequence[Any],
            answers: dict[str, tuple[str, ...]] | None = None) -> tuple[PeerSpec, ...]:
    """The peers of a group's server entries (ServerConfig), checked: primaries first.  A
    `resolve` entry stands for its name's addresses in `answers` (fastws/dns.py), each one a
    server of its own, in sorted order."""
    if not servers:
        raise ConfigError(source, f"{where}.servers", "needs at least one server")
    if any(getattr(s, "resolve", False) for s in servers):
        servers = _expand(servers, answers or {})
    peers: list[PeerSpec] = []
    seen: dict[str, int] = {}
    for i, server in enumerate(servers):
        key = f"{where}.servers[{i}]"
        _check_server(source, key, server)
        ident = _identity(server.address) if isinstance(server.address, str) else ""
        if ident in seen:
            raise ConfigError(source, key, f"duplicate server {server.address!r} "
                              f"(already servers[{seen[ident]}])")
        seen[ident] = i
        for name, family, sockaddr in _addresses(source, key, server.address):
            peers.append(PeerSpec(i, server.address, name, family, sockaddr, server.weight,
                                  server.max_fails, float(server.fail_timeout),
                                  server.max_conns, bool(server.backup), bool(server.down)))
    primary = [p for p in peers if not p.backup]
    if not primary:
        raise ConfigError(source, f"{where}.servers",
                          "needs at least one server that is not a backup")
    # nginx orders peers by server entry; backups form their own tier after the primaries.
    return tuple(primary + [p for p in peers if p.backup])


def _expand(servers: Sequence[Any], answers: dict[str, tuple[str, ...]]) -> list[Any]:
    from dataclasses import replace
    out: list[Any] = []
    listed = {_identity(s.address) for s in servers if not getattr(s, "resolve", False)
              and isinstance(s.address, str)}
    for server in servers:
        if not getattr(server, "resolve", False):
            out.append(server)
            continue
        addr = parse_address(server.address)
        for ip in answers.get(addr.host, ()):
            text = f"[{ip}]:{addr.port}" if ":" in ip else f"{ip}:{addr.port}"
            if _identity(text) not in listed:      # (an address two names share: once)
                listed.add(_identity(text))
                out.append(replace(server, address=text, resolve=False))
    return out


def _addresses(source: str, key: str, text: Any) -> list[tuple[str, int, Any]]:
    """(name, family, sockaddr) for each address of one server entry."""
    if not isinstance(text, str) or not text:
        raise ConfigError(source, key, "a server address is a string \"host:port\"")
    if text[:5].lower() == "unix:":
        path = text[5:]
        if not path:
            raise ConfigError(source, key, f"{text!r}: a unix socket path is required")
        if len(path.encode()) > MAX_UNIX_PATH:
            raise ConfigError(source, key, f"{text!r}: a unix socket path is at most "
                              f"{MAX_UNIX_PATH} bytes")
        return [(text, socket.AF_UNIX, path)]
    try:
        addr = parse_address(text)
    except ValueError as exc:
        raise ConfigError(source, key, str(exc)) from None
    if addr.family != socket.AF_UNSPEC:
        ip = ipaddress.ip_address(addr.host)
        if ip.version == 6:
            return [(f"[{ip.compressed}]:{addr.port}", socket.AF_INET6,
                     (ip.compressed, addr.port, 0, 0))]
        return [(f"{ip}:{addr.port}", socket.AF_INET, (str(ip), addr.port))]
    try:
        infos = socket.getaddrinfo(addr.host, addr.port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                   0, socket.AI_ADDRCONFIG)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) and exc.strerror else str(exc)
        raise ConfigError(source, key, f"host {addr.host!r} not found ({reason})") from None
    out: list[tuple[str, int, Any]] = []
    seen: set[str] = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        for fam, _type, _proto, _canon, info in infos:
            if fam != family:
                continue
            sockaddr: tuple[Any, ...] = tuple(info)
            if fam == socket.AF_INET:
                name = f"{sockaddr[0]}:{addr.port}"
                sa: Any = (sockaddr[0], addr.port)
            else:
                name = f"[{sockaddr[0]}]:{addr.port}"
                sa = (sockaddr[0], addr.port, sockaddr[2], sockaddr[3])
            if name not in seen:
                seen.add(name)
                out.append((name, fam, sa))
    if not out:
        raise ConfigError(source, key, f"host {addr.host!r} has no IPv4 or IPv6 address")
    return out


def host_of(server_text: str) -> str:
    """A server entry's host as written (its TLS name and SNI, a health check's Host)."""
    if server_text.startswith("["):
        return server_text[1:].split("]", 1)[0]
    if server_text.startswith("unix:"):
        return ""
    return server_text.rsplit(":", 1)[0]


def _identity(text: str) -> str:
    """What makes two server entries the same server (for the duplicate check)."""
    if text[:5].lower() == "unix:":
        return "unix:" + text[5:]
    try:
        addr = parse_address(text)
    except ValueError:
        return text
    if addr.family != socket.AF_UNSPEC:
        ip = ipaddress.ip_address(addr.host)
        return f"{ip.compressed}|{addr.port}"
    return f"{addr.host.lower()}|{addr.port}"


def _check_server(source: str, key: str, server: Any) -> None:
    def bad_int(value: Any, minimum: int) -> bool:
        return isinstance(value, bool) or not isinstance(value, int) or value < minimum

    if bad_int(server.weight, 1) or server.weight > MAX_WEIGHT:
        raise ConfigError(source, f"{key}.weight",
                          f"weight must be a whole number from 1 to {MAX_WEIGHT}, "
                          f"got {server.weight!r}")
    if bad_int(server.max_fails, 0):
        raise ConfigError(source, f"{key}.max_fails",
                          f"max_fails must be a whole number, 0 or more, got {server.max_fails!r}")
    if bad_int(server.max_conns, 0):
        raise ConfigError(source, f"{key}.max_conns",
                          f"max_conns must be a whole number, 0 or more, got {server.max_conns!r}")
    if (isinstance(server.fail_timeout, bool) or not isinstance(server.fail_timeout, (int, float))
            or not server.fail_timeout >= 0):
        raise ConfigError(source, f"{key}.fail_timeout",
                          f"fail_timeout must be a duration, 0 or more, got {server.fail_timeout!r}")
