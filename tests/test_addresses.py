"""Listen and upstream addresses (fastws/addresses.py): parsed as written, and upstream servers
checked and resolved into peers in nginx's order, with one-line errors naming the key."""

from __future__ import annotations

import socket

import pytest

from fastws.addresses import MAX_UNIX_PATH, MAX_WEIGHT, parse_address, resolve
from fastws.config import ServerConfig
from fastws.errors import ConfigError


@pytest.mark.parametrize("text, host, port, family", [
    ("127.0.0.1:8080", "127.0.0.1", 8080, socket.AF_INET),
    ("8080", "0.0.0.0", 8080, socket.AF_INET),
    (8080, "0.0.0.0", 8080, socket.AF_INET),
    ("[::1]:443", "::1", 443, socket.AF_INET6),
    ("[::]:80", "::", 80, socket.AF_INET6),
    ("backend.internal:9000", "backend.internal", 9000, socket.AF_UNSPEC),
    ("localhost:1", "localhost", 1, socket.AF_UNSPEC),
    ("127.0.0.1:65535", "127.0.0.1", 65535, socket.AF_INET),
])
def test_addresses_as_written(text, host, port, family):
    addr = parse_address(text)
    assert (addr.host, addr.port, addr.family) == (host, port, family)
    assert addr.sockaddr == (host, port)
    assert addr.text == str(text)


def test_a_default_port_applies_only_when_none_is_written():
    assert parse_address("example.com", default_port=443).port == 443
    assert parse_address("[::1]", default_port=80).port == 80
    assert parse_address("example.com:8443", default_port=443).port == 8443


@pytest.mark.parametrize("text, message", [
    ("", "an address is a string"),
    (True, "an address is a string"),
    ("::1:80", "write an IPv6 address in brackets"),
    ("[::1:80", "missing ']'"),
    ("[::1]80", "expected ':port' after ']'"),
    ("127.0.0.1:0", "is not a port number"),
    ("127.0.0.1:65536", "is not a port number"),
    ("127.0.0.1:http", "is not a port number"),
    ("127.0.0.1", "a port is required"),
    (":80", "a host is required"),
    ("bad_name:80", "is neither an IP address nor a host name"),
    ("-lead.example:80", "is neither an IP address nor a host name"),
])
def test_bad_addresses_say_what_is_wrong(text, message):
    with pytest.raises(ValueError) as err:
        parse_address(text)
    assert message in str(err.value)


def peers(*servers: ServerConfig | str):
    return resolve("f.toml", "upstream.b",
                   [s if isinstance(s, ServerConfig) else ServerConfig(s) for s in servers])


def test_ip_addresses_and_unix_sockets_are_one_peer_each():
    v4, v6, unix = peers("127.0.0.1:9001", "[0:0::1]:9002", "unix:/run/app.sock")
    assert (v4.name, v4.family, v4.sockaddr) == ("127.0.0.1:9001", socket.AF_INET,
                                                 ("127.0.0.1", 9001))
    # an IPv6 address is named as nginx names it: compressed, in brackets
    assert (v6.name, v6.family, v6.sockaddr) == ("[::1]:9002", socket.AF_INET6, ("::1", 9002, 0, 0))
    assert (unix.name, unix.family, unix.sockaddr) == ("unix:/run/app.sock", socket.AF_UNIX,
                                                       "/run/app.sock")
    assert [p.server_index for p in (v4, v6, unix)] == [0, 1, 2]


def test_a_host_name_becomes_one_peer_per_address_ipv4_first():
    expected = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for info in socket.getaddrinfo("localhost", 9001, family, socket.SOCK_STREAM, 0,
                                       socket.AI_ADDRCONFIG) if _has(family) else ():
            name = f"{info[4][0]}:9001" if family == socket.AF_INET else f"[{info[4][0]}]:9001"
            if name not in expected:
                expected.append(name)
    got = peers("localhost:9001", "127.0.0.2:9002")
    assert [p.name for p in got] == expected + ["127.0.0.2:9002"]
    assert all(p.server == "localhost:9001" and p.server_index == 0 for p in got[:-1])


def _has(family: int) -> bool:
    try:
        socket.getaddrinfo("localhost", 1, family, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG)
    except socket.gaierror:
        return False
    return True


def test_backups_come_after_every_primary_and_settings_are_kept():
    got = peers(ServerConfig("127.0.0.1:1", backup=True),
                ServerConfig("127.0.0.1:2", weight=5, max_fails=3, fail_timeout=2.5, max_conns=9),
                ServerConfig("127.0.0.1:3", down=True))
    assert [p.name for p in got] == ["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:1"]
    primary, down, backup = got
    assert (primary.weight, primary.max_fails, primary.fail_timeout, primary.max_conns) == \
        (5, 3, 2.5, 9)
    assert down.down and not down.backup
    assert backup.backup and backup.server_index == 0


@pytest.mark.parametrize("servers, key, message", [
    ([], "upstream.b.servers", "needs at least one server"),
    (["127.0.0.1:1", "127.0.0.1:1"], "upstream.b.servers[1]", "already servers[0]"),
    (["[::1]:1", "[0::1]:1"], "upstream.b.servers[1]", "duplicate server"),
    (["LocalHost:1", "localhost:1"], "upstream.b.servers[1]", "duplicate server"),
    (["unix:/a", "unix:/a"], "upstream.b.servers[1]", "duplicate server"),
    (["unix:"], "upstream.b.servers[0]", "a unix socket path is required"),
    (["unix:/" + "x" * MAX_UNIX_PATH], "upstream.b.servers[0]",
     f"at most {MAX_UNIX_PATH} bytes"),
    (["no-such-host.invalid:80"], "upstream.b.servers[0]", "host 'no-such-host.invalid' not found"),
    (["127.0.0.1"], "upstream.b.servers[0]", "a port is required"),
    ([ServerConfig("127.0.0.1:1", backup=True)], "upstream.b.servers",
     "at least one server that is not a backup"),
    ([ServerConfig("127.0.0.1:1", weight=0)], "upstream.b.servers[0].weight",
     f"from 1 to {MAX_WEIGHT}"),
    ([ServerConfig("127.0.0.1:1", weight=MAX_WEIGHT + 1)], "upstream.b.servers[0].weight",
     f"from 1 to {MAX_WEIGHT}"),
    ([ServerConfig("127.0.0.1:1", weight=True)], "upstream.b.servers[0].weight", "got True"),
    ([ServerConfig("127.0.0.1:1", max_fails=-1)], "upstream.b.servers[0].max_fails", "0 or more"),
    ([ServerConfig("127.0.0.1:1", max_conns=1.5)], "upstream.b.servers[0].max_conns",
     "whole number"),
    ([ServerConfig("127.0.0.1:1", fail_timeout=-1)], "upstream.b.servers[0].fail_timeout",
     "a duration"),
    ([ServerConfig("127.0.0.1:1", fail_timeout=float("nan"))],
     "upstream.b.servers[0].fail_timeout", "a duration"),
])
def test_server_mistakes_are_one_line_naming_the_key(servers, key, message):
    with pytest.raises(ConfigError) as err:
        peers(*servers)
    text = str(err.value)
    assert text.startswith(f"f.toml: {key}: "), text
    assert message in text and "\n" not in text
