"""Shared helpers of the balancer tests: a request context, starting a selection from it as the
engine will (the client address and the evaluated hash key), and replaying recorded requests."""

from __future__ import annotations

import re

import json
import pathlib
from typing import Any
from urllib.parse import parse_qsl

from fastws.balancer import UpstreamGroup, build_upstream
from fastws.config import ServerConfig, UpstreamConfig, parse_template

DATA = pathlib.Path(__file__).parent / "data"


class Ctx:
    """A request as the balancer sees it: the client address and nginx's variables."""

    def __init__(self, remote_addr: str = "127.0.0.1", request_uri: str = "/",
                 headers: dict[str, str] | None = None) -> None:
        self.remote_addr = remote_addr
        self.request_uri = request_uri
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}

    def variable(self, name: str) -> str:
        path, _, args = self.request_uri.partition("?")
        if name == "remote_addr":
            return self.remote_addr
        if name == "request_uri":
            return self.request_uri
        if name == "uri":
            return path
        if name in ("args", "query_string"):
            return args
        if name.startswith("arg_"):
            for key, value in parse_qsl(args, keep_blank_values=True):
                if key == name[4:]:
                    return value
            return ""
        if name.startswith("http_"):
            return self.headers.get(name[5:].replace("_", "-"), "")
        if name.startswith("cookie_"):
            for part in self.headers.get("cookie", "").split(";"):
                key, _, value = part.strip().partition("=")
                if key == name[7:]:
                    return value
            return ""
        return ""


def _key_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    text = "" if value is None else str(value)
    try:
        # Header and URI text decoded as latin-1 maps back to the raw bytes nginx hashes.
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


def hash_key(up: UpstreamGroup, ctx: Ctx) -> bytes | None:
    """The group's hash_key template evaluated for ``ctx`` (nginx's complex value)."""
    template = up.config.hash_key
    if template is None:
        return None
    # the literal text between the variables, and each variable's value
    pieces = re.split(r"\$(?:\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))", template.text)
    out = []
    for i in range(0, len(pieces), 3):
        out.append(_key_bytes(pieces[i]))
        if i + 2 < len(pieces):
            out.append(_key_bytes(ctx.variable((pieces[i + 1] or pieces[i + 2]).lower())))
    return b"".join(out)


def start(up: UpstreamGroup, ctx: Ctx) -> Any:
    """Start choosing a server for one request, as the engine does."""
    return up.selection(remote_addr=ctx.remote_addr, key=hash_key(up, ctx), ctx=ctx)


def upstream_from_spec(spec: dict[str, Any], clock: Any = None) -> UpstreamGroup:
    """Build an upstream group from a JSON description of an nginx upstream block."""
    servers = tuple(
        ServerConfig(s["address"], weight=s.get("weight", 1), max_fails=s.get("max_fails", 1),
                     fail_timeout=s.get("fail_timeout", 10.0), max_conns=s.get("max_conns", 0),
                     backup=s.get("backup", False), down=s.get("down", False))
        for s in spec["servers"])
    key = parse_template(spec["hash_key"]) if spec.get("hash_key") else None
    config = UpstreamConfig(spec["name"], servers, balance=spec.get("balance", "round_robin"),
                            hash_key=key, consistent=spec.get("consistent", False),
                            balance_factor=spec.get("balance_factor", 0.0))
    if clock is None:
        return build_upstream("test.toml", config)
    return build_upstream("test.toml", config, clock)


def replay(up: UpstreamGroup, case: dict[str, Any], refusing: set[str]) -> list[str]:
    """Run one request through the balancer as the engine would: the names of every peer
    tried, like nginx's $upstream_addr.  Peers named in ``refusing`` refuse the connect."""
    sel = start(up, Ctx(case.get("remote_addr", "127.0.0.1"), case.get("request_uri", "/"),
                        case.get("headers")))
    names = []
    while True:
        peer = sel.next()
        if peer is None:
            break
        names.append(peer.name)
        if peer.name in refusing:
            sel.free(peer, failed=True)
            continue
        sel.connected(peer)
        sel.free(peer)
        break
    return names


def load_vectors(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())
