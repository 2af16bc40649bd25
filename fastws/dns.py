"""Upstream servers that follow DNS (`resolve = true` on a server, nginx's `server NAME
resolve`).

A name is looked up through the configured resolvers (`[resolver]`, nginx's `resolver ADDR
valid=TIME`; the system's /etc/resolv.conf when none is given) with dnspython: its A and AAAA
records, and their TTL, bounded below and above by `min_ttl` and `max_ttl`.  The configuration
lists each address as a server of its own, sorted, with the name's parameters (weight,
max_fails, ...): so a consistent-hash ring's points are the addresses' own and a change moves only
the keys of the addresses that came or went, and two instances that got the same addresses in
another order choose alike.  The master watches the names in a thread (`Watcher`) and, when an
answer changes, tells each worker, which builds the group again and puts it in place in its
engine (Worker.renew_upstream, Engine.replace_group), as nginx 1.27's resolve does on its shared
upstream zone: no new generation, every connection goes on; those to an address that left are
closed after the upstream's `drain_timeout`.

dnspython: a well-kept resolver that reads /etc/resolv.conf, speaks to a given server and port,
and returns the TTLs (getaddrinfo does neither of the last two).
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger("fastws")


@dataclass(frozen=True, slots=True)
class ResolverConfig:
    """`[resolver]`: where names are looked up, and how long an answer is kept."""

    addresses: tuple[tuple[str, int], ...] = ()   # (IP, port); (): the system's resolv.conf
    timeout: float = 2.0
    min_ttl: float = 1.0
    max_ttl: float = 300.0       # an answer is asked again this soon at least
    families: tuple[str, ...] = ("A", "AAAA")     # nginx's ipv4=off / ipv6=off leave one out


# `fastws -s`: a configuration read only for its pid file and drain setting, with no look-up
# (DNS may be down, or the name's Service already deleted, when a pod stops)
_OFFLINE: ContextVar[bool] = ContextVar("offline", default=False)
PLACEHOLDER = "192.0.2.1"        # TEST-NET-1 (RFC 5737): an address never connected to


# a reload: the names the master follows already keep their last answers (the watcher brings
# changes); only new names are looked up, so that a reload never waits on a slow DNS for them
_KNOWN: ContextVar[dict[str, tuple[str, ...]]] = ContextVar("known", default={})


@contextmanager
def offline() -> Iterator[None]:
    token = _OFFLINE.set(True)
    try:
        yield
    finally:
        _OFFLINE.reset(token)


@contextmanager
def known(answers: dict[str, tuple[str, ...]]) -> Iterator[None]:
    token = _KNOWN.set(answers)
    try:
        yield
    finally:
        _KNOWN.reset(token)


class LookupError_(Exception):
    """A name could not be looked up (the message says why)."""


def lookup(name: str, resolver: ResolverConfig) -> tuple[tuple[str, ...], float]:
    """The name's addresses (IPv4 then IPv6, each sorted) and how long to keep them."""
    if _OFFLINE.get():
        return (PLACEHOLDER,), resolver.max_ttl
    if name in _KNOWN.get():
        return _KNOWN.get()[name], resolver.min_ttl
    import dns.exception
    import dns.resolver
    try:
        r = dns.resolver.Resolver(configure=not resolver.addresses)
    except (dns.exception.DNSException, OSError) as exc:   # no usable /etc/resolv.conf
        raise LookupError_(f"{name}: {type(exc).__name__}: {exc}") from None
    if resolver.addresses:
        r.nameservers = [ip for ip, _ in resolver.addresses]
        r.nameserver_ports = {ip: port for ip, port in resolver.addresses}
    r.lifetime = resolver.timeout
    r.cache = None
    out: list[str] = []
    ttls: list[float] = []
    failures: list[str] = []
    for kind in resolver.families:
        try:
            answer = r.resolve(name, kind, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            failures.append("no such name")
            continue
        except (dns.exception.DNSException, ValueError, OSError) as exc:
            # a timeout, no server answering, or a name DNS cannot carry (an empty label)
            raise LookupError_(f"{name}: {type(exc).__name__}: {exc}") from None
        if answer.rrset is not None:
            ttls.append(float(answer.rrset.ttl))
            out += sorted((item.address for item in answer.rrset),
                          key=lambda a: ipaddress.ip_address(a))
    if not out:
        raise LookupError_(f"{name}: " + (failures[0] if failures else "no A or AAAA record"))
    ttl = min(ttls) if ttls else resolver.max_ttl
    return tuple(out), min(max(ttl, resolver.min_ttl), resolver.max_ttl)


@dataclass
class Name:
    """One name the master watches: where it is used and what it said last."""

    upstream: str
    host: str
    addresses: tuple[str, ...]
    due: float


class Watcher:
    """Looks the names up again when their TTL runs out, in a thread, and puts (upstream,
    host, addresses) in `changes` when an answer differs (then calls `notify`, if given)."""

    def __init__(self, names: Sequence[Name], resolver: ResolverConfig,
                 notify: Callable[[], object] | None = None) -> None:
        self.names = list(names)
        self.resolver = resolver
        self.notify = notify
        self.changes: queue.SimpleQueue[tuple[str, str, tuple[str, ...]]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastws-dns", daemon=True)

    @classmethod
    def of(cls, cfg: Any, notify: Callable[[], object] | None = None) -> "Watcher":
        """A watcher of the `resolve` names of configuration `cfg`, from its answers."""
        due = time.monotonic() + cfg.resolver.min_ttl
        return cls([Name(up.name, host, addresses, due)
                    for up in cfg.upstreams for host, addresses in up.answers],
                   cfg.resolver, notify)

    def start(self) -> None:
        if self.names:
            self._thread.start()

    def stop(self) -> None:
        # (not joined: a look-up under way ends by itself within its timeout, and its answer
        # goes nowhere)
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for n in self.names:
                if n.due > now or self._stop.is_set():
                    continue
                try:
                    addresses, ttl = lookup(n.host, self.resolver)
                except Exception as exc:     # (LookupError_, or anything dnspython raises)
                    # the last answer stays; asked again soon
                    log.warning("cannot look %s up again (upstream %s keeps %s): %s", n.host,
                                n.upstream, ", ".join(n.addresses), exc)
                    n.due = now + min(self.resolver.max_ttl, 5.0)
                    continue
                n.due = now + ttl
                if addresses != n.addresses:
                    n.addresses = addresses
                    self.changes.put((n.upstream, n.host, addresses))
                    if self.notify is not None:
                        self.notify()
            wait = min((n.due for n in self.names), default=now + 1) - time.monotonic()
            self._stop.wait(max(0.05, wait))
